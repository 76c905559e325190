"""WinoGrande: partial scoring the way lm-evaluation-harness defines it, batched and rank-aware.

A record is {"sentence", "option1", "option2", "answer"} (answer "1" or "2"; the official jsonl). The
sentence's blank "_" splits it (lm-eval `preprocess_winogrande`):
    context_i    = sentence[:blank] + option_i
    continuation = " " + sentence[blank + 1:].strip()        (lm-eval's target_delimiter " ")
Partial scoring (Trinh & Le 2018): the option whose context gives the SHARED continuation the higher summed
log-likelihood is the answer; acc = how often that is the labelled option (ties to option 1, as numpy's
argmax does). Tokenization is lm-eval's HFLM split (hellaswag_utils.encode_pair); BOS follows the
tokenizer's convention unless add_bos is given.

Batching: `batch_size` records (2 sequences each) per right-padded forward; only continuation positions go
through the LM head. Distributed: record i goes to rank i % world_size, every rank runs the same number of
batches (weight-0 padding), counts are all-reduced.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch

import precision
from data_preparation_utils import iter_jsonl
from errors import UserError, run_cli
from hellaswag_utils import (
    dist_info,
    encode_pair,
    first_argmax,
    resolve_add_bos,
    score_pairs,
)
from model_utils import load_model, tokenizer_source
from tokenizer import load_tokenizer

DEFAULT_DATA = "data/winogrande/winogrande_dev.jsonl"
REQUIRED_FIELDS = ("sentence", "option1", "option2", "answer")


@dataclass
class Item:
    contexts: tuple[str, str]
    continuation: str
    label: int  # 0 or 1


def render(doc: dict[str, Any]) -> Item:
    blank = doc["sentence"].index("_")
    contexts = (doc["sentence"][:blank] + doc["option1"], doc["sentence"][:blank] + doc["option2"])
    return Item(contexts, " " + doc["sentence"][blank + 1:].strip(), {"1": 0, "2": 1}[str(doc["answer"])])


def validate_record(doc: Any, where: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise UserError(f"{where}: a WinoGrande record must be a JSON object with {', '.join(REQUIRED_FIELDS)}")
    missing = [k for k in REQUIRED_FIELDS if k not in doc]
    if missing:
        raise UserError(f"{where}: missing field(s) {', '.join(missing)}; a WinoGrande record has "
                        f"{', '.join(REQUIRED_FIELDS)}")
    if not isinstance(doc["sentence"], str) or doc["sentence"].count("_") != 1:
        raise UserError(f"{where}: sentence must hold exactly one blank '_'")
    if str(doc["answer"]) not in ("1", "2"):
        raise UserError(f"{where}: answer is {doc['answer']!r}; expected \"1\" or \"2\"")
    return doc


def load_items(path: str | os.PathLike, limit: int | None = None) -> list[Item]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"WinoGrande file {p} does not exist: pass --data FILE (jsonl with "
                        f"{', '.join(REQUIRED_FIELDS)}) or set WINOGRANDE_PATH")
    lines = islice(iter_jsonl(p), None if limit is None else max(limit, 0))
    return [render(validate_record(doc, f"{p}:{lineno}")) for lineno, doc in lines]


def evaluate(model: torch.nn.Module, tokenizer: Any, items: list[Item], batch_size: int = 16,
             device: str | torch.device | None = None, dtype: torch.dtype | None = None, rank: int = 0,
             world_size: int = 1, add_bos: bool | None = None,
             stop_check: Callable[[], None] | None = None) -> dict[str, float | int]:
    """-> {"acc", "n"} over `items` (this rank's share; summed over ranks when a process group is up).
    stop_check runs before every batch (the same number on every rank) and may raise to abandon it."""
    import torch.distributed as dist

    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}; expected >= 1")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    bos = resolve_add_bos(tokenizer, add_bos)
    pad_id = getattr(tokenizer, "pad_id", None)
    pad_id = pad_id if isinstance(pad_id, int) and pad_id >= 0 else 0
    mine = [(it, 1) for it in items[rank::world_size]]
    per_rank = math.ceil(len(items) / world_size) if items else 0
    mine += [(items[0], 0)] * (per_rank - len(mine))  # equal batch counts on every rank; never counted
    was_training = model.training
    model.eval()
    right = n = 0
    try:
        for b in range(0, len(mine), batch_size):
            if stop_check is not None:
                stop_check()
            batch = mine[b : b + batch_size]
            pairs = [encode_pair(tokenizer, c, it.continuation, bos) for it, _ in batch for c in it.contexts]
            if any(not ctx for ctx, _ in pairs) or any(not cont for _, cont in pairs):
                raise UserError("a WinoGrande context or continuation encodes to no tokens: check the record")
            lls = score_pairs(model, pairs, device, dtype, pad_id)
            for j, (it, weight) in enumerate(batch):
                right += weight * (first_argmax(lls[2 * j : 2 * j + 2]) == it.label)
                n += weight
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([right, n], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        right, n = (int(v) for v in t.tolist())
    return {"acc": right / max(n, 1), "n": n}


_ITEMS_CACHE: dict[tuple[str, int | None], list[Item]] = {}


def winogrande_hook(model: torch.nn.Module, tokenizer: Any, path: str | os.PathLike, limit: int | None = None,
                    dtype: torch.dtype | None = None, stop_check: Callable[[], None] | None = None) -> dict:
    """For the training loop: every rank calls it; the first `limit` records of `path` (read once) are split
    over the ranks of the initialized process group; returns the global accuracy."""
    key = (str(path), limit)
    if key not in _ITEMS_CACHE:
        _ITEMS_CACHE[key] = load_items(path, limit)
    rank, world = dist_info(None, None)
    return evaluate(model, tokenizer, _ITEMS_CACHE[key], dtype=dtype, rank=rank, world_size=world,
                    stop_check=stop_check)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="WinoGrande acc (lm-evaluation-harness partial scoring) of any "
                                             "model source; prints one JSON line.")
    ap.add_argument("--model", required=True, help="checkpoint dir, Meta dir, HF dir or .gguf file")
    ap.add_argument("--tokenizer", default=None, help="tokenizer source (default: the model source)")
    ap.add_argument("--data", default=DEFAULT_DATA, help=f"WinoGrande jsonl (default {DEFAULT_DATA})")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16, help="records per forward (x2 sequences)")
    ap.add_argument("--dtype", choices=precision.CHOICES, default="fp32")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    if a.limit is not None and a.limit < 1:
        raise UserError(f"--limit {a.limit}; expected a positive number of records")
    items = load_items(a.data, a.limit)
    if not items:
        raise UserError(f"{a.data} holds no records")
    model, _ = load_model(a.model, device=a.device, dtype=precision.inference_dtype(a.dtype, a.device))
    tok = load_tokenizer(a.tokenizer or tokenizer_source(a.model))
    t0 = time.perf_counter()
    res = evaluate(model, tok, items, batch_size=a.batch_size, device=a.device)
    res["seconds"] = round(time.perf_counter() - t0, 3)
    print(json.dumps(res), flush=True)
    print(f"winogrande acc {res['acc']:.4f} on {res['n']} records", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
