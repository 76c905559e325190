"""train.py under torchrun with DTensor.full_tensor and DTensor.redistribute (a gather of a whole tensor onto a
rank) raising while the run is built (model, LoRA, frozen reference, weights), and train.build_model (the
whole model on one rank) refused. After the build each rank
records, per module (policy, frozen reference), how many parameter elements it holds against the total, and
the dtypes of the frozen and the trained parameters, to RUN_DIR/build_rank<R>.json. Launched by
tests/test_sharded_posttrain.py:

    torchrun --nproc_per_node N tests/build_without_gathers.py [train.py arguments ...]
"""

from __future__ import annotations

import json
import sys

from helpers import dtensor_gathers_refused
from torch.distributed.tensor import DTensor

import distributed as D
import train
from errors import run_cli

_build_run = train.build_run


def _whole_model(*_args, **_kw):
    raise AssertionError("a rank built the whole model (train.build_model)")


def held(module) -> dict:
    local = total = 0
    frozen, trained = set(), set()
    for p in module.parameters():
        local += (p.to_local() if isinstance(p, DTensor) else p).numel()
        total += p.numel()
        (trained if p.requires_grad else frozen).add(str(p.dtype))
    return {"local_numel": local, "total_numel": total, "frozen_dtypes": sorted(frozen),
            "trained_dtypes": sorted(trained)}


def build_without_gathers():
    def build(*args, **kw):
        with dtensor_gathers_refused("while the run was built"):
            run = _build_run(*args, **kw)
        reference = getattr(run.objective, "reference", None)
        record = {"policy": held(run.model), "reference": held(reference) if reference is not None else None}
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / f"build_rank{D.rank()}.json").write_text(json.dumps(record))
        return run

    return build


if __name__ == "__main__":
    train.build_run = build_without_gathers()
    train.build_model = _whole_model
    run_cli(lambda: train.main(sys.argv[1:]))
