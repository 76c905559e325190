"""Where a greedy decode step of SmolLM2-135M-Instruct spends its time, and what bounds it.

    python -m bench.decode_profile [--dtype bf16|fp32] [--new-tokens 64] [--rows 12] [--isa native|avx512_bf16|avx2]

1. Memory: read bandwidth (a 1 GiB sum, every thread) and the bytes a step must read (every weight once,
   the tied head counted once), so the fastest possible step is bytes / bandwidth.
2. The matrix-vector products alone: the model's 121 weight matrices in decode order (per block wq|wk|wv,
   wo, w1|w3, w2; then the head), one row each, through F.linear (the BLAS matrix-multiply call), torch.mv
   (the kernel the model's one-row products use, eager and in the compiled step) and inductor's own
   multiply-and-sum (what torch.compile makes of a product by default); ms per step and GB/s, each timed
   on its own.
3. torch.profiler tables of one whole generate() call, eager and compiled (the compiled one after its
   warm-up), with inductor's kernels named: ms per step by op.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import model as model_mod
import model_utils
import precision
from bench import isa
from bench.run_all import host_line
from errors import run_cli
from generate import generate

ROOT = Path(__file__).resolve().parent.parent


def read_bandwidth(nbytes: int = 2**30) -> float:
    """Bytes/s of summing a large fp32 buffer (read only), best of 3."""
    x = torch.ones(nbytes // 4)
    x.sum()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def step_matrices(model) -> list[torch.Tensor]:
    """The weights one decode step multiplies by, in order, with the projections generate() fuses fused."""
    ws = []
    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        ws += [torch.cat((a.wq.weight, a.wk.weight, a.wv.weight)), a.wo.weight,
               torch.cat((f.w1.weight, f.w3.weight)), f.w2.weight]
    return ws + [model.output.weight]


def time_step(fn, rounds: int = 10) -> float:
    for _ in range(2):
        fn()
    t0 = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - t0) / rounds


def matvec_table(ws: list[torch.Tensor], dtype: torch.dtype) -> list[tuple[str, float]]:
    xs = [torch.randn(1, w.shape[1], dtype=dtype) for w in ws]

    def with_linear():
        return [F.linear(x, w) for x, w in zip(xs, ws, strict=True)]

    def with_mv():
        return [torch.mv(w, x[0]) for x, w in zip(xs, ws, strict=True)]

    @torch.compile(dynamic=False)
    def with_reduction(xs, ws):
        return [(x.float()[:, None, :] * w.float()).sum(-1).to(x.dtype) for x, w in zip(xs, ws, strict=True)]

    ref, got = with_linear(), with_mv()
    assert all(torch.equal(a, b.view_as(a)) for a, b in zip(ref, got, strict=True)), "torch.mv != F.linear"
    return [("F.linear (BLAS matrix multiply)", time_step(with_linear)),
            ("torch.mv (ATen matrix-vector)", time_step(with_mv)),
            ("inductor multiply-and-sum", time_step(lambda: with_reduction(xs, ws)))]


def profile_table(call, rows: int, steps: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    lines = ["| op | ms per step | calls per step |", "|---|---|---|"]
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    for e in events[:rows]:
        name = e.key if len(e.key) <= 70 else e.key[:67] + "..."
        lines.append(f"| {name} | {e.self_cpu_time_total / 1e3 / steps:.2f} | {e.count / steps:.1f} |")
    lines.append(f"| all ops | {total / 1e3 / steps:.2f} | |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rows", type=int, default=12, help="ops per profiler table")
    isa.add_argument(p)
    a = p.parse_args()
    isa.relaunch(a.isa, "bench.decode_profile")
    torch._inductor.config.cpp.enable_kernel_profile = True  # inductor's kernels by name in the profiler
    dtype = precision.dtype_of(a.dtype)
    model, args = model_utils.load_model(str(model_utils.smollm2_gguf()), device="cpu", dtype=dtype)
    bw = read_bandwidth()
    ws = step_matrices(model)
    nbytes = sum(w.numel() * w.element_size() for w in ws)
    print(f"host: {host_line()}; {torch.get_num_threads()} threads; decoding in {a.dtype}")
    print(f"read bandwidth {bw / 1e9:.1f} GB/s; a step reads {nbytes / 2**20:.0f} MiB -> at least "
          f"{nbytes / bw * 1e3:.1f} ms per token ({bw / nbytes:.0f} tok/s at batch 1)\n")
    print("| 121 one-row products per step | ms per step | GB/s |\n|---|---|---|")
    for name, t in matvec_table(ws, dtype):
        print(f"| {name} | {t * 1e3:.2f} | {nbytes / t / 1e9:.1f} |")
    print(f"\nmodel.linear's one-row kernel on this host (model.row_kernel, measured): {model_mod.row_kernel(dtype)}")
    prompt = torch.randint(100, args.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1)).tolist()
    steps = a.new_tokens - 1  # decode steps after the prefill
    for label, kw in (("eager", {}), ("compiled", {"compile": True})):
        generate(model, prompt, a.new_tokens, **kw)  # warm-up (compiles)
        t = time_step(lambda kw=kw: generate(model, prompt, a.new_tokens, **kw), rounds=3)
        print(f"\ngenerate() {label}: {a.new_tokens / t:.1f} tok/s ({t / steps * 1e3:.1f} ms per token, prefill "
              f"included); profile of one call, per decode step:\n")
        print(profile_table(lambda kw=kw: generate(model, prompt, a.new_tokens, **kw), a.rows, steps))
    return 0


if __name__ == "__main__":
    run_cli(main)
