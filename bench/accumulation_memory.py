"""What gradient accumulation costs a rank under FSDP2 on CPU (gloo), measured: the process's peak memory over
one optimizer step's micro-batches, with gradients reduce-scattered after every micro-batch (the default) or
accumulated unsharded (FSDP_UNSHARDED_ACCUMULATION=true), for 1 and 4 micro-batches.

    python -m bench.accumulation_memory [--preset 125m] [--procs 2] [--seq 128]

Each case is its own launch (torchrun --standalone): the model is built as train.py builds it under FSDP2 (meta
device -> fully_shard -> each rank fills its shards), then one step's micro-batches (one row of `seq` tokens
each, fp32, `model(x, labels=y)` as in training) run forward and backward under distributed.gradient_sync as the
training loop drives it. Per rank it reports how far the step raised the process's peak RSS (VmHWM) above the
peak the build reached, and the gradient bytes the rank holds after the last micro-batch but one. The launches
run with MALLOC_MMAP_THRESHOLD_=131072: glibc then serves every large tensor from its own mapping and returns it
when freed, so the RSS peak follows the live tensors (with its default heap, freed blocks stay resident and the
peak grows with every micro-batch whatever is alive). The figures go to bench/results/accumulation_memory.json
(bench/results_file.py's form).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import config
import distributed as D
import train

ROOT = Path(__file__).resolve().parent.parent

MIB = 2**20
CASES = [("sharded", 1), ("sharded", 4), ("unsharded", 4)]


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _grad_bytes(model: torch.nn.Module) -> int:
    """The gradient bytes a rank holds: its .grad shards and FSDP2's unsharded accumulation buffers."""
    from torch.distributed.fsdp import FSDPModule

    def nbytes(t: torch.Tensor | None) -> int:
        return 0 if t is None else (t.to_local() if hasattr(t, "to_local") else t).nbytes

    total = sum(nbytes(p.grad) for p in model.parameters())
    for m in model.modules():
        if isinstance(m, FSDPModule):
            for group in m._get_fsdp_state()._fsdp_param_groups:
                total += sum(nbytes(fp.unsharded_accumulated_grad) for fp in group.fsdp_params)
                total += sum(nbytes(fp._unsharded_param.grad) for fp in group.fsdp_params
                             if hasattr(fp, "_unsharded_param"))
    return total


def worker(out: Path, preset: str, seq: int, mode: str, accum: int) -> None:
    D.init_distributed("cpu")
    cfg = config.load_config(None, {"MODEL_PRESET": preset, "USE_FSDP": "true", "DEVICE": "cpu",
                                    "MAX_SEQ_LEN": str(seq)}, use_environ=False)
    tok = type("Vocab", (), {"vocab_size": 8448})()  # the project tokenizer's vocabulary size
    model, margs, _ = train.build_meta_model(cfg, tok, "")
    D.parallelize(model, cfg, torch.device("cpu"))
    train.materialize_model(model, None, cfg.training.seed, torch.device("cpu"), "")
    built = _vm_hwm()
    g = torch.Generator().manual_seed(D.rank())
    x = torch.randint(0, margs.vocab_size, (accum, seq + 1), generator=g)
    held = 0
    for m in range(accum):
        with D.gradient_sync(model, sync=m == accum - 1, unsharded_accumulation=mode == "unsharded"):
            model(x[m:m + 1, :-1], labels=x[m:m + 1, 1:]).backward()
        if m == accum - 2 or accum == 1:
            held = _grad_bytes(model)
    result = {"step_peak_above_build": _vm_hwm() - built, "held_gradient_bytes": held,
              "parameter_bytes": sum(p.to_local().nbytes for p in model.parameters())}
    (out / f"rank{D.rank()}.json").write_text(json.dumps(result))
    D.destroy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="125m")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        out, mode, accum = a.worker
        worker(Path(out), a.preset, a.seq, mode, int(accum))
        return 0
    rows = []
    for mode, accum in CASES:
        with tempfile.TemporaryDirectory() as d:
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={a.procs}", "-m", "bench.accumulation_memory", "--preset", a.preset,
                            "--seq", str(a.seq), "--worker", d, mode, str(accum)], check=True, cwd=ROOT,
                           env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
            ranks = [json.loads((Path(d) / f"rank{r}.json").read_text()) for r in range(a.procs)]
        rows.append({"mode": mode, "micro_batches": accum, **ranks[0]})
        print(f"{mode:>9} x{accum}: step raised the peak RSS by {ranks[0]['step_peak_above_build'] / MIB:7.1f} MiB; "
              f"gradients held {ranks[0]['held_gradient_bytes'] / MIB:6.1f} MiB "
              f"(parameter shards {ranks[0]['parameter_bytes'] / MIB:.1f} MiB)", flush=True)
    from bench import results_file

    print(results_file.write("accumulation_memory", "python -m bench.accumulation_memory " + " ".join(sys.argv[1:]),
                             {"preset": a.preset, "procs": a.procs, "seq": a.seq, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
