"""torchrun worker for tests/test_grpo.py (CPU, gloo): a rollout of an FSDP2-sharded tiny model counts its
all-gathers (FSDP2's foreach_all_gather) and returns the completions of the same model unsharded.

    torchrun --nproc_per_node 2 tests/rollout_gather_worker.py OUT.json
"""

from __future__ import annotations

import json
import sys

import torch.distributed as dist
import torch.distributed.fsdp._fully_shard._fsdp_param_group as param_group
from helpers import tiny_model
from torch.distributed.fsdp import fully_shard

import generate


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    whole = tiny_model(seed=0, std=0.2)
    model = tiny_model(seed=0, std=0.2)
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    calls = []
    real = param_group.foreach_all_gather

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    param_group.foreach_all_gather = counting
    prompts, keys = ([[1, 2, 3], [4, 5]], [10, 11]) if rank == 0 else ([[6, 7, 8, 9]], [12])
    kw = dict(temperature=1.0, stop_ids=[], seed=1, step=0,
              all_ranks_done=lambda done: not bool(_any(not done)))
    got = generate.rollout(model, prompts, keys, 2, 12, **kw)
    gathers = len(calls)
    model(__import__("torch").tensor([[1, 2, 3]])).sum().backward()  # training still works after it
    want = generate.rollout(whole, prompts, keys, 2, 12, temperature=1.0, stop_ids=[], seed=1, step=0)
    result = {"gathers": gathers, "same": got == want, "after_training_gathers": len(calls) - gathers}
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def _any(flag: bool) -> bool:
    import torch

    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


if __name__ == "__main__":
    main(sys.argv[1])
