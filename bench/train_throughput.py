"""Training-step throughput: our Transformer vs transformers' LlamaForCausalLM, same config and weights.

    python -m bench.train_throughput --preset small [--precision auto|bf16|fp32] [--compile] [--batch 2] [--rounds 3]

One training step = forward (autocast for bf16) -> summed CE / targets -> backward -> fused AdamW step
-> zero_grad, identical for both models. The models alternate A B A B in one process (so drifting
machine load hits both alike); the median step time per model gives tokens/s, which here are positions
(batch x seq, every one a target, so positions and loss tokens coincide). MFU is defined as in the training
log: the step's FLOPs (model_utils.model_flops, 6N + 12LdT per position at the batch's width) over the peak
the training log uses (precision.peak_flops: on CPU a 1024^3 matmul in the same dtype, measured in the
same run). Peak memory per model is measured in a fresh subprocess each
(CUDA: max_memory_allocated; CPU: growth of the process's peak RSS, VmHWM, over the post-import
baseline).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import config
import model_formats
import model_utils
import objectives
import precision as precision_mod
from errors import run_cli
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent.parent


def model_args(preset: str, vocab: int, seq: int | None) -> ModelArgs:
    cfg = config.load_config(None, {"MODEL_PRESET": preset, "VOCAB_SIZE": str(vocab), "ATTN_IMPL": "auto",
                                    **({"MAX_SEQ_LEN": str(seq)} if seq else {})}, use_environ=False)
    return cfg.model_args(vocab)


def build_pair(args: ModelArgs, device: torch.device):
    """(ours, hf) with identical weights: HF gets ours through the production converter (q/k permutation)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ours = Transformer(args)
    ours.init_weights(generator=torch.Generator().manual_seed(0))
    hf_cfg = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
                         num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                         num_key_value_heads=args.n_kv_heads, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
                         max_position_embeddings=args.max_seq_len, tie_word_embeddings=args.tie_embeddings,
                         attention_bias=False, mlp_bias=False)
    hf = LlamaForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict(model_formats.ours_to_hf(ours.state_dict(), args), strict=False)
    assert not unexpected and all("rotary" in k or (args.tie_embeddings and "lm_head" in k) for k in missing)
    return ours.to(device).train(), hf.to(device).train()


def logits_fn(name: str, model):
    if name == "ours":
        return lambda x: model(x)
    return lambda x: model(input_ids=x, use_cache=False).logits


def make_step(name: str, model, prec: str, device: torch.device):
    fwd = logits_fn(name, model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cuda", "cpu"))
    dtype = precision_mod.dtype_of(prec)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if name == "ours":  # the training loop's own loss (fuses the LM head with the CE)
                loss = objectives.Pretrain().loss(model, {"input_ids": x, "labels": y})[0] / y.numel()
            else:
                loss = objectives.cross_entropy_sum(fwd(x), y) / y.numel()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def memory_probe(name: str, a: argparse.Namespace) -> int:
    """Peak bytes of 2 training steps of one model, measured in this (fresh) process."""
    device = torch.device(a.device)
    args = model_args(a.preset, a.vocab, a.seq)
    base = _hwm_kib()
    pair = build_pair(args, device)
    model = pair[0] if name == "ours" else pair[1]
    del pair
    if a.compile:
        model.compile()
    step = make_step(name, model, a.precision, device)
    x = torch.randint(0, args.vocab_size, (a.batch, args.max_seq_len), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step(x, x)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return (_hwm_kib() - base) * 1024


def _hwm_kib() -> int:
    """Peak resident set of this process (VmHWM). Not ru_maxrss: that one survives fork+exec, so a child
    would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only); run on CUDA or Linux")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--precision", choices=precision_mod.CHOICES, default="auto",
                   help="auto = the training loop's rule for this device")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--memory-probe", choices=("ours", "hf"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    a = p.parse_args()
    if a.memory_probe:
        print(memory_probe(a.memory_probe, a))
        return 0
    device = torch.device(a.device)
    a.precision = precision_mod.resolve(a.precision, device).name
    args = model_args(a.preset, a.vocab, a.seq)
    T = args.max_seq_len
    ours, hf = build_pair(args, device)
    x = torch.randint(0, args.vocab_size, (a.batch, T), device=device, generator=None)
    with torch.no_grad():  # same weights -> same logits (fp32): the comparison is apples to apples
        d = (logits_fn("ours", ours)(x[:1, :64]).float() - logits_fn("hf", hf)(x[:1, :64]).float()).abs().max()
    if a.compile:
        ours.compile()
        hf.compile()
    steps = {"ours": make_step("ours", ours, a.precision, device), "hf": make_step("hf", hf, a.precision, device)}
    for s in steps.values():  # warm-up (and compilation)
        s(x, x)
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    for _ in range(a.rounds):
        for name, s in steps.items():  # A B A B
            for _ in range(a.steps):
                sync(device)
                t0 = time.perf_counter()
                s(x, x)
                sync(device)
                times[name].append(time.perf_counter() - t0)
    peak, peak_source = precision_mod.peak_flops(device, a.precision)
    if peak is None:
        raise SystemExit(f"no peak FLOP/s for MFU: {peak_source}")
    flops = model_utils.model_flops(args, a.batch, T)  # one step's forward + backward, as train.py counts it
    tokens = a.batch * T
    res = {"preset": a.preset, "precision": a.precision, "compile": a.compile, "device": str(device),
           "tokens_per_step": tokens, "params": model_utils.count_parameters(ours),
           "max_logit_diff_fp32_init": float(d), "matmul_peak_tflops": peak / 1e12,
           "peak_source": peak_source, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    for name in steps:
        med = statistics.median(times[name])
        res[f"{name}_tokens_per_s"] = tokens / med
        res[f"{name}_mfu"] = flops / med / peak
    res["ratio_ours_over_hf"] = res["ours_tokens_per_s"] / res["hf_tokens_per_s"]
    del ours, hf, steps
    for name in ("ours", "hf"):
        cmd = [sys.executable, "-m", "bench.train_throughput", "--memory-probe", name, "--preset", a.preset,
               "--precision", a.precision, "--vocab", str(a.vocab), "--batch", str(a.batch), "--device", a.device,
               *(["--seq", str(a.seq)] if a.seq else []), *(["--compile"] if a.compile else [])]
        probe = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
        out = probe.stdout.strip().splitlines()[-1]
        res[f"{name}_peak_memory_mb"] = int(out) / 2**20
    if a.json:
        print(json.dumps(res))
        return 0
    print(f"preset {a.preset} ({res['params'] / 1e6:.1f}M params), {a.precision}{' + compile' if a.compile else ''}, "
          f"{device}, {tokens} tokens/step, matmul peak {peak / 1e12:.3f} TFLOP/s ({peak_source})")
    print(f"{'':<6} {'tokens/s':>10} {'MFU':>7} {'peak MB':>9}")
    for name in ("ours", "hf"):
        print(f"{name:<6} {res[f'{name}_tokens_per_s']:>10,.0f} {res[f'{name}_mfu']:>7.1%} "
              f"{res[f'{name}_peak_memory_mb']:>9,.0f}")
    print(f"ratio ours/hf: {res['ratio_ours_over_hf']:.2f}x  (initial fp32 logits max diff "
          f"{res['max_logit_diff_fp32_init']:.1e})")
    return 0


if __name__ == "__main__":
    run_cli(main)
