"""Byte-level BPE training into tiktoken ranks over Llama 3 pre-tokens, and the embedded corpus it is
trained on by default.

`python tokenizer.py train ...` is the command line; the repo's tokenizer.model is
`python tokenizer.py train --vocab-size 8192 --out tokenizer.model` (no --input: the embedded corpus).
"""

from __future__ import annotations

import heapq
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

# Meta's Llama 3 pre-tokenizer: contractions, letter runs, 1-3 digit groups, punctuation, newlines, spaces.
LLAMA3_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def embedded_corpus() -> Iterator[str]:
    """English text every Python install has, in a fixed order (it varies only with the Python version):
    1. each `pydoc_data.topics.topics` entry, sorted by key;
    2. for each top-level stdlib module in sorted(sys.stdlib_module_names) that is a .py file or package
       (private `_x` modules skipped), one document: its module, class and function docstrings in source order,
       read with `ast` from the stdlib directory (nothing is imported, so no module side effects).
    """
    import ast
    import sysconfig
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_"):
            continue
        for candidate in (stdlib / f"{name}.py", stdlib / name / "__init__.py"):
            if candidate.is_file():
                tree = ast.parse(candidate.read_text(encoding="utf-8"))
                docs = [ast.get_docstring(n) for n in _defs_in_order(tree)]
                text = "\n\n".join(d for d in docs if d)
                if text:
                    yield text
                break


def _defs_in_order(node: Any) -> Iterator[Any]:
    import ast

    if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
        yield node
    for child in ast.iter_child_nodes(node):
        yield from _defs_in_order(child)


def train_bpe(texts: Iterable[str], vocab_size: int, progress: bool = True) -> dict[bytes, int]:
    """Byte-level BPE over Llama 3 pre-tokens -> tiktoken ranks (256 single bytes first, then merges in order).

    Each step merges the most frequent adjacent pair; ties go to the smallest (left id, right id), so the
    result depends only on the text. Pair counts are updated incrementally for the words a merge touches.
    """
    import regex
    from tqdm import tqdm

    if vocab_size < 256:
        raise ValueError(f"--vocab-size {vocab_size} is below 256 (the single bytes); use e.g. 8192")
    pat = regex.compile(LLAMA3_PAT)
    word_counts: Counter[str] = Counter()
    for text in texts:
        word_counts.update(pat.findall(text))
    words = [list(w.encode("utf-8")) for w in sorted(word_counts)]  # sorted: order-independent of input dicts
    freqs = [word_counts[w] for w in sorted(word_counts)]
    vocab = [bytes([b]) for b in range(256)]
    index = {b: i for i, b in enumerate(vocab)}
    pair_counts: Counter[tuple[int, int]] = Counter()
    where: dict[tuple[int, int], set[int]] = {}
    for w, (word, f) in enumerate(zip(words, freqs, strict=True)):
        for pair in zip(word, word[1:], strict=False):
            pair_counts[pair] += f
            where.setdefault(pair, set()).add(w)
    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)
    bar = tqdm(total=vocab_size - 256, desc="bpe merges", disable=not progress)
    while len(vocab) < vocab_size and heap:
        neg, a, b = heapq.heappop(heap)
        if pair_counts.get((a, b), 0) != -neg or neg == 0:
            continue  # stale heap entry
        merged = vocab[a] + vocab[b]
        new = index.get(merged)
        if new is None:  # the same bytes can arise from another split; tiktoken maps both to one rank
            new = index[merged] = len(vocab)
            vocab.append(merged)
            bar.update(1)
        touched: set[tuple[int, int]] = set()
        for w in sorted(where.pop((a, b), ())):
            word, f = words[w], freqs[w]
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            if len(out) == len(word):
                continue
            for pair in zip(word, word[1:], strict=False):
                pair_counts[pair] -= f
                touched.add(pair)
            for pair in zip(out, out[1:], strict=False):
                pair_counts[pair] += f
                where.setdefault(pair, set()).add(w)
                touched.add(pair)
            words[w] = out
        for pair in touched:
            c = pair_counts[pair]
            if c > 0 and pair != (a, b):
                heapq.heappush(heap, (-c, *pair))
            elif c <= 0:
                del pair_counts[pair]
    bar.close()
    return {tok: rank for rank, tok in enumerate(vocab)}
