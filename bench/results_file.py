"""The result files under bench/results/: one JSON object per measurement, written by the script that measured it
(or, for a figure measured once by hand, recorded in the same form with the command that gave it):

    {"host": CPU model and core count, "cpu_profile": ATen's kernel capability and what the precision rule
     measured, "date": "YYYY-MM-DD HH:MM", "command": what was run, "recorded": who wrote the file and from
     what, "figures": {...the numbers...}}

bench/readme_tables.py renders the README's measured tables from these files.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
KEYS = ("host", "cpu_profile", "date", "command", "recorded", "figures")


def host() -> str:
    """CPU model name and the number of CPUs this process sees."""
    model = platform.processor() or "unknown CPU"
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} CPUs"


def cpu_profile() -> str:
    """ATen's kernel capability, the instruction-set profile this process runs under (bench/isa.py: checked to be
    in effect, with what oneDNN dispatches to) and the precision rule's bf16-vs-fp32 measurement on this host."""
    import torch

    import precision
    from bench import isa

    return (f"ATen capability {torch.backends.cpu.get_cpu_capability()}, {isa.verified()}, precision "
            f"{precision.resolve('auto', 'cpu').describe()}")


def split_host_line(line: str) -> tuple[str, str]:
    """bench/run_all.py's host line ("<CPU>, N CPUs, ATen capability ..., precision ...") -> (host, profile)."""
    head, sep, tail = line.partition(", ATen capability")
    return (head, "ATen capability" + tail) if sep else (line, "unknown")


def write(name: str, command: str, figures: dict[str, Any], out_dir: Path = RESULTS,
          host_and_profile: tuple[str, str] | None = None) -> Path:
    """bench/results/<name>.json for a measurement this process just made (machine-written). host_and_profile:
    given by a caller that measured them in another process (one that must not import torch itself)."""
    from fileio import write_text_atomic

    where, profile = host_and_profile or (host(), cpu_profile())
    record = {"host": where, "cpu_profile": profile, "date": time.strftime("%Y-%m-%d %H:%M"),
              "command": command, "recorded": f"machine-written by {Path(sys.argv[0]).name}", "figures": figures}
    path = out_dir / f"{name}.json"
    write_text_atomic(path, json.dumps(record, indent=1) + "\n")
    return path


def main() -> int:
    """Print this process's host and CPU profile as one JSON object (the line a bench that must not import torch
    asks a child for)."""
    print(json.dumps({"host": host(), "cpu_profile": cpu_profile()}))
    return 0


def load(name: str, root: Path = RESULTS) -> dict[str, Any]:
    """A result file, checked to hold every key of the form."""
    record = json.loads((root / f"{name}.json").read_text())
    missing = [k for k in KEYS if not record.get(k)]
    if missing:
        raise ValueError(f"bench/results/{name}.json lacks {', '.join(missing)}")
    return record


if __name__ == "__main__":
    raise SystemExit(main())
