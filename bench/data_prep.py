"""Data pipeline throughput: our prep (tokenize + shard writing + hashes) vs raw tiktoken, and loader time.

    python -m bench.data_prep [--mb 50] [--workers 1 2]

1. Text: the embedded corpus repeated to >= --mb MB. For each worker count W the same run times
   raw `tiktoken.Encoding.encode_ordinary_batch(docs, num_threads=W)` (no BOS/EOS, no files) and
   `data_preparation_utils.prepare("pretrain", ..., workers=W)` (BOS/EOS, split, .npy shards, sha256,
   manifest). Target: ours >= 80% of raw at the same W.
2. Loader: mean `next_batch()` time of the pretrain loader vs one `tiny` training step (forward+backward of
   model.Transformer, tiny preset, micro-batch 4, seq 256, fp32) on this CPU.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import data_preparation_utils as dpu
import dataloaders
import tokenizer

ROOT = Path(__file__).resolve().parent.parent


def corpus(min_mb: float) -> list[str]:
    base = list(tokenizer.embedded_corpus())
    size = sum(len(d.encode()) for d in base)
    reps = int(min_mb * 1e6 // size) + 1
    return base * reps


def time_raw(tok, docs: list[str], workers: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    ids = tok.model.encode_ordinary_batch(docs, num_threads=workers)
    return time.perf_counter() - t0, sum(map(len, ids))


def time_prep(tok, docs: list[str], workers: int, out: Path) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    m = dpu.prepare("pretrain", docs, out, dpu.PretrainEncoder(tok), tokenizer_identity=tok.identity(),
                    source="bench", seed=0, val_fraction=0.01, shard_size=10_000_000, workers=workers,
                    progress=False)
    dt = time.perf_counter() - t0
    return dt, m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]


def loader_vs_step(data_dir: Path, tok) -> tuple[float, float]:
    import config
    from model import Transformer

    cfg = config.load_config(None, {"MODEL_PRESET": "tiny"}, use_environ=False)
    args = cfg.model_args(tok.vocab_size)
    B, T = 4, 256
    ld = dataloaders.build_loader("pretrain", data_dir, "train", seq_len=T, micro_batch=B, global_batch=B, rank=0,
                                  world_size=1, seed=0, pad_id=tok.pad_id, tokenizer_identity=tok.identity())
    for _ in range(5):
        ld.next_batch()
    n = 300
    t0 = time.perf_counter()
    for _ in range(n):
        batch = ld.next_batch()
    t_load = (time.perf_counter() - t0) / n
    torch.manual_seed(0)
    model = Transformer(args)
    model.train()

    def step() -> None:
        logits = model(batch["input_ids"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        loss.backward()

    step()
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    return t_load, (time.perf_counter() - t0) / 3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=50.0)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokenizer", default=str(ROOT / "tokenizer.model"))
    args = p.parse_args()
    tok = tokenizer.load_tokenizer(args.tokenizer)
    docs = corpus(args.mb)
    mb = sum(len(d.encode()) for d in docs) / 1e6
    print(f"text: {len(docs):,} documents, {mb:.1f} MB; tokenizer {Path(tok.source).name} (vocab {tok.vocab_size})")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "shards"
        for w in args.workers:
            t_raw, n_raw = time_raw(tok, docs, w)
            t_ours, n_ours = time_prep(tok, docs, w, out)
            rows.append((w, mb / t_raw, n_raw / t_raw, mb / t_ours, n_ours / t_ours, t_raw / t_ours))
        t_load, t_step = loader_vs_step(out, tok)
    print("\n| workers | raw tiktoken MB/s | raw tok/s | ours MB/s | ours tok/s | ours / raw |")
    print("|---|---|---|---|---|---|")
    for w, rm, rt, om, ot, ratio in rows:
        print(f"| {w} | {rm:.2f} | {rt:,.0f} | {om:.2f} | {ot:,.0f} | {ratio:.0%} |")
    print(f"\nloader next_batch (pretrain, B=4, T=256): {t_load * 1e3:.3f} ms; tiny train step (fwd+bwd, fp32): "
          f"{t_step * 1e3:.0f} ms; loader/step = {t_load / t_step:.3%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
