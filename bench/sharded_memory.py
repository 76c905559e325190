"""Per-rank memory of FSDP2 training on CPU (gloo) over 1, 2 and 4 processes, measured, beside the memory plan.

    python -m bench.sharded_memory [--preset small] [--procs 1,2,4] [--batch 2] [--seq 512] [--precision bf16]

Each launch (torchrun --standalone) builds the model as train.py does under FSDP2 (meta device -> fully_shard
-> each rank fills its shards), then runs two AdamW training steps (`model(x, labels=y)` under the run's autocast,
the LM head and loss fused in the forward as in training; backward, step, zero_grad) under torch's
FSDPMemTracker on real tensors. Per rank it reports the bytes of the local
parameter, gradient and optimizer-state shards (summed over the rank's tensors after the second step's
backward), the tracker's peak and the process's peak RSS (VmHWM, which includes the Python / torch runtime
every process carries). The table sets them beside memory_plan.plan for the same shapes; the figures also go
to bench/results/sharded_memory.json (bench/results_file.py's form).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import config
import distributed as D
import memory_plan
import optim
import precision
import train

ROOT = Path(__file__).resolve().parent.parent

MIB = 2**20


def _local_bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors)


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(out: Path, preset: str, batch: int, seq: int, prec: str) -> None:
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    info = D.init_distributed("cpu")
    if not D.is_dist():  # one process: FSDP2 still shards, over a world of one
        torch.distributed.init_process_group("gloo")
    cfg = config.load_config(None, {"MODEL_PRESET": preset, "USE_FSDP": "true", "DEVICE": "cpu",
                                    "ADAMW_USE_FUSED": "false", "MAX_SEQ_LEN": str(seq)}, use_environ=False)
    tok = type("Vocab", (), {"vocab_size": 8448})()  # the project tokenizer's vocabulary size
    model, margs, _ = train.build_meta_model(cfg, tok, "")
    D.parallelize(model, cfg, torch.device("cpu"), compute_dtype=precision.dtype_of(prec))
    train.materialize_model(model, None, cfg.training.seed, torch.device("cpu"), "")
    opt = optim.build_optimizer(model, cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(info.rank)
    x, y = (torch.randint(0, margs.vocab_size, (batch, seq), generator=g) for _ in range(2))
    tracker = FSDPMemTracker(model, opt)
    tracker.track_inputs((x, y))
    dtype = precision.dtype_of(prec)
    with tracker:
        for step in range(2):
            with precision.autocast("cpu", dtype):
                loss = model(x, labels=y)  # the training path: head and loss fused
            loss.backward()
            if step == 1:
                grads = _local_bytes(p.grad for p in model.parameters() if p.grad is not None)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step == 0:
                tracker.reset_mod_stats()
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.ndim > 0]
    result = {"rank": info.rank, "world": info.world_size, "params": _local_bytes(model.parameters()),
              "grads": grads, "optimizer": _local_bytes(state),
              "tracked_peak": tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"],
              "vm_hwm": _vm_hwm()}
    (out / f"rank{info.rank}.json").write_text(json.dumps(result))
    D.destroy()


def launch(nproc: int, a: argparse.Namespace, tmp: Path) -> list[dict]:
    out = tmp / f"n{nproc}"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "bench.sharded_memory", "--worker", str(out), "--preset", a.preset, "--batch", str(a.batch), "--seq",
           str(a.seq), "--precision", a.precision]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise SystemExit(f"torchrun with {nproc} processes failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--procs", default="1,2,4")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--precision", default="bf16", choices=memory_plan.PRECISIONS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(Path(a.worker), a.preset, a.batch, a.seq, a.precision)
        return 0
    args = config.load_config(None, {"MODEL_PRESET": a.preset, "MAX_SEQ_LEN": str(a.seq)},
                              use_environ=False).model_args(8448)
    print(f"preset {a.preset}, micro-batch {a.batch} x {a.seq}, {a.precision}, AdamW, CPU gloo; MiB per rank "
          "(rank 0; every rank within one row of it)")
    print("| processes | parameters | gradients | optimizer state | params + optimizer x N | tracker peak | "
          "plan peak | peak RSS (VmHWM) |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(v) for v in a.procs.split(",")):
            r = launch(n, a, Path(tmp))[0]
            plan = memory_plan.plan(args, n, a.precision, "adamw", False, a.batch, a.seq)
            rows.append({"processes": n, **{k: r[k] / MIB for k in ("params", "grads", "optimizer", "tracked_peak",
                                                                       "vm_hwm")}, "plan_peak": plan.peak / MIB})
            print(f"| {n} | {r['params'] / MIB:.1f} | {r['grads'] / MIB:.1f} | {r['optimizer'] / MIB:.1f} | "
                  f"{(r['params'] + r['optimizer']) * n / MIB:.1f} | {r['tracked_peak'] / MIB:.1f} | "
                  f"{plan.peak / MIB:.1f} | {r['vm_hwm'] / MIB:.0f} |", flush=True)
    from bench import results_file

    command = (f"python -m bench.sharded_memory --preset {a.preset} --procs {a.procs} --batch {a.batch} "
               f"--seq {a.seq} --precision {a.precision}")
    print(results_file.write("sharded_memory", command, {"preset": a.preset, "batch": a.batch, "seq": a.seq,
                                                         "precision": a.precision, "mib_per_rank": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
