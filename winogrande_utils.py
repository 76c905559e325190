"""WinoGrande: partial scoring the way lm-evaluation-harness defines it, batched and rank-aware.

A record is {"sentence", "option1", "option2", "answer"} (answer "1" or "2"; the official jsonl). The
sentence's blank "_" splits it (lm-eval `preprocess_winogrande`):
    context_i    = sentence[:blank] + option_i
    continuation = " " + sentence[blank + 1:].strip()        (lm-eval's target_delimiter " ")
Partial scoring (Trinh & Le 2018): the option whose context gives the SHARED continuation the higher summed
log-likelihood is the answer; acc = how often that is the labelled option (ties to option 1, as numpy's
argmax does). Tokenization is lm-eval's HFLM split (evaluation.encode_pair); BOS follows the tokenizer's
convention unless add_bos is given.

Batching: `batch_size` records (2 sequences each) per right-padded forward; only continuation positions go
through the LM head. Distributed (evaluation.run): record i goes to rank i % world_size, every rank runs the
same number of batches (weight-0 padding), counts are all-reduced.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch

import distributed as D
import evaluation
import precision
from data_preparation_utils import iter_jsonl
from errors import UserError, run_cli
from model_utils import load_model, tokenizer_source
from tokenizer import Tokenizer, load_tokenizer

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


@dataclass
class _Encoded:
    pairs: list[tuple[list[int], list[int]]]  # (context ids, continuation ids) per option
    label: int


def _encode(tokenizer: Tokenizer, item: Item, add_bos: bool) -> _Encoded:
    pairs = [evaluation.encode_pair(tokenizer, c, item.continuation, add_bos) for c in item.contexts]
    if any(not ctx for ctx, _ in pairs) or any(not cont for _, cont in pairs):
        raise UserError("a WinoGrande context or continuation encodes to no tokens: check the record")
    return _Encoded(pairs, item.label)


def winogrande_task(model: torch.nn.Module, tokenizer: Tokenizer, add_bos: bool, device: torch.device,
                    dtype: torch.dtype | None) -> evaluation.Task[Item, _Encoded]:
    """WinoGrande for evaluation.run: a batch's 2 sequences per record in one right-padded forward; a record
    counts 1 when the option with the higher log-likelihood of the continuation is the labelled one."""
    pad_id = evaluation.padding_id(tokenizer)

    def score(batch: list[_Encoded]) -> list[list[float]]:
        lls = evaluation.score_pairs(model, [p for enc in batch for p in enc.pairs], device, dtype, pad_id)
        return [[float(evaluation.first_argmax(lls[2 * j : 2 * j + 2]) == enc.label)]
                for j, enc in enumerate(batch)]

    return evaluation.Task("winogrande", ("acc",), lambda it: _encode(tokenizer, it, add_bos), score)


def evaluate(model: torch.nn.Module, tokenizer: Tokenizer, items: list[Item], batch_size: int = 16,
             device: str | torch.device | None = None, dtype: torch.dtype | None = None, rank: int = 0,
             world_size: int = 1, add_bos: bool | None = None,
             stop_check: Callable[[], None] | None = None) -> dict[str, float | int]:
    """-> {"acc", "n"} over `items` (this rank's share; summed over ranks when a process group is up).
    stop_check runs before every batch (the same number on every rank) and may raise to abandon it."""
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}; expected >= 1")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    task = winogrande_task(model, tokenizer, evaluation.resolve_add_bos(tokenizer, add_bos), device, dtype)
    sums, n = evaluation.run(model, task, items, batch_size=batch_size, rank=rank, world_size=world_size,
                             device=device, stop_check=stop_check)
    return {"acc": sums["acc"] / max(n, 1), "n": n}


def winogrande_hook(model: torch.nn.Module, tokenizer: Tokenizer, path: str | os.PathLike, limit: int | None = None,
                    dtype: torch.dtype | None = None, stop_check: Callable[[], None] | None = None) -> dict:
    """For the training loop: every rank calls it; the first `limit` records of `path` (read once per process,
    evaluation.load_once) are split over the ranks of the initialized process group; returns the global
    accuracy."""
    items = evaluation.load_once("winogrande", load_items, path, limit)
    return evaluate(model, tokenizer, items, dtype=dtype, rank=D.rank(), world_size=D.world_size(),
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
