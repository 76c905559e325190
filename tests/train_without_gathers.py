"""train.py under torchrun with DTensor.full_tensor and DTensor.redistribute (the gather of a full state dict)
raising while a checkpoint is saved: a save that gathers a tensor onto any rank fails the run. Launched by
tests/test_sharded_checkpoint.py."""

from __future__ import annotations

import sys

from torch.distributed.tensor import DTensor

import checkpoint
import train
from errors import run_cli

_save = checkpoint.Checkpointer.save


def _refuse(*_args, **_kw):
    raise AssertionError("a DTensor was gathered during a checkpoint save")


def save_without_gathers(*args, **kw):  # (checkpointer, step, ...)
    real = DTensor.full_tensor, DTensor.redistribute
    DTensor.full_tensor = DTensor.redistribute = _refuse
    try:
        out = _save(*args, **kw)
    finally:
        DTensor.full_tensor, DTensor.redistribute = real
    print(f"saved step {args[1]} with DTensor gathers refused", flush=True)
    return out


if __name__ == "__main__":
    checkpoint.Checkpointer.save = save_without_gathers
    run_cli(lambda: train.main(sys.argv[1:]))
