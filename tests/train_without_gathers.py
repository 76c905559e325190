"""train.py under torchrun with DTensor.full_tensor and DTensor.redistribute (the gather of a full state dict)
raising while a checkpoint is saved: a save that gathers a tensor onto any rank fails the run. Launched by
tests/test_sharded_checkpoint.py."""

from __future__ import annotations

import sys

from helpers import dtensor_gathers_refused

import checkpoint
import train
from errors import run_cli

_save = checkpoint.Checkpointer.save


def save_without_gathers(*args, **kw):  # (checkpointer, step, ...)
    with dtensor_gathers_refused("during a checkpoint save"):
        out = _save(*args, **kw)
    print(f"saved step {args[1]} with DTensor gathers refused", flush=True)
    return out


if __name__ == "__main__":
    checkpoint.Checkpointer.save = save_without_gathers
    run_cli(lambda: train.main(sys.argv[1:]))
