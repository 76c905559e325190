"""HellaSwag: rendering and scoring the way lm-evaluation-harness does it, batched and rank-aware.

Rendering (lm-eval `tasks/hellaswag/utils.py`, `process_docs` + `preprocess`):
    context  = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
    endings  = [preprocess(e) for e in endings]
    each ending is scored as the continuation " " + ending (lm-eval's target_delimiter " ").

Tokenization (lm-eval HFLM `_encode_pair`, causal backend): trailing spaces of the context move to
the continuation; then whole = encode(context + continuation), ctx = encode(context) and the
continuation tokens are whole[len(ctx):]. A BOS token is prepended to the context when `add_bos`;
the default (None) follows the tokenizer's convention (`Tokenizer.wants_bos`), as lm-eval 0.4.13's HF
backend does unless it is given `add_bos_token=` (older lm-eval releases passed add_special_tokens=False:
no BOS). A tokenizer.json whose BOS token is named like Llama's but whose post-processor does not prepend
it therefore gets no BOS here, as in lm-eval.

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

Distributed: example i goes to rank i % world_size; every rank runs the same number of batches
(short ranks pad with weight-0 copies, which FSDP needs and which are never counted); the counts are
summed with all_reduce when torch.distributed is initialized.
"""

from __future__ import annotations

import argparse
import json
import math
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
import torch.nn.functional as F

import distributed as D
import precision
from data_preparation_utils import iter_jsonl
from errors import UserError, run_cli
from model import Transformer
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
def resolve_add_bos(tokenizer: Tokenizer, add_bos: bool | None) -> bool:
    """add_bos=None means the tokenizer's own convention (`Tokenizer.wants_bos`), which is also lm-eval
    0.4.13's default: its HF backend calls tokenizer.encode with the tokenizer's default add_special_tokens."""
    return tokenizer.wants_bos if add_bos is None else add_bos


def encode_pair(tokenizer: Any, context: str, continuation: str, add_bos: bool) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split exactly like lm-eval's HFLM._encode_pair."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, bos=False, eos=False)
    ctx = tokenizer.encode(context, bos=False, eos=False)
    cont = whole[len(ctx):]
    if add_bos:
        ctx = [tokenizer.bos_id] + ctx
    return ctx, cont


@dataclass
class _Encoded:
    ctx: list[int]
    conts: list[list[int]]  # 4 continuations
    char_lens: list[int]  # len(ending), lm-eval's acc_norm divisor
    label: int
    weight: int  # 1 = counted, 0 = padding example of a short rank


def _encode(tokenizer: Any, ex: Example, add_bos: bool, weight: int) -> _Encoded:
    pairs = [encode_pair(tokenizer, ex.context, " " + e, add_bos) for e in ex.endings]
    if not pairs[0][0]:  # nothing would predict the first ending token
        raise UserError(f"context {ex.context!r} encodes to no tokens and add_bos is off: give a context or --add-bos yes")
    for e, (_, cont) in zip(ex.endings, pairs, strict=True):
        if not cont:
            raise UserError(f"ending {e!r} of context {ex.context[:60]!r} encodes to no tokens")
    return _Encoded(pairs[0][0], [c for _, c in pairs], [len(e) for e in ex.endings], ex.label, weight)


# ---- scoring -------------------------------------------------------------------------------------------
def first_argmax(values: list[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """Our plain Transformer can return hidden states: project only the ending positions (the LM head
    over all positions is most of the memory at vocab 128k). Wrapped models take the generic path."""
    return model.output if type(model) is Transformer else None


def score_batch(model: torch.nn.Module, batch: list[_Encoded], device: torch.device, dtype: torch.dtype | None,
                max_len: int | None, pad_id: int) -> list[tuple[list[float], list[int]]]:
    """One right-padded forward over 4*len(batch) sequences -> per example (summed ll, n tokens) x 4."""
    pairs = [(enc.ctx, cont) for enc in batch for cont in enc.conts]
    lls = score_pairs(model, pairs, device, dtype, pad_id, max_len)
    return [(lls[4 * j : 4 * j + 4], [len(c) for c in enc.conts]) for j, enc in enumerate(batch)]


@torch.no_grad()
def score_pairs(model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]], device: torch.device,
                dtype: torch.dtype | None, pad_id: int, max_len: int | None = None) -> list[float]:
    """Summed log p(continuation | context) of each (context ids, continuation ids) pair, in one right-padded
    forward. A pair longer than max_len + 1 tokens keeps its end, as lm-eval does."""
    seqs, spans = [], []  # spans: (first target index, n continuation tokens) in the input frame
    for ctx, cont in pairs:
        full = ctx + cont
        if max_len is not None and len(full) > max_len + 1:
            full = full[-(max_len + 1):]
        inp = full[:-1]
        seqs.append(inp)
        spans.append((len(inp) - len(cont), len(cont)))
    T = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    targets = torch.zeros_like(tokens)
    sel = torch.zeros_like(tokens, dtype=torch.bool)
    for i, (s, (start, n), (_, cont)) in enumerate(zip(seqs, spans, pairs, strict=True)):
        tokens[i, : len(s)] = torch.tensor(s)
        targets[i, start : start + n] = torch.tensor(cont)
        sel[i, start : start + n] = True
    tokens, targets, sel = tokens.to(device), targets.to(device), sel.to(device)
    use_autocast = dtype is not None and dtype != next(model.parameters()).dtype
    with torch.autocast(device.type, dtype=dtype, enabled=use_autocast):
        head = output_head(model)
        if head is not None:  # hidden states of the M continuation positions, projected in chunks
            x = model(tokens, return_hidden=True)[sel]  # (M, dim)
        else:
            x, head = model(tokens)[sel], torch.nn.Identity()  # (N, T, V) -> (M, V): logits already
        logp = target_logprobs(head, x, targets[sel], torch.arange(len(x), device=device))  # (M,)
    per_seq = torch.zeros(len(seqs), dtype=torch.float64, device=device)
    row = torch.arange(len(seqs), device=device)[:, None].expand_as(sel)[sel]  # (M,) sequence of each token
    per_seq.index_add_(0, row, logp.double())
    return per_seq.tolist()


HEAD_CHUNK = 1024  # positions per LM-head matmul: bounds the (positions, vocab) logits in memory


def target_logprobs(head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor,
                     which: torch.Tensor) -> torch.Tensor:
    """log p(targets[j] | position which[j]) for hidden states h (M, dim), in chunks of positions so the
    (positions, vocab) logits stay bounded in memory."""
    out = torch.empty(len(targets), dtype=torch.float32, device=h.device)
    for a in range(0, len(h), HEAD_CHUNK):
        logp = F.log_softmax(head(h[a : a + HEAD_CHUNK]).float(), dim=-1)  # (m, V)
        j = ((which >= a) & (which < a + HEAD_CHUNK)).nonzero()[:, 0]
        out[j] = logp[which[j] - a, targets[j]]
    return out


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
        logp = target_logprobs(model.output, h.reshape(k * T, -1)[uniq.to(device)],
                                torch.tensor(targets, device=device), inverse.to(device))
    per_row = torch.zeros(4 * k, dtype=torch.float64, device=device)
    per_row.index_add_(0, torch.tensor(owner, device=device), logp.double())
    lls = per_row.tolist()
    return [(lls[4 * j : 4 * j + 4], [len(c) for c in e.conts]) for j, e in enumerate(batch)]


def dist_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return (dist.get_rank() if rank is None else rank, dist.get_world_size() if world_size is None else world_size)
    return (rank or 0, world_size or 1)


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
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
    every rank returns the global result. add_bos: see resolve_add_bos (None = tokenizer convention).
    shared_context: our Transformer computes each context once for its 4 endings (tree rows); False (or
    any other model) packs the 4 full sequences into one forward. Both give the same numbers.
    stop_check: called before every batch (the same number of batches on every rank); it may raise to
    abandon the evaluation (the training loop's stop signal).
    """
    import torch.distributed as dist

    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}; expected >= 1")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    bos = resolve_add_bos(tokenizer, add_bos)
    if bos and getattr(tokenizer, "bos_id", None) is None:
        raise UserError("add_bos=True but the tokenizer has no BOS token; pass add_bos=False")
    pad_id = getattr(tokenizer, "pad_id", None)
    pad_id = pad_id if isinstance(pad_id, int) and pad_id >= 0 else 0  # any id: padding never counts
    max_len = getattr(getattr(getattr(model, "module", model), "args", None), "max_seq_len", None)

    mine = examples[rank::world_size]
    per_rank = math.ceil(len(examples) / world_size) if examples else 0
    encoded = [_encode(tokenizer, ex, bos, 1) for ex in mine]
    if examples and len(encoded) < per_rank:  # equal batch counts on every rank; copies never counted
        pad = _encode(tokenizer, examples[0], bos, 0)
        encoded += [pad] * (per_rank - len(encoded))
    # longest first (as lm-eval orders requests): similar lengths share a batch, less padding. The
    # length is that of the tree row (context + all endings) or of the longest full sequence.
    tree = shared_context and output_head(model) is not None
    encoded.sort(key=lambda e: -(len(e.ctx) + (sum(map(len, e.conts)) if tree else max(map(len, e.conts)))))

    was_training = model.training
    model.eval()
    counts = [0.0, 0.0, 0.0, 0.0]  # acc, acc_norm, acc_token_norm, n
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(examples), desc="hellaswag", unit="ex", dynamic_ncols=True)
    try:
        for b in range(0, len(encoded), batch_size):
            if stop_check is not None:
                stop_check()
            batch = encoded[b : b + batch_size]
            fits = max_len is None or all(len(e.ctx) + max(map(len, e.conts)) <= max_len + 1 for e in batch)
            if tree and fits and not model.cache_len:
                scored = score_batch_tree(model, batch, device, dtype)
            else:
                scored = score_batch(model, batch, device, dtype, max_len, pad_id)
            for enc, (lls, ntoks) in zip(batch, scored, strict=True):
                if not enc.weight:
                    continue
                counts[0] += first_argmax(lls) == enc.label
                counts[1] += first_argmax([ll / c for ll, c in zip(lls, enc.char_lens, strict=True)]) == enc.label
                counts[2] += first_argmax([ll / n for ll, n in zip(lls, ntoks, strict=True)]) == enc.label
                counts[3] += 1
            if bar is not None:
                bar.update(min(len(batch) * world_size, len(examples) - bar.n))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    if dist.is_available() and dist.is_initialized() and world_size > 1:
        t = torch.tensor(counts, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        counts = t.tolist()
    n = int(counts[3])
    if n == 0:
        return {"acc": float("nan"), "acc_norm": float("nan"), "acc_token_norm": float("nan"), "n": 0}
    return {"acc": counts[0] / n, "acc_norm": counts[1] / n, "acc_token_norm": counts[2] / n, "n": n}


_EXAMPLES_CACHE: dict[tuple[str, int | None], list[Example]] = {}


def hellaswag_hook(model: torch.nn.Module, tokenizer: Any, path: str | os.PathLike, limit: int | None = None,
                   batch_size: int = 8, dtype: torch.dtype | None = None, add_bos: bool | None = None,
                   progress: bool = False, stop_check: Callable[[], None] | None = None) -> dict[str, float | int]:
    """For the training loop: every rank calls it; the first `limit` examples of `path` (read once and
    cached) are split over the ranks of the initialized process group; returns the global metrics."""
    key = (str(path), limit)
    if key not in _EXAMPLES_CACHE:
        _EXAMPLES_CACHE[key] = load_examples(path, limit)
    rank, world = dist_info(None, None)
    return evaluate(model, tokenizer, _EXAMPLES_CACHE[key], batch_size=batch_size, dtype=dtype,
                    rank=rank, world_size=world, progress=progress and rank == 0, add_bos=add_bos,
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
    res["add_bos"] = resolve_add_bos(tok, add_bos)
    if rank == 0:
        print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
