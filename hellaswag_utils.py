"""HellaSwag: rendering and scoring the way lm-evaluation-harness does it, batched and rank-aware.

Rendering (lm-eval `tasks/hellaswag/utils.py`, `process_docs` + `preprocess`):
    context  = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
    endings  = [preprocess(e) for e in endings]
    each ending is scored as the continuation " " + ending (lm-eval's target_delimiter " ").

Tokenization: lm-eval HFLM's context / continuation split and BOS convention (evaluation.encode_pair,
evaluation.resolve_add_bos).

Scores per example (ll_i = summed log-likelihood of ending i's tokens given the context):
    acc            argmax ll_i
    acc_norm       argmax ll_i / len(ending_i)       characters of the preprocessed ending, without
                                                    the leading space (lm-eval `process_results`)
    acc_token_norm argmax ll_i / n_tokens(ending_i)  nanoGPT / llm.c's per-token mean, reported apart
Ties go to the first ending, as numpy's argmax does.

Batching: `batch_size` examples per step, sorted by length. Our plain Transformer computes each context
ONCE for its four endings (score_batch_tree: one row per example holds the context and the four endings
side by side, with a tree-shaped attention mask and per-ending RoPE positions, so there is no padding
between endings); any other model (DDP/FSDP/compiled wrappers, HF models) gets the 4*batch_size full
sequences packed into one right-padded forward (score_batch). Both equal one forward per ending
(tests/test_hellaswag.py); only scored positions go through the LM head, in chunks.

Distributed (evaluation.run): example i goes to rank i % world_size; every rank runs the same number of
batches (short ranks pad with weight-0 copies, which FSDP needs and which are never counted); the counts are
summed with all_reduce when torch.distributed is initialized.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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

DEFAULT_DATA = "data/hellaswag/hellaswag_val.jsonl"
DEMO_DATA = "data/hellaswag/hellaswag_demo.jsonl"  # what `load_hellaswag_dataset.py --demo` writes
REQUIRED_FIELDS = ("activity_label", "ctx_a", "ctx_b", "endings", "label")


# ---- rendering ---------------------------------------------------------------------------------------
def preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleanup: the brackets are WikiHow artifacts ("[title]", "[step]", ...)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


@dataclass
class Example:
    context: str  # rendered query, e.g. "Roof shingle removal: A man is sitting on a roof. He"
    endings: list[str]  # 4 preprocessed endings, no leading space
    label: int


def render(doc: dict[str, Any]) -> Example:
    """One HellaSwag record (official jsonl or HF `Rowan/hellaswag`, label int or str) -> Example."""
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return Example(
        context=preprocess(doc["activity_label"] + ": " + ctx),
        endings=[preprocess(e) for e in doc["endings"]],
        label=int(doc["label"]),
    )


def validate_record(doc: Any, where: str) -> dict[str, Any]:
    """Check one decoded record; raise UserError naming `where` (file:line) and the problem."""
    if not isinstance(doc, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in doc]
    if missing:
        raise UserError(f"{where}: missing field(s) {', '.join(missing)}; a HellaSwag record needs "
                        f"{', '.join(REQUIRED_FIELDS)}")
    for k in ("activity_label", "ctx_a", "ctx_b"):
        if not isinstance(doc[k], str):
            raise UserError(f"{where}: field {k!r} must be a string, got {type(doc[k]).__name__}")
    endings = doc["endings"]
    if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
        raise UserError(f"{where}: 'endings' must be a list of 4 strings")
    try:
        label = int(doc["label"])
    except (TypeError, ValueError):
        label = -1
    if isinstance(doc["label"], bool) or not 0 <= label < 4:
        raise UserError(f"{where}: 'label' must be 0..3 (int or numeric string), got {doc['label']!r}")
    return doc


def data_path(path: str | os.PathLike) -> Path:
    """`path`; the default path, while absent, falls back to the demo set (with a note that it is demo data),
    so `load_hellaswag_dataset.py --demo` followed by an evaluation with default paths works."""
    p = Path(path)
    if not p.is_file() and p == Path(DEFAULT_DATA) and Path(DEMO_DATA).is_file():
        print(f"note: {DEFAULT_DATA} does not exist; evaluating the DEMO set {DEMO_DATA} (offline demo data, "
              "not a benchmark)", file=sys.stderr)
        return Path(DEMO_DATA)
    return p


def read_jsonl(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, Any]]:
    """Read and validate a HellaSwag jsonl (blank lines skipped); the first `limit` records."""
    p = data_path(path)
    if not p.is_file():
        raise UserError(f"HellaSwag file {p} does not exist; create it with `python load_hellaswag_dataset.py "
                        f"--source FILE` (or --demo) or pass --data FILE")
    # islice never reads the line after the limit-th record, so a bad line past the limit does not fail.
    lines = islice(iter_jsonl(p), None if limit is None else max(limit, 0))
    return [validate_record(doc, f"{p}:{lineno}") for lineno, doc in lines]


def load_examples(path: str | os.PathLike, limit: int | None = None) -> list[Example]:
    return [render(d) for d in read_jsonl(path, limit)]


# ---- tokenization ----------------------------------------------------------------------------------------
@dataclass
class _Encoded:
    ctx: list[int]
    conts: list[list[int]]  # 4 continuations
    char_lens: list[int]  # len(ending), lm-eval's acc_norm divisor
    label: int


def _encode(tokenizer: Tokenizer, ex: Example, add_bos: bool) -> _Encoded:
    pairs = [evaluation.encode_pair(tokenizer, ex.context, " " + e, add_bos) for e in ex.endings]
    if not pairs[0][0]:  # nothing would predict the first ending token
        raise UserError(f"context {ex.context!r} encodes to no tokens and add_bos is off: give a context or --add-bos yes")
    for e, (_, cont) in zip(ex.endings, pairs, strict=True):
        if not cont:
            raise UserError(f"ending {e!r} of context {ex.context[:60]!r} encodes to no tokens")
    return _Encoded(pairs[0][0], [c for _, c in pairs], [len(e) for e in ex.endings], ex.label)


# ---- scoring -------------------------------------------------------------------------------------------
def score_batch(model: torch.nn.Module, batch: list[_Encoded], device: torch.device, dtype: torch.dtype | None,
                max_len: int | None, pad_id: int) -> list[tuple[list[float], list[int]]]:
    """One right-padded forward over 4*len(batch) sequences -> per example (summed ll, n tokens) x 4."""
    pairs = [(enc.ctx, cont) for enc in batch for cont in enc.conts]
    lls = evaluation.score_pairs(model, pairs, device, dtype, pad_id, max_len)
    return [(lls[4 * j : 4 * j + 4], [len(c) for c in enc.conts]) for j, enc in enumerate(batch)]


@torch.no_grad()
def score_batch_tree(model: torch.nn.Module, batch: list[_Encoded], device: torch.device,
                     dtype: torch.dtype | None) -> list[tuple[list[float], list[int]]]:
    """Same numbers as score_batch, each context computed once and no padding between endings (our
    Transformer): one row per example holds the context followed by the four endings' input tokens,

        tokens     ctx_0 .. ctx_c-1 | e1_0 .. e1_n1-2 | e2_0 .. | e3_0 .. | e4_0 ..
        positions  0 .. c-1         | c .. c+n1-2     | c ..    | c ..    | c ..

    and an attention mask in which an ending token sees the context and the earlier tokens of its own
    ending only (a tree: what one forward per ending would see, at the same RoPE positions). The last
    context position predicts every ending's first token; ending token j predicts token j+1. Rows are
    right-padded to the longest in the batch (examples arrive sorted by length, so padding is small).
    """
    k = len(batch)
    rows_tok, rows_seg = [], []
    for e in batch:
        toks, seg = list(e.ctx), [0] * len(e.ctx)
        for i, c in enumerate(e.conts, 1):
            toks += c[:-1]
            seg += [i] * (len(c) - 1)
        rows_tok.append(toks)
        rows_seg.append(seg)
    T = max(map(len, rows_tok))
    tokens = torch.zeros(k, T, dtype=torch.long)
    segment = torch.full((k, T), -1, dtype=torch.long)  # 0 = context, 1..4 = ending, -1 = padding
    positions = torch.zeros(k, T, dtype=torch.long)
    which, targets, owner = [], [], []  # per scored token: flat (row * T + position), target id, 4*row+ending
    for r, (e, toks, seg) in enumerate(zip(batch, rows_tok, rows_seg, strict=True)):
        n, c = len(toks), len(e.ctx)
        tokens[r, :n] = torch.tensor(toks)
        segment[r, :n] = torch.tensor(seg)
        positions[r, :c] = torch.arange(c)
        off = c
        for i, cont in enumerate(e.conts):
            m = len(cont) - 1
            positions[r, off : off + m] = torch.arange(c, c + m)
            src = [r * T + c - 1] + list(range(r * T + off, r * T + off + m))  # predicts cont[0], cont[1], ...
            which += src
            targets += cont
            owner += [4 * r + i] * len(cont)
            off += m
    q, kk = segment[:, :, None], segment[:, None, :]  # query, key
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = causal & ((kk == 0) | (kk == q))  # padding queries see the context and earlier padding: no NaN
    uniq, inverse = torch.tensor(which).unique(return_inverse=True)  # the last context position is shared
    w = next(model.parameters())
    use_autocast = dtype is not None and dtype != w.dtype
    with torch.autocast(device.type, dtype=dtype, enabled=use_autocast):
        h = model(tokens.to(device), positions=positions.to(device), attn_mask=mask.to(device),
                  return_hidden=True)  # (k, T, dim)
        logp = evaluation.target_logprobs(evaluation.output_head(model), h.reshape(k * T, -1)[uniq.to(device)],
                                           torch.tensor(targets, device=device), inverse.to(device))
    per_row = torch.zeros(4 * k, dtype=torch.float64, device=device)
    per_row.index_add_(0, torch.tensor(owner, device=device), logp.double())
    lls = per_row.tolist()
    return [(lls[4 * j : 4 * j + 4], [len(c) for c in e.conts]) for j, e in enumerate(batch)]


# ---- the task ----------------------------------------------------------------------------------------------
METRICS = ("acc", "acc_norm", "acc_token_norm")


def evaluate(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    examples: list[Example],
    batch_size: int = 8,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    add_bos: bool | None = None,
    shared_context: bool = True,
    stop_check: Callable[[], None] | None = None,
) -> dict[str, float | int]:
    """Score `examples` -> {"acc", "acc_norm", "acc_token_norm", "n"} (see the module doc).

    batch_size: examples per forward (4x sequences). dtype: compute dtype via autocast when it differs
    from the model's (None = the model's). rank/world_size: this process's share (example i goes to
    rank i % world_size); when torch.distributed is initialized the counts are summed over ranks and
    every rank returns the global result. add_bos: see evaluation.resolve_add_bos (None = tokenizer
    convention). shared_context: our Transformer computes each context once for its 4 endings (tree rows);
    False (or any other model) packs the 4 full sequences into one forward. Both give the same numbers.
    stop_check: called before every batch (the same number of batches on every rank); it may raise to
    abandon the evaluation (the training loop's stop signal).
    """
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}; expected >= 1")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    bos = evaluation.resolve_add_bos(tokenizer, add_bos)
    task = hellaswag_task(model, tokenizer, bos, device, dtype, shared_context)
    sums, n = evaluation.run(model, task, examples, batch_size=batch_size, rank=rank, world_size=world_size,
                             device=device, stop_check=stop_check, progress=progress)
    if n == 0:
        return {**{k: float("nan") for k in METRICS}, "n": 0}
    return {**{k: sums[k] / n for k in METRICS}, "n": n}


def hellaswag_task(model: torch.nn.Module, tokenizer: Tokenizer, add_bos: bool, device: torch.device,
                   dtype: torch.dtype | None, shared_context: bool) -> evaluation.Task[Example, _Encoded]:
    """HellaSwag for evaluation.run: an example encodes to its context and 4 continuations; a batch is scored
    in one forward (tree rows or full rows) and each example counts 1 per metric whose argmax is the label.
    The share is sorted longest first (as lm-eval orders requests), by the length of the tree row (context +
    all endings) or of the longest full sequence, so similar lengths share a batch."""
    tree = shared_context and evaluation.output_head(model) is not None
    max_len = getattr(getattr(getattr(model, "module", model), "args", None), "max_seq_len", None)
    pad_id = evaluation.padding_id(tokenizer)

    def score(batch: list[_Encoded]) -> list[list[float]]:
        scored = _log_likelihoods(model, batch, device, dtype, max_len, pad_id, tree)
        return [_correct(enc, lls, ntoks) for enc, (lls, ntoks) in zip(batch, scored, strict=True)]

    def length(e: _Encoded) -> float:
        return -(len(e.ctx) + (sum(map(len, e.conts)) if tree else max(map(len, e.conts))))

    return evaluation.Task("hellaswag", METRICS, lambda ex: _encode(tokenizer, ex, add_bos), score, length)


def _log_likelihoods(model: torch.nn.Module, batch: list[_Encoded], device: torch.device, dtype: torch.dtype | None,
                     max_len: int | None, pad_id: int, tree: bool) -> list[tuple[list[float], list[int]]]:
    """Per example (summed ll, n tokens) x 4: tree rows when allowed and every full sequence fits the
    context window (and no KV cache is set up), else full right-padded rows (truncated as lm-eval does)."""
    fits = max_len is None or all(len(e.ctx) + max(map(len, e.conts)) <= max_len + 1 for e in batch)
    if tree and fits and not model.cache_len:
        return score_batch_tree(model, batch, device, dtype)
    return score_batch(model, batch, device, dtype, max_len, pad_id)


def _correct(enc: _Encoded, lls: list[float], ntoks: list[int]) -> list[float]:
    """1.0 / 0.0 per metric of METRICS: whether its argmax (raw, per character, per token) is the label."""
    by_char = [ll / c for ll, c in zip(lls, enc.char_lens, strict=True)]
    by_token = [ll / n for ll, n in zip(lls, ntoks, strict=True)]
    return [float(evaluation.first_argmax(v) == enc.label) for v in (lls, by_char, by_token)]


def hellaswag_hook(model: torch.nn.Module, tokenizer: Tokenizer, path: str | os.PathLike, limit: int | None = None,
                   batch_size: int = 8, dtype: torch.dtype | None = None, add_bos: bool | None = None,
                   progress: bool = False, stop_check: Callable[[], None] | None = None) -> dict[str, float | int]:
    """For the training loop: every rank calls it; the first `limit` examples of `path` (read once per
    process, evaluation.load_once) are split over the ranks of the initialized process group; returns the
    global metrics."""
    examples = evaluation.load_once("hellaswag", load_examples, path, limit)
    rank = D.rank()
    return evaluate(model, tokenizer, examples, batch_size=batch_size, dtype=dtype, rank=rank,
                    world_size=D.world_size(), progress=progress and rank == 0, add_bos=add_bos,
                    stop_check=stop_check)


# ---- CLI ------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="HellaSwag acc / acc_norm (lm-evaluation-harness definitions) "
                                             "of any model source; prints one JSON line.")
    ap.add_argument("--model", required=True, help="checkpoint dir, Meta dir, HF dir or .gguf file")
    ap.add_argument("--tokenizer", default=None, help="tokenizer source (default: the model source)")
    ap.add_argument("--data", default=DEFAULT_DATA, help=f"HellaSwag jsonl (default {DEFAULT_DATA}, else the "
                    f"demo set {DEMO_DATA} when only that exists)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate the first N examples")
    ap.add_argument("--batch-size", type=int, default=8, help="examples per forward (x4 sequences)")
    ap.add_argument("--dtype", choices=precision.CHOICES, default="fp32",
                    help="compute dtype (default fp32: scores comparable with lm-evaluation-harness; auto = the "
                         "fastest the device does natively)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: auto)")
    ap.add_argument("--add-bos", choices=("auto", "yes", "no"), default="auto",
                    help="prepend BOS to the context; auto = the tokenizer's convention")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.limit is not None and a.limit < 1:
        raise UserError(f"--limit {a.limit}; expected a positive number of examples")

    device = a.device or ("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available()
                          else "cpu")
    examples = load_examples(a.data, a.limit)
    if not examples:
        raise UserError(f"{a.data} holds no examples")
    info = D.init_distributed(device)
    rank, world = info.rank, info.world_size
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    model, _ = load_model(a.model, device=device, dtype=precision.inference_dtype(a.dtype, device))
    tok = load_tokenizer(a.tokenizer or tokenizer_source(a.model))
    add_bos = {"auto": None, "yes": True, "no": False}[a.add_bos]
    t0 = time.perf_counter()
    res = evaluate(model, tok, examples, batch_size=a.batch_size, device=device, rank=rank, world_size=world,
                   progress=not a.no_progress, add_bos=add_bos)
    res["seconds"] = round(time.perf_counter() - t0, 3)
    res["add_bos"] = evaluation.resolve_add_bos(tok, add_bos)
    if rank == 0:
        print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
