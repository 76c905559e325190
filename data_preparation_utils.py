"""Offline data preparation: streaming parallel tokenization into atomic, resumable, verified shards.

On-disk format (one directory per prepared dataset; `kind` is pretrain | sft | dpo):

    <dir>/manifest.json                  written last, atomically; "complete": true
    <dir>/{train,val}/data_NNNNNN.npy    tokens, 1-D, uint16 when the vocabulary fits else uint32
    sft adds   mask_NNNNNN.npy (uint8, aligned with data_) and offsets_NNNNNN.npy (int64, n+1 example starts)
    dpo writes prompt_/chosen_/rejected_NNNNNN.npy and offsets_NNNNNN.npy (int64, (n+1, 3) starts per array)
    <dir>/progress.json                  the resume journal, present only while a preparation is unfinished

Pretrain: every document is BOS + tokens + EOS; shards hold exactly `shard_size` tokens (the last one less),
so documents may span shard boundaries. SFT/DPO: an example never spans shards; a shard closes when the next
example would take it past `shard_size` tokens.

Train/val split: hash(split seed, document text / canonical JSON record) -> val when below `val_fraction`;
it depends on nothing but the document, so adding data never moves an old document to the other side.

Resumability: after every shard the journal records, per split, the finished shards and the input position
reached (index of the first input record not wholly in a finished shard, and how many of its tokens are).
A re-run with the same settings skips what is done and ends with exactly the shards and manifest an
uninterrupted run writes. Records of a split before that split's position are not re-tokenized.

Parallelism: `NUMBER_OF_CPU_PROCESSES` workers (0 = half the cores, at least 1); chunks of records go to a
multiprocessing pool and come back in order, with a bounded number in flight so the input is streamed,
never held in RAM. One worker encodes in-process (no pool).

Reading and checking a prepared dir (manifest, `open_shard`, `verify`) is data_manifest.py's; this module keeps
the `verify` command line.

    python data_preparation_utils.py verify DIR [--tokenizer tokenizer.model] [--check-hashes]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import io
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np

from data_manifest import (
    FORMAT_VERSION,
    JOURNAL,
    MANIFEST,
    SHARD_FILES,
    SPLITS,
    TOKEN_ROLES,
    tokenizer_label,
    verify,
)
from errors import UserError, run_cli
from fileio import fsync_dir
from tokenizer import ChatFormat, Tokenizer, load_tokenizer


def auto_workers(n: int) -> int:
    """NUMBER_OF_CPU_PROCESSES: 0 means half the cores (at least 1); never 0 workers."""
    return n if n > 0 else max(1, (os.cpu_count() or 2) // 2)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def split_of(key: str, seed: int, val_fraction: float) -> str:
    """Deterministic split: the first 8 bytes of blake2b(seed, text) as a fraction of 2**64."""
    h = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8, key=str(seed).encode()[:64])
    return "val" if int.from_bytes(h.digest(), "big") < val_fraction * 2.0**64 else "train"


def atomic_write(path: Path, data: bytes, *, rerun_note: str = ": it resumes from the last finished shard") -> None:
    """Write `path.tmp`, fsync, rename: readers see the old file or the whole new one, never a part.
    `rerun_note` ends the disk-full message (what re-running the command does)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # never leave a partial file behind, not even a *.tmp
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"disk full while writing {path} ({e.strerror}); free space (or choose another output "
                            f"directory) and re-run the same command{rerun_note}") from None
        raise
    fsync_dir(path.parent)


def save_npy(path: Path, arr: np.ndarray) -> dict[str, Any]:
    """Atomically write one .npy; returns its manifest entry (path relative to the dataset dir later)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    data = buf.getvalue()
    atomic_write(path, data)
    return {"shape": list(arr.shape), "dtype": str(arr.dtype), "sha256": hashlib.sha256(data).hexdigest()}


# ---------------------------------------------------------------------------------------- encoding


class Malformed(NamedTuple):
    """An input record that could not be parsed (e.g. a bad jsonl line): skipped and counted."""

    where: str
    text: str
    reason: str


def iter_jsonl(source: str | os.PathLike | Iterable[str], *, name: str | None = None, errors: str = "strict",
               malformed: Literal["raise", "yield"] = "raise",
               hint: str | None = "fix or remove that line") -> Iterator[tuple[int, Any]]:
    """(line number, decoded value) for every non-blank line of a jsonl file (a path) or of lines already read.

    malformed="raise" (HellaSwag: a benchmark with a hole in it is another benchmark): a line that is not valid
    JSON stops the read with UserError `NAME:LINE: not valid JSON (why); HINT`; the caller validates values.
    malformed="yield" (pretrain / chat data: one bad line in a million should not stop a long job): such a
    line, or a value that is not a JSON object, comes out as a Malformed record, to be skipped and counted.
    `errors` is open()'s decoding policy for a path ("replace" keeps a long job going past bad bytes)."""
    if isinstance(source, str | os.PathLike):
        with open(source, encoding="utf-8", errors=errors) as f:
            yield from _jsonl_lines(f, str(source) if name is None else name, malformed, hint)
    else:
        yield from _jsonl_lines(source, "<lines>" if name is None else name, malformed, hint)


def _jsonl_lines(lines: Iterable[str], name: str, malformed: str, hint: str | None) -> Iterator[tuple[int, Any]]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            if malformed == "raise":
                raise UserError(f"{name}:{lineno}: not valid JSON ({e.msg})" + (f"; {hint}" if hint else "")) from None
            yield lineno, Malformed(f"{name}:{lineno}", line, f"not valid JSON ({e.msg})")
            continue
        if malformed == "yield" and not isinstance(value, dict):
            yield lineno, Malformed(f"{name}:{lineno}", line, "not a JSON object")
            continue
        yield lineno, value


class Encoder(Protocol):
    """What prepare runs in the worker processes (so it must pickle): a record's split key, and the record ->
    its token arrays by role (None when it is skipped) with an event to count (a skip reason, a truncation)."""

    def split_key(self, record: Any) -> str: ...

    def __call__(self, record: Any) -> tuple[dict[str, np.ndarray] | None, str | None]: ...


class PretrainEncoder:
    """Plain-text document -> BOS + ids + EOS. Runs in the worker processes."""

    kind = "pretrain"

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.dtype = token_dtype(tok.vocab_size)

    def __getstate__(self) -> dict[str, Any]:
        return {"tok": self.tok, "dtype": self.dtype}

    def split_key(self, record: str) -> str:
        return record

    def __call__(self, record: str) -> tuple[dict[str, np.ndarray] | None, str | None]:
        if not isinstance(record, str) or not record:
            return None, "empty"
        ids = self.tok.encode_array(record)
        out = np.empty(len(ids) + 2, dtype=self.dtype)
        out[0], out[-1] = self.tok.bos_id, self.tok.eos_id
        out[1:-1] = ids
        return {"tokens": out}, None


# Role names chat datasets use -> the roles ChatFormat renders (system / user / assistant).
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant"}


class ChatEncoder:
    """Shared part of the SFT and DPO encoders: the tokenizer, the ChatFormat built lazily in each worker
    process (it is not sent through pickling), and the record's split key."""

    def __init__(self, tok: Tokenizer, system_prompt: str, max_seq_len: int):
        self.tok, self.system_prompt, self.max_seq_len = tok, system_prompt, max_seq_len
        self.dtype = token_dtype(tok.vocab_size)
        self._chat: ChatFormat | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_chat": None}

    def split_key(self, record: Any) -> str:
        return record_key(record)

    @property
    def chat(self) -> ChatFormat:
        if self._chat is None:
            self._chat = ChatFormat(self.tok)
        return self._chat


def record_key(record: Any) -> str:
    """Split key of a structured record: its canonical JSON."""
    return record if isinstance(record, str) else json.dumps(record, sort_keys=True, ensure_ascii=False)


# Each pool worker process's encoder and split settings, set once by the pool's initializer (`_init_worker`), so
# the tasks sent to a worker carry only their records.
_WORKER: dict[str, Any] = {}


def _init_worker(encoder: Encoder, seed: int, val_fraction: float) -> None:
    _WORKER.update(encoder=encoder, seed=seed, val_fraction=val_fraction)


def _encode_chunk(start: int, records: list[Any], resume_from: dict[str, int]) -> list[tuple | None]:
    """-> per record (split, arrays or None, event or None, warning or None), or None if already done."""
    enc, seed, frac = _WORKER["encoder"], _WORKER["seed"], _WORKER["val_fraction"]
    out: list[tuple | None] = []
    for i, rec in enumerate(records, start):
        if isinstance(rec, Malformed):
            split = split_of(rec.text, seed, frac)
            out.append(None if i < resume_from[split] else
                       (split, None, "malformed", f"{rec.where}: {rec.reason}; skipped"))
            continue
        split = split_of(enc.split_key(rec), seed, frac)
        if i < resume_from[split]:
            out.append(None)
            continue
        arrays, event = enc(rec)
        out.append((split, arrays, event, None))
    return out


def _chunks(records: Iterator[Any], start: int, max_records: int, max_chars: int) -> Iterator[tuple[int, list]]:
    chunk: list[Any] = []
    chars = 0
    for rec in records:
        chunk.append(rec)
        chars += len(rec) if isinstance(rec, str) else 256
        if len(chunk) >= max_records or chars >= max_chars:
            yield start, chunk
            start += len(chunk)
            chunk, chars = [], 0
    if chunk:
        yield start, chunk


def _encoded_stream(records: Iterator[Any], start: int, encoder: Encoder, workers: int, seed: int,
                    val_fraction: float, resume_from: dict[str, int]) -> Iterator[tuple[int, tuple | None]]:
    """(record index, result) in input order. Pool.imap would read ahead without bound (its feeder thread
    drains the input), so at most 2 chunks per worker are in flight here."""
    chunks = _chunks(records, start, max_records=1024, max_chars=1 << 20)
    if workers <= 1:
        _init_worker(encoder, seed, val_fraction)
        for s, chunk in chunks:
            yield from enumerate(_encode_chunk(s, chunk, resume_from), s)
        return
    import multiprocessing as mp

    with mp.get_context().Pool(workers, initializer=_init_worker,
                               initargs=(encoder, seed, val_fraction)) as pool:
        pending: deque = deque()
        for s, chunk in chunks:
            pending.append((s, pool.apply_async(_encode_chunk, (s, chunk, resume_from))))
            if len(pending) >= 2 * workers:
                s0, res = pending.popleft()
                yield from enumerate(res.get(), s0)
        while pending:
            s0, res = pending.popleft()
            yield from enumerate(res.get(), s0)


# ------------------------------------------------------------------------------------------- writing


class ShardWriter:
    """Buffers one split's encoded records and writes shards; `state()` is what the journal stores."""

    def __init__(self, root: Path, kind: str, split: str, shard_size: int, state: dict[str, Any] | None):
        self.root, self.kind, self.split, self.shard_size = root, kind, split, shard_size
        st = state or {"shards": [], "next_doc": 0, "skip": 0, "documents": 0, "stats": {}}
        self.shards: list[dict] = st["shards"]
        self.next_doc, self.resume_skip = st["next_doc"], st["skip"]
        self.documents, self.stats = st["documents"], dict(st["stats"])
        self.committed = st
        self.buffer: list[dict[str, np.ndarray]] = []
        self.buffered = 0
        self.on_shard: Callable[[], None] = lambda: None
        (root / split).mkdir(parents=True, exist_ok=True)

    def state(self) -> dict[str, Any]:
        return self.committed

    def count(self, event: str | None) -> None:
        if event:
            self.stats[event] = self.stats.get(event, 0) + 1

    def add(self, i: int, arrays: dict[str, np.ndarray], event: str | None) -> None:
        if self.kind == "pretrain":
            self._add_stream(i, arrays["tokens"], event)
            return
        n = sum(len(arrays[r]) for r in TOKEN_ROLES[self.kind])
        if self.buffer and self.buffered + n > self.shard_size:
            self._close(next_doc=i, skip=0, documents=self.documents, stats=self.stats)
        self.count(event)
        self.documents += 1
        self.buffer.append(arrays)
        self.buffered += n

    def _add_stream(self, i: int, tokens: np.ndarray, event: str | None) -> None:
        pos = self.resume_skip if i == self.next_doc else 0  # tokens already in finished shards
        self.count(event)
        self.documents += 1
        while pos < len(tokens):
            take = min(len(tokens) - pos, self.shard_size - self.buffered)
            self.buffer.append({"tokens": tokens[pos:pos + take]})
            self.buffered += take
            pos += take
            if self.buffered == self.shard_size:
                done = pos == len(tokens)
                self._close(next_doc=i + 1 if done else i, skip=0 if done else pos,
                            documents=self.documents - (0 if done else 1), stats=self.stats)

    def finish(self, n_records: int) -> None:
        if self.buffer:
            self._close(next_doc=n_records, skip=0, documents=self.documents, stats=self.stats)

    def _arrays(self) -> dict[str, np.ndarray]:
        parts = self.buffer
        if self.kind == "pretrain":
            return {"tokens": np.concatenate([p["tokens"] for p in parts])}
        roles = TOKEN_ROLES[self.kind] + (("mask",) if self.kind == "sft" else ())
        out = {r: np.concatenate([p[r] for p in parts]) for r in roles}
        lengths = np.array([[len(p[r]) for r in TOKEN_ROLES[self.kind]] for p in parts], dtype=np.int64)
        offsets = np.zeros((len(parts) + 1, lengths.shape[1]), dtype=np.int64)
        np.cumsum(lengths, axis=0, out=offsets[1:])
        out["offsets"] = offsets[:, 0] if self.kind == "sft" else offsets
        return out

    def _close(self, next_doc: int, skip: int, documents: int, stats: dict[str, int]) -> None:
        index = len(self.shards)
        arrays = self._arrays()
        files = {}
        for role, prefix in SHARD_FILES[self.kind].items():
            rel = f"{self.split}/{prefix}_{index:06d}.npy"
            files[role] = {"path": rel, **save_npy(self.root / rel, arrays[role])}
        entry = {"index": index, "tokens": int(self.buffered), "files": files}
        if self.kind != "pretrain":
            entry["examples"] = len(self.buffer)
        self.shards.append(entry)
        self.buffer, self.buffered = [], 0
        self.committed = {"shards": list(self.shards), "next_doc": next_doc, "skip": skip,
                          "documents": documents, "stats": dict(stats)}
        self.on_shard()


# What each preparation reads, named when a source yields no record at all.
_EXPECTED_RECORDS = {
    "pretrain": "text: .txt/.md files, or jsonl/parquet records with a string text field (--text-field)",
    "sft": "chat records: jsonl/parquet with messages, conversations or instruction/output fields",
    "dpo": "preference records: jsonl/parquet with prompt/chosen/rejected (or chosen/rejected conversations)",
}


def _clean(root: Path) -> None:
    """Remove only what a preparation writes (never a whole directory the user may have pointed at)."""
    for split in SPLITS:
        for p in (root / split).glob("*.npy*"):
            p.unlink()
    for name in (MANIFEST, JOURNAL):
        (root / name).unlink(missing_ok=True)


def prepare(kind: str, records: Iterable[Any], out_dir: str | Path, encoder: Encoder, **kw: Any) -> dict[str, Any]:
    """Tokenize `records` (an iterable read lazily, in a fixed order) into shards under out_dir; returns the
    manifest. A re-run after an interruption resumes; a finished dir with the same settings is left as is.
    A failure before the first shard removes the directories this call created (a source that cannot be
    read, e.g. a hub id while offline, fails on its first record, after the output dirs exist); after it,
    the journaled shards and their dirs stay for the re-run. Keyword arguments: see _prepare."""
    root = Path(out_dir)
    created = [root / s for s in SPLITS if not (root / s).exists()]
    d = root
    while not d.exists():
        created.append(d)  # the output dir and the parents mkdir makes for it, deepest first
        d = d.parent
    try:
        return _prepare(kind, records, root, encoder, **kw)
    except BaseException:
        if not any(p.is_file() for p in root.rglob("*")):  # nothing to resume from: leave no trace
            for d in created:
                with contextlib.suppress(OSError):
                    d.rmdir()
        raise


def _prepare(kind: str, records: Iterable[Any], root: Path, encoder: Encoder, *, tokenizer_identity: dict,
             source: str, seed: int, val_fraction: float, shard_size: int, workers: int = 0,
             options: dict[str, Any] | None = None, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """prepare's work: settle what the dir already holds, stream the records into one ShardWriter per split
    (each journals the shards it closes), then write the manifest and drop the journal."""
    root.mkdir(parents=True, exist_ok=True)
    workers = auto_workers(workers)
    fingerprint = _fingerprint(kind, tokenizer_identity, source, seed, val_fraction, shard_size, options)
    if overwrite:
        _clean(root)
    finished = _finished_manifest(root, fingerprint)
    if finished is not None:
        return finished
    journal = _resumable_journal(root, fingerprint)
    writers = {s: ShardWriter(root, kind, s, shard_size, journal["splits"][s] if journal else None)
               for s in SPLITS}
    for w in writers.values():
        w.on_shard = lambda: write_journal(root, fingerprint, writers)
    start = min(w.next_doc for w in writers.values())
    if start:
        print(f"{root}: resuming at input record {start}", file=sys.stderr)
    meter = _Progress(kind, start, progress)
    n_records = _tokenize_into(writers, records, start, encoder, workers, seed, val_fraction, meter)
    meter.close()
    for w in writers.values():
        w.finish(n_records)
    _check_some_documents(writers, kind, source, n_records)
    manifest = _manifest(fingerprint, writers)
    atomic_write(root / MANIFEST, json.dumps(manifest, indent=1).encode())
    (root / JOURNAL).unlink(missing_ok=True)
    print(_summary(manifest, root, time.perf_counter() - meter.t0, meter.tokens), file=sys.stderr)
    return manifest


# ---------------------------------------------------------------------------- journal and resume


def _fingerprint(kind: str, tokenizer_identity: dict, source: str, seed: int, val_fraction: float,
                 shard_size: int, options: dict[str, Any] | None) -> dict[str, Any]:
    """The settings a prepared dir is made from, as its manifest and journal store them (JSON round trip):
    a re-run with an equal fingerprint resumes or finds the work done."""
    fingerprint = {"format_version": FORMAT_VERSION, "kind": kind, "tokenizer": tokenizer_identity,
                   "dtype": str(token_dtype(tokenizer_identity["vocab_size"])), "source": source,
                   "split_seed": seed, "val_fraction": val_fraction, "shard_size": shard_size,
                   "options": options or {}}
    return json.loads(json.dumps(fingerprint))


def _finished_manifest(root: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a finished preparation with these settings (nothing to do), None when there is no
    manifest; a manifest of other settings is a UserError."""
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        return None
    old = json.loads(manifest_path.read_text())
    if {k: old.get(k) for k in fingerprint} == fingerprint and old.get("complete"):
        print(f"{root}: already prepared with these settings; nothing to do", file=sys.stderr)
        return old
    raise UserError(f"{root} already holds data prepared with other settings ({MANIFEST}); "
                    "pass --overwrite or choose another output directory")


def _resumable_journal(root: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The journal of an unfinished preparation with these settings (None: start from the first record);
    one of other settings is a UserError. Removes the *.tmp files an interrupted shard write left."""
    journal_path = root / JOURNAL
    journal = json.loads(journal_path.read_text()) if journal_path.is_file() else None
    if journal is not None and journal["fingerprint"] != fingerprint:
        raise UserError(f"{root} holds an unfinished preparation with other settings ({JOURNAL}); "
                        "re-run it with its settings, or pass --overwrite to start over")
    for split in SPLITS:
        for tmp in (root / split).glob("*.tmp"):
            tmp.unlink()
    return journal


def write_journal(root: Path, fingerprint: dict[str, Any], writers: dict[str, ShardWriter]) -> None:
    """Record every split's finished shards and input position in the resume journal (atomically). Called
    in the preparing process each time a shard is closed; the workers only encode."""
    body = {"fingerprint": fingerprint, "splits": {s: w.state() for s, w in writers.items()}}
    atomic_write(root / JOURNAL, json.dumps(body).encode())


# ------------------------------------------------------------------------------ the tokenizing pass


class _Progress:
    """The tokenizing pass's bar (records read, tokens/s at most every 0.5 s), its first 10 warnings, and the
    tokens it added (this run's, for the summary's rate)."""

    def __init__(self, kind: str, start: int, enabled: bool):
        from tqdm import tqdm

        self.t0 = self.last_postfix = time.perf_counter()
        self.tokens, self.warned = 0, 0
        self.bar = tqdm(desc=f"tokenizing {kind}", unit=" doc", disable=not enabled, dynamic_ncols=True,
                        initial=start)

    def advance(self) -> None:
        self.bar.update(1)

    def warn(self, warning: str) -> None:
        from tqdm import tqdm

        if self.warned < 10:
            self.warned += 1
            tqdm.write(f"warning: {warning}" + (" (further warnings suppressed)" if self.warned == 10 else ""),
                       file=sys.stderr)

    def show_rate(self) -> None:
        now = time.perf_counter()
        if now - self.last_postfix > 0.5:
            self.bar.set_postfix_str(f"{self.tokens / (now - self.t0):,.0f} tok/s")
            self.last_postfix = now

    def close(self) -> None:
        self.bar.close()


def _tokenize_into(writers: dict[str, ShardWriter], records: Iterable[Any], start: int, encoder: Encoder,
                   workers: int, seed: int, val_fraction: float, progress: _Progress) -> int:
    """Encode the records from index `start` on (those a split has already finished are skipped by the
    workers) and add each to its split's writer; -> the number of input records read."""
    resume_from = {s: w.next_doc for s, w in writers.items()}
    n_records = start
    for i, result in _encoded_stream(iter(islice(records, start, None)), start, encoder, workers, seed,
                                     val_fraction, resume_from):
        n_records = i + 1
        progress.advance()
        if result is None:
            continue
        split, arrays, event, warning = result
        w = writers[split]
        if warning:
            progress.warn(warning)
        if arrays is None:
            w.count(event)
        else:
            w.add(i, arrays, event)
            progress.tokens += sum(len(arrays[r]) for r in TOKEN_ROLES[w.kind])
        progress.show_rate()
    return n_records


# ----------------------------------------------------------------------------- manifest and summary


def _check_some_documents(writers: dict[str, ShardWriter], kind: str, source: str, n_records: int) -> None:
    """A source none of whose records became a document is a UserError naming what was skipped and why."""
    if any(w.documents for w in writers.values()):
        return
    skipped: dict[str, int] = {}
    for w in writers.values():
        for k, v in w.stats.items():
            skipped[k] = skipped.get(k, 0) + v
    counts = ", ".join(f"{k} {v:,}" for k, v in sorted(skipped.items())) or "none skipped"
    raise UserError(f"{source}: 0 records out of {n_records:,} read ({counts}); nothing was written: "
                    f"the {kind} preparation expects {_EXPECTED_RECORDS[kind]}")


def _manifest(fingerprint: dict[str, Any], writers: dict[str, ShardWriter]) -> dict[str, Any]:
    manifest = dict(fingerprint, complete=True, splits={})
    for s, w in writers.items():
        manifest["splits"][s] = {"documents": w.documents, "tokens": sum(e["tokens"] for e in w.shards),
                                 "stats": w.stats, "shards": w.shards}
    return manifest


def _summary(manifest: dict[str, Any], root: Path, seconds: float, tokens_this_run: int) -> str:
    """The one line a finished preparation ends with: records per split, tokens, shards, rate, skip counts."""
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    stats = {k: tr["stats"].get(k, 0) + va["stats"].get(k, 0) for k in {**tr["stats"], **va["stats"]}}
    return (f"prepared {manifest['kind']} from {manifest['source']}: {tr['documents'] + va['documents']:,} records "
            f"(train {tr['documents']:,} / val {va['documents']:,}), {tr['tokens'] + va['tokens']:,} tokens in "
            f"{len(tr['shards']) + len(va['shards'])} shards ({manifest['dtype']}) -> {root} in {seconds:.1f} s "
            f"({tokens_this_run / max(seconds, 1e-9):,.0f} tok/s this run)"
            + "".join(f", {k} {v:,}" for k, v in sorted(stats.items())))


# ------------------------------------------------------------------------------------------------ CLI


def _main() -> int:
    p = argparse.ArgumentParser(description="Check a prepared dataset dir against a tokenizer.")
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="manifest, tokenizer identity, shard sizes (and hashes)")
    v.add_argument("dir")
    v.add_argument("--tokenizer", default=None, help="the training tokenizer (any tokenizer.load_tokenizer source)")
    v.add_argument("--kind", default=None, choices=sorted(SHARD_FILES))
    v.add_argument("--check-hashes", action="store_true")
    args = p.parse_args()
    identity = None
    if args.tokenizer:
        identity = load_tokenizer(args.tokenizer).identity()
    m = verify(args.dir, identity, args.check_hashes, args.kind)
    n = sum(len(m["splits"][s]["shards"]) for s in SPLITS)
    print(f"ok: {args.dir} ({m['kind']}, {n} shards, train {m['splits']['train']['tokens']:,} / val "
          f"{m['splits']['val']['tokens']:,} tokens, {tokenizer_label(m.get('tokenizer'))})")
    return 0


if __name__ == "__main__":
    run_cli(_main)
