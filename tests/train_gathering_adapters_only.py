"""train.py under torchrun (LoRA, FSDP2) with DTensor.redistribute and DTensor.full_tensor (the gathers of a
full state dict) raising while a checkpoint is saved, unless the DTensor is a shard of a LoRA adapter weight:
a save that gathers any frozen base weight fails the run. Every rank prints how many adapter tensors it gathered.
Launched by tests/test_peft_export.py."""

from __future__ import annotations

import os
import sys

from helpers import dtensor_gathers_refused

import checkpoint
import train
from errors import run_cli

_save = checkpoint.Checkpointer.save


def save_gathering_adapters_only(*args, **kw):
    model = args[2]  # (checkpointer, step, model, ...)
    # a state dict's DTensors are detached views of the parameters: their local shards share the storage
    adapters = {p.to_local().data_ptr(): name for name, p in model.named_parameters()
                if name.endswith((".lora_a", ".lora_b"))}
    gathered: list[str] = []

    def adapter(dtensor) -> bool:
        name = adapters.get(dtensor._local_tensor.data_ptr())
        if name is not None:
            gathered.append(name)
        return name is not None

    with dtensor_gathers_refused("during a checkpoint save (not an adapter weight)", allowed=adapter):
        out = _save(*args, **kw)
    # one write per line: the ranks share the launcher's stdout, and print() writes the text and its newline
    # separately, so two ranks' lines could interleave
    os.write(sys.stdout.fileno(), f"saved step {args[1]} gathering {len(set(gathered))} of {len(adapters)} adapter "
             "weights and nothing else\n".encode())
    return out


if __name__ == "__main__":
    checkpoint.Checkpointer.save = save_gathering_adapters_only
    run_cli(lambda: train.main(sys.argv[1:]))
