"""Memory and FLOPs of a LoRA recipe config on its real model shape, without the weights or a GPU.

    python -m bench.recipe_memory configs/llama3.2-1b-sft-lora.env configs/llama3.2-1b-dpo-lora.env

For each config: the model shape of MODEL_PRESET (default llama3.2-1b; the recipe's INIT_FROM is not read),
the config's LoRA adapters, precision (bf16 autocast), activation checkpointing and stage (SFT or DPO with
the reference forward). Counted exactly:
- resident bytes: the frozen base as training holds it under bf16 (Linear weights bf16, embeddings and norms
  fp32: train.hold_frozen_base_in), the LoRA parameters with their fp32 gradients and AdamW's two moments;
- saved activations: the bytes autograd keeps from one micro-step's forward to its backward, summed with
  torch.autograd.graph.saved_tensors_hooks (each storage once; parameters excluded, they are resident).
  Measured on CPU with one and two layers and single rows, then fitted exactly as a + b*L + c*tokens + d*L*tokens
  (per-token tensors grow with tokens, per-layer ones with layers; attention keeps no T x T matrix with
  SDPA) and evaluated at the config's layers and micro-batch tokens. With activation checkpointing the
  backward of a block recomputes that block: one block's non-checkpointed activations come on top.
- for DPO, the reference forward's transient head: the model's fused per-row log-probs (fused_ce) hold the
  bf16 copies of the fp32 head weight and hidden states and one chunk of CHUNK_ROWS positions' logits at a
  time, in bf16 and their fp32 copy (6 bytes per logit), never the micro-batch's (rows, T, V) logits;
- FLOPs an optimizer step executes (step_flops), and the hours they take at an ASSUMED fraction (--mfu) of
  the GPUs' dense bf16 datasheet peaks: a planning figure, not a measurement.
Not counted: the CUDA context, the caching allocator's slack and a backward kernel's transient buffers.
Hence "estimate" in the output: leave a few GB of headroom. The figures also go to bench/results/recipe_memory.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import config
import distributed
import lora
import model_utils
import objectives
import precision
import train
from fused_ce import CHUNK_ROWS
from model import Transformer

ROOT = Path(__file__).resolve().parent.parent

GB = 1e9


def saved_bytes(cfg: config.Config, n_layers: int, seq_len: int, rows: int) -> int:
    """Bytes autograd saves in one forward of the config's objective (n_layers, seq_len, rows per micro-batch)."""
    args = cfg.model_args()
    args.n_layers, args.max_seq_len = n_layers, max(seq_len, 16)
    torch.manual_seed(0)
    model = Transformer(args)
    lo = cfg.lora
    lora.apply_lora(model, lo.lora_target_modules, lo.lora_rank, lo.lora_alpha, lo.lora_dropout)
    model.train()
    distributed.parallelize(model, cfg, torch.device("cpu"))
    objective = objectives.build_objective(cfg)
    objective.setup(model, None, torch.device("cpu"))
    ids = torch.randint(0, args.vocab_size, (rows, seq_len))
    labels = ids.roll(-1, 1)
    if cfg.training.training_stage == "dpo":
        half = seq_len // 2
        labels[:, :half] = -100  # a prompt of half the row
        batch = {"chosen_input_ids": ids, "chosen_labels": labels, "rejected_input_ids": ids.flip(0),
                 "rejected_labels": labels.flip(0), "sample_index": torch.arange(rows)}
    else:
        batch = {"input_ids": ids, "labels": labels, "sample_index": torch.arange(rows)}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = objective.loss(model, batch)
    del loss
    return sum(seen.values())


def fit(cfg: config.Config) -> tuple[float, float, float, float]:
    """Exact fit of saved bytes = a + b*L + c*N + d*L*N (N = tokens of the micro-batch, both rows of a DPO
    pair) from four single-row runs. SFT rows are long enough (>= 0.4 dim tokens) for the fused LM head +
    loss that fused_ce.head_loss picks at the recipe's micro-batch."""
    dpo = cfg.training.training_stage == "dpo"
    pts = [(L, T) for L in (1, 2) for T in ((256, 512) if dpo else (1024, 2048))]
    y = torch.tensor([float(saved_bytes(cfg, L, T, 1)) for L, T in pts], dtype=torch.float64)
    rows = 2 if dpo else 1
    A = torch.tensor([[1.0, L, rows * T, L * rows * T] for L, T in pts], dtype=torch.float64)
    a, b, c, d = torch.linalg.solve(A, y).tolist()
    return a, b, c, d


def reference_head_bytes(args, tokens: int) -> int:
    """Transient bytes of a reference forward's head over `tokens` positions under bf16 autocast with fp32
    weights: fused_sequence_logps under no_grad holds the bf16 copies of the head weight (V, d) and the hidden
    states (tokens, d), and one chunk's logits at a time, bf16 (2 B) and their fp32 copy (4 B)."""
    return 6 * min(CHUNK_ROWS, tokens) * args.vocab_size + 2 * (args.vocab_size + tokens) * args.dim


def step_flops(args, seq_len: int, stage: str, recompute: bool, total_batch_tokens: int) -> float:
    """FLOPs one optimizer step executes. Per token: forward 2N + 4 L d T (N = weights in a matmul,
    model_utils.flops_per_token's count; attention scores and weighted sum without the causal halving);
    backward with frozen base weights only propagates input gradients, 2N + 8 L d T (LoRA's own small
    matmuls are left out); activation checkpointing repeats the forward. A DPO step runs chosen and
    rejected rows (two rows per pair of TOTAL_BATCH_SIZE / T) and one more forward for the reference."""
    n = model_utils.flops_per_token(args, 0) / 6  # 6N at T = 0 -> N
    fwd = 2 * n + 4 * args.n_layers * args.dim * seq_len
    bwd = 2 * n + 8 * args.n_layers * args.dim * seq_len
    per_token = fwd + bwd + (fwd if recompute else 0.0)
    if stage == "dpo":
        return 2 * total_batch_tokens * (per_token + fwd)
    return total_batch_tokens * per_token


def report(env_file: str, peak_tflops: dict[str, float], mfu: float) -> dict:
    cfg = config.load_config(env_file, {"MODEL_PRESET": "llama3.2-1b", "DEVICE": "cpu"})
    args = cfg.model_args()
    stage, t, lo = cfg.training.training_stage, cfg.training, cfg.lora
    T, B = cfg.model.max_seq_len, t.max_batch_size
    rows = 2 * B if stage == "dpo" else B  # a DPO micro-batch is B pairs = 2B sequences
    with torch.device("meta"):  # shapes only
        model = Transformer(args)
    n_params = model_utils.count_parameters(model)
    lora.apply_lora(model, lo.lora_target_modules, lo.lora_rank, lo.lora_alpha, lo.lora_dropout)
    n_lora = sum(p.numel() for p in lora.lora_parameters(model))
    train.hold_frozen_base_in(model, precision.resolve("bf16", "cpu"))  # the frozen Linear weights in bf16
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)  # ties once
    del model
    adapters = 16 * n_lora  # LoRA fp32 param + grad + 2 AdamW moments

    a, b, c, d = fit(cfg)
    tokens = rows * T
    acts = a + b * args.n_layers + c * tokens + d * args.n_layers * tokens
    extra = 0.0
    if cfg.system.activation_checkpointing:
        plain = config.load_config(env_file, {"MODEL_PRESET": "llama3.2-1b", "DEVICE": "cpu",
                                              "ACTIVATION_CHECKPOINTING": "false"})
        pa, pb, pc, pd = fit(plain)
        extra = pb + pd * tokens  # one block recomputed in backward
        no_ac = pa + pb * args.n_layers + pc * tokens + pd * args.n_layers * tokens
    # DPO: the reference forward runs after the policy's, while the policy's activations are held
    reference = float(reference_head_bytes(args, tokens)) if stage == "dpo" else 0.0
    total = weights + adapters + acts + extra + reference
    print(f"\n{env_file}: {stage}, {args.n_layers} layers, dim {args.dim}, vocab {args.vocab_size}, "
          f"micro-batch {rows} x {T} tokens, LoRA r={lo.lora_rank} on {','.join(lo.lora_target_modules)}")
    print(f"  parameters {n_params / 1e9:.3f} B, LoRA {n_lora / 1e6:.2f} M")
    print(f"  frozen base (bf16 Linear weights, fp32 embeddings and norms) {weights / GB:6.2f} GB")
    print(f"  LoRA params + grads + AdamW moments  {adapters / GB:6.2f} GB")
    print(f"  saved activations (bf16 autocast)    {acts / GB:6.2f} GB   ({d / 1e3:.1f} kB per token per layer, "
          f"{c / 1e3:.1f} kB per token outside the layers, {b / 1e6:.1f} MB per layer, {a / 1e6:.1f} MB fixed)")
    if cfg.system.activation_checkpointing:
        print(f"  + one block recomputed in backward   {extra / GB:6.2f} GB   (without checkpointing the "
              f"activations would be {no_ac / GB:.1f} GB: {pd / 1e3:.1f} kB per token per layer)")
    if reference:
        print(f"  + reference forward's logits         {reference / GB:6.2f} GB   (bf16 head + one {min(CHUNK_ROWS, tokens)}"
              "-position chunk of logits, transient)")
    print(f"  estimate without CUDA context / allocator slack: {total / GB:.1f} GB")
    flops = step_flops(args, T, stage, cfg.system.activation_checkpointing, t.total_batch_size) * t.max_steps
    print(f"  executed FLOPs: {flops / t.max_steps / 1e15:.3f} PFLOP per step, {flops / 1e18:.2f} EFLOP for "
          f"MAX_STEPS={t.max_steps}")
    for gpu, peak in peak_tflops.items():
        hours = flops / (peak * 1e12 * mfu) / 3600
        print(f"  {gpu} (bf16 dense {peak:.0f} TFLOP/s) at an assumed {mfu:.0%} of it: {hours:.1f} h")
    return {"stage": stage, "micro_batch_rows": rows, "seq_len": T, "parameters": n_params, "lora_parameters": n_lora,
            "weights_gb": weights / GB, "adapters_gb": adapters / GB, "activations_gb": acts / GB,
            "recomputed_block_gb": extra / GB, "activations_without_checkpointing_gb": no_ac / GB if extra else None,
            "reference_logits_gb": reference / GB, "estimate_gb": total / GB, "max_steps": t.max_steps,
            "flops": flops, "hours_at_assumed_mfu": {gpu: flops / (peak * 1e12 * mfu) / 3600
                                                     for gpu, peak in peak_tflops.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("env_files", nargs="+")
    ap.add_argument("--mfu", type=float, default=0.35, help="assumed model FLOPs utilization for the time figure")
    a = ap.parse_args()
    peaks = {name: p["bf16"] / 1e12 for name, p in precision.GPU_PEAKS if name in ("A100", "L4", "H100")}
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {Path(f).name: report(f, peaks, a.mfu) for f in a.env_files}
    from bench import results_file

    print(results_file.write("recipe_memory", "python -m bench.recipe_memory " + " ".join(sys.argv[1:]),
                             {"assumed_mfu": a.mfu, "gpu_bf16_tflops": peaks, "configs": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
