"""The memory plan (memory_plan.py) against torch's FSDP2 memory tracker on the real Llama 3.1 8B / 70B shapes.

    python -m bench.memory_plan [--layers N] [--quick]

For each case the model is built on the meta device, sharded by distributed.parallelize over a fake process
group of G ranks (no communication; rank 0's view), materialized as fake tensors (no memory is allocated)
and run through two training steps as training runs them (`model(x, labels=y)`: the LM head and the loss fused
in the forward, fused_ce's autograd.Function included, under the run's autocast; backward, optimizer step,
zero_grad) under torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker, whose peak is compared with the
plan's.
`--layers N` keeps the full width but N blocks (the tests' setting); without it the full depth is run.
Muon is not tracked: its AdamW half reads the step count on the host, which fake tensors cannot.
"""

from __future__ import annotations

import argparse
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist

import config
import distributed as D
import memory_plan
import optim
import precision as precision_mod
from model import ModelArgs, Transformer

GIB = 2**30


def preset_args(preset: str, layers: int | None = None, vocab_size: int | None = None) -> ModelArgs:
    over = {"MODEL_PRESET": preset, **({"N_LAYERS": str(layers)} if layers else {})}
    return config.load_config(None, over, use_environ=False).model_args(vocab_size)


def tracked_peak(args: ModelArgs, gpus: int, precision: str = "bf16", optimizer: str = "adamw",
                 activation_checkpointing: bool = False, micro_batch: int = 1, seq_len: int = 2048) -> int:
    """Peak bytes on rank 0 of `gpus` FSDP2 ranks as FSDPMemTracker sees two training steps, under fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("tracked_peak starts its own (fake) process group; none may be running")
    cfg = config.load_config(None, {"OPTIMIZER": optimizer, "USE_FSDP": "true", "ADAMW_USE_FUSED": "false",
                                    "ACTIVATION_CHECKPOINTING": str(activation_checkpointing).lower()},
                             use_environ=False)
    dist.init_process_group("fake", rank=0, world_size=gpus, store=FakeStore())
    try:
        with torch.device("meta"):
            model = Transformer(args)
        D.parallelize(model, SimpleNamespace(system=cfg.system), torch.device("cpu"),  # shards the meta model
                      compute_dtype=precision_mod.dtype_of(precision))
        with FakeTensorMode(allow_non_fake_inputs=True):  # the meta parameters become fake ones
            model.to_empty(device="cpu")
            opt = optim.build_optimizer(model, cfg, torch.device("cpu"))
            x = torch.randint(0, args.vocab_size, (micro_batch, seq_len))
            y = torch.randint(0, args.vocab_size, (micro_batch, seq_len))
            tracker = FSDPMemTracker(model, opt)
            tracker.track_inputs((x, y))
            dtype = precision_mod.dtype_of(precision)
            with tracker:
                for step in range(2):  # the second step has the optimizer state the first one created
                    with precision_mod.autocast("cpu", dtype):
                        loss = model(x, labels=y)  # the training path: head and loss fused
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if step == 0:
                        tracker.reset_mod_stats()
            return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    finally:
        dist.destroy_process_group()


CASES = [  # (preset, gpus, precision, activation checkpointing, micro batch, seq len)
    ("llama3.1-8b", 8, "bf16", False, 1, 8192),
    ("llama3.1-8b", 8, "bf16", True, 1, 8192),
    ("llama3.1-8b", 8, "bf16", True, 2, 4096),
    ("llama3.1-8b", 8, "fp32", True, 1, 4096),
    ("llama3.1-70b", 64, "bf16", True, 1, 8192),
    ("llama3.1-70b", 64, "bf16", False, 1, 2048),
    ("llama3.1-70b", 64, "bf16", True, 1, 4096),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=None, help="blocks per model (default: the preset's full depth)")
    ap.add_argument("--quick", action="store_true", help="the first three cases only")
    ap.add_argument("--save", default=None, metavar="NAME",
                    help="also write the cases to bench/results/NAME.json (read by bench/readme_tables.py)")
    a = ap.parse_args()
    print("| model | GPUs | precision | act. ckpt | B x T | FSDPMemTracker peak | plan peak (at) | plan / tracker |")
    print("|---|---|---|---|---|---|---|---|")
    worst, t0, cases = 0.0, time.time(), []
    for preset, gpus, prec, ac, b, t in CASES[:3] if a.quick else CASES:
        args = preset_args(preset, a.layers)
        got = tracked_peak(args, gpus, prec, "adamw", ac, b, t)
        p = memory_plan.plan(args, gpus, prec, "adamw", ac, b, t)
        ratio = p.peak / got
        worst = max(worst, abs(ratio - 1))
        name = preset + (f" ({args.n_layers} layers)" if a.layers else "")
        print(f"| {name} | {gpus} | {prec} | {'yes' if ac else 'no'} | {b} x {t} | {got / GIB:.2f} GiB | "
              f"{p.peak / GIB:.2f} GiB ({p.peak_at}) | {ratio:.3f} |", flush=True)
        cases.append({"model": name, "gpus": gpus, "precision": prec, "activation_checkpointing": ac,
                      "micro_batch": f"{b} x {t}", "tracker_peak_gib": got / GIB, "plan_peak_gib": p.peak / GIB,
                      "plan_peak_at": p.peak_at})
    print(f"largest deviation {worst:.1%} over {len(CASES[:3] if a.quick else CASES)} cases in {time.time() - t0:.0f} s")
    if a.save:
        from bench import results_file

        results_file.write(a.save, "python -m bench.memory_plan " + " ".join(sys.argv[1:]), {"cases": cases})
    return 0


if __name__ == "__main__":
    sys.exit(main())
