"""train.py with each rank's peak memory recorded, for bench/gpu.sh:

    torchrun ... bench/gpu_run.py OUT_DIR [train.py arguments ...]

When the run ends (finished or failed) every rank writes OUT_DIR/peak_memory_rank<R>.json: on CUDA the
allocator's peak (torch.cuda.max_memory_allocated, what memory_plan models), on CPU the process's peak
resident set (getrusage, which also counts the interpreter and libraries)."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402
from errors import run_cli  # noqa: E402


def record_peak(out: Path) -> None:
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak = {"kind": "cuda max_memory_allocated", "bytes": torch.cuda.max_memory_allocated(),
                "device": torch.cuda.get_device_name()}
    else:
        peak = {"kind": "cpu peak RSS", "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "device": "cpu"}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"peak_memory_rank{rank}.json").write_text(json.dumps(peak))


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    try:
        return train.main(argv[1:])
    finally:
        record_peak(out)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
