"""torchrun worker for tests/test_precision.py (CPU, gloo): each rank's CPU probe is patched to its own answer
(rank 0: bf16 faster than fp32, every other rank: bf16 slower), then train.training_precision resolves
TRAINING_PRECISION=auto. Writes OUT_DIR/rank<R>.json with the precision this rank computes in.

    torchrun --nproc_per_node N tests/precision_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import config
import distributed as D
import precision
import train

ROOT = Path(__file__).resolve().parent.parent


def main(out: Path) -> None:
    info = D.init_distributed("cpu")
    slowdown = 0.5 if info.rank == 0 else 2.0
    precision.cpu_bf16_slowdown = lambda: slowdown
    cfg = config.load_config(str(ROOT / "configs" / "debug.env"), {"TRAINING_PRECISION": "auto"},
                             use_environ=False)
    choice = train.training_precision(cfg, torch.device("cpu"))
    own = precision.resolve("auto", "cpu")
    (out / f"rank{info.rank}.json").write_text(json.dumps({"name": choice.name, "reason": choice.reason,
                                                           "own_probe": own.name}))
    D.destroy()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
