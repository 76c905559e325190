"""train.py with each rank's peak memory recorded, for bench/gpu.sh:

    torchrun ... -m bench.gpu_run OUT_DIR [train.py arguments ...]

When the run ends (finished or failed) every rank writes OUT_DIR/peak_memory_rank<R>.json: on CUDA the
allocator's peak (torch.cuda.max_memory_allocated, what memory_plan models), on CPU the process's peak
resident set (getrusage, which also counts the interpreter and libraries). On CUDA the run goes under
torch.cuda.set_sync_debug_mode("warn") and the file also counts the host syncs it reported ("cuda_syncs":
every op that made the host wait for the GPU, evaluation, sampling and checkpoints included)."""

from __future__ import annotations

import json
import os
import resource
import sys
import warnings
from pathlib import Path

import torch

import train
from errors import run_cli

SYNC_WARNING = "synchronizing CUDA operation"  # the text of set_sync_debug_mode's warning


def record_peak(out: Path, syncs: int | None) -> None:
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak = {"kind": "cuda max_memory_allocated", "bytes": torch.cuda.max_memory_allocated(),
                "device": torch.cuda.get_device_name(), "cuda_syncs": syncs}
    else:
        peak = {"kind": "cpu peak RSS", "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "device": "cpu"}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"peak_memory_rank{rank}.json").write_text(json.dumps(peak))


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    cuda = torch.cuda.is_available()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            return train.main(argv[1:])
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
            record_peak(out, sum(SYNC_WARNING in str(w.message) for w in seen) if cuda else None)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
