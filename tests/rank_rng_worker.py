"""torchrun worker for tests/test_fsdp_hooks.py (CPU, gloo): each rank's random streams across a checkpoint.

    torchrun --nproc_per_node N tests/rank_rng_worker.py --worker-out OUT_DIR [train.py arguments ...]

Builds the run as train.py does (train.build_run). A fresh run draws a rank-dependent number of values (the
ranks' streams then differ), checkpoints (train.save_checkpoint), then records what each stream gives next and
one dropout mask of a LoRA layer. A resumed run (a --<stage>_checkpoint flag) records what its streams give
first. Writes OUT_DIR/rank<R>.json.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

import distributed as D
import lora
import train


def next_values() -> dict:
    return {"torch": torch.rand(4).tolist(), "python": random.random(), "numpy": np.random.rand(2).tolist()}


def main() -> None:
    argv = sys.argv[1:]
    i = argv.index("--worker-out")
    out = Path(argv[i + 1])
    cfg, args = train.parse_args(argv[:i] + argv[i + 2:])
    info = D.init_distributed(cfg.system.device, group_of_one=cfg.system.use_fsdp)
    run = train.build_run(cfg, args, info)
    result: dict = {"rank": info.rank, "step": run.state.step}
    if run.resume_dir is None:
        torch.rand(info.rank + 1), random.random(), np.random.rand(info.rank + 1)
        train.save_checkpoint(run)
        run.checkpointer.wait()
        result["next"] = next_values()
        layer = next(m for m in run.model.modules() if isinstance(m, lora.LoRALinear))
        result["mask"] = (layer.dropout(torch.ones(256)) > 0).tolist()
    else:
        result["next"] = next_values()
    run.log.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{info.rank}.json").write_text(json.dumps(result))
    D.destroy()


if __name__ == "__main__":
    main()
