"""What every evaluation task shares: lm-evaluation-harness's context / continuation tokenization, the summed
log-likelihood of continuations, and one pass of a task over this rank's share of the examples.

A task (`hellaswag_utils`, `winogrande_utils`) is a `Task`: how to encode one example and how to score a
batch of encoded examples into counts (e.g. [correct]). `run` does the rest, the same way for every task:
    sharding     example i goes to rank i % world_size; a rank with fewer than ceil(N / world_size) examples
                 gets weight-0 copies of example 0, so every rank runs the same number of batches (FSDP's
                 forwards are collective); the copies are never counted
    scoring      eval mode, no autograd, the stop check before every batch (it may raise to abandon the
                 pass: the training loop's stop signal), the model's train/eval mode restored afterwards
    aggregation  each example's counts times its weight, summed, then summed over ranks (all_reduce) when a
                 process group is initialized and world_size > 1: every rank returns the global totals

Tokenization (lm-eval HFLM `_encode_pair`, causal backend): trailing spaces of the context move to the
continuation; then whole = encode(context + continuation), ctx = encode(context) and the continuation tokens
are whole[len(ctx):]. A BOS token is prepended to the context when `add_bos`; the default (None) follows the
tokenizer's convention (`Tokenizer.wants_bos`), as lm-eval 0.4.13's HF backend does unless it is given
`add_bos_token=` (older lm-eval releases passed add_special_tokens=False: no BOS). A tokenizer.json whose BOS
token is named like Llama's but whose post-processor does not prepend it therefore gets no BOS here, as in
lm-eval.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
import torch.nn.functional as F

import distributed as D
import families
from errors import UserError
from tokenizer import Tokenizer

T = TypeVar("T")  # an example as the task renders it
E = TypeVar("E")  # an example as the task's scorer reads it (token ids)


# ---- tokenization ----------------------------------------------------------------------------------------
NO_BOS = "add_bos is on but the tokenizer has no BOS token; pass add_bos=False"


def resolve_add_bos(tokenizer: Tokenizer, add_bos: bool | None) -> bool:
    """add_bos=None means the tokenizer's own convention (`Tokenizer.wants_bos`), which is also lm-eval
    0.4.13's default: its HF backend calls tokenizer.encode with the tokenizer's default add_special_tokens.
    Refused before any example is encoded: add_bos=True for a tokenizer without a BOS token."""
    if add_bos and getattr(tokenizer, "bos_id", None) is None:
        raise UserError(NO_BOS)
    return tokenizer.wants_bos if add_bos is None else add_bos


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str,
                add_bos: bool) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split exactly like lm-eval's HFLM._encode_pair."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, bos=False, eos=False)
    ctx = tokenizer.encode(context, bos=False, eos=False)
    cont = whole[len(ctx):]
    if add_bos:
        if tokenizer.bos_id is None:
            raise UserError(NO_BOS)
        ctx = [tokenizer.bos_id, *ctx]
    return ctx, cont


def padding_id(tokenizer: Tokenizer) -> int:
    """The id right-padded rows are filled with: the tokenizer's pad id, else 0 (any id will do, padded
    positions are never scored)."""
    pad = getattr(tokenizer, "pad_id", None)
    return pad if isinstance(pad, int) and pad >= 0 else 0


# ---- scoring -------------------------------------------------------------------------------------------
def first_argmax(values: Sequence[float]) -> int:
    """Index of the largest value; ties go to the first, as numpy's argmax does (and lm-eval with it)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """Our plain models (families.py: the Transformer, GPT-2) can return hidden states: project only the scored
    positions (the LM head over all positions is most of the memory at vocab 128k). Wrapped models take the
    generic path."""
    family = next((f for f in families.FAMILIES.values() if type(model) is f.module_class), None)
    return model.get_submodule(family.head) if family is not None else None


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
def score_pairs(model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]], device: torch.device,
                dtype: torch.dtype | None, pad_id: int, max_len: int | None = None) -> list[float]:
    """Summed log p(continuation | context) of each (context ids, continuation ids) pair, in one right-padded
    forward. A pair longer than max_len + 1 tokens keeps its end, as lm-eval does. dtype: compute dtype via
    autocast when it differs from the model's (None = the model's)."""
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


# ---- examples of the in-loop evaluations ----------------------------------------------------------------
# Read and rendered once per process, keyed by (task, path, limit). Process-wide because the training loop
# calls a task's hook as a plain function at every evaluation step and holds no evaluation object between
# calls; the file is not expected to change during a run. Only load_once reads or writes it.
_LOADED: dict[tuple[str, str, int | None], list] = {}


def load_once(task: str, load: Callable[[str | os.PathLike, int | None], list[T]], path: str | os.PathLike,
              limit: int | None) -> list[T]:
    """load(path, limit), the first time it is asked for in this process; the same list afterwards."""
    key = (task, str(path), limit)
    if key not in _LOADED:
        _LOADED[key] = load(path, limit)
    return _LOADED[key]


# ---- one pass of a task over the ranks ---------------------------------------------------------------------
@dataclass(frozen=True)
class Task(Generic[T, E]):
    """One evaluation as `run` drives it.

    name: the progress bar's label. counts: the names of the numbers `score` returns per example.
    encode: one example -> what `score` reads (called on this rank's share only, padding copies included).
    score: a batch of encoded examples -> one row of counts per example, in order.
    order: a sort key for the encoded share (e.g. longest first: similar lengths share a batch)."""

    name: str
    counts: tuple[str, ...]
    encode: Callable[[T], E]
    score: Callable[[list[E]], Sequence[Sequence[float]]]
    order: Callable[[E], float] | None = None


def shard(examples: Sequence[T], rank: int, world_size: int) -> list[tuple[T, int]]:
    """This rank's (example, weight) pairs: examples[rank::world_size] with weight 1, then weight-0 copies of
    examples[0] up to ceil(len(examples) / world_size), so that every rank holds as many."""
    mine = [(ex, 1) for ex in examples[rank::world_size]]
    if not examples:
        return mine
    return mine + [(examples[0], 0)] * (math.ceil(len(examples) / world_size) - len(mine))


def run(model: torch.nn.Module, task: Task[T, E], examples: Sequence[T], *, batch_size: int, rank: int,
        world_size: int, device: torch.device, stop_check: Callable[[], None] | None = None,
        progress: bool = False) -> tuple[dict[str, float], int]:
    """Score this rank's share of `examples` with `task` -> (summed counts by name, examples counted), summed
    over all ranks when a process group is initialized and world_size > 1 (see the module doc).
    progress: a tqdm bar on rank 0 over all ranks' examples."""
    share = [(task.encode(ex), weight) for ex, weight in shard(examples, rank, world_size)]
    order = task.order
    if order is not None:
        share.sort(key=lambda pair: order(pair[0]))
    batches = [share[b : b + batch_size] for b in range(0, len(share), batch_size)]
    totals = _count(model, task, batches, len(examples) if progress and rank == 0 else None, world_size,
                    stop_check)
    if world_size > 1 and D.is_dist():
        totals = D.all_reduce_sum(torch.tensor(totals, dtype=torch.float64, device=device)).tolist()
    return dict(zip(task.counts, totals[:-1], strict=True)), int(totals[-1])


def _count(model: torch.nn.Module, task: Task[T, E], batches: list[list[tuple[E, int]]], bar_total: int | None,
           world_size: int, stop_check: Callable[[], None] | None) -> list[float]:
    """This rank's summed counts, then the number of examples counted: weight-0 copies add nothing."""
    totals = [0.0] * (len(task.counts) + 1)
    bar = None
    if bar_total is not None:
        from tqdm import tqdm

        bar = tqdm(total=bar_total, desc=task.name, unit="ex", dynamic_ncols=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                if stop_check is not None:
                    stop_check()
                rows = task.score([enc for enc, _ in batch])
                for (_, weight), row in zip(batch, rows, strict=True):
                    if weight:
                        for i, v in enumerate(row):
                            totals[i] += v
                        totals[-1] += 1
                if bar is not None:
                    bar.update(min(len(batch) * world_size, bar.total - bar.n))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return totals
