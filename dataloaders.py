"""Training-time loaders: memory-mapped shards -> deterministic, world-size-independent, resumable batches.

    loader = build_loader("pretrain", "data/pretrain", "train", seq_len=T, micro_batch=B, global_batch=G,
                          rank=r, world_size=W, seed=42, pad_id=tok.pad_id, tokenizer_identity=tok.identity())
    batch = loader.next_batch()     # dict of CPU long tensors, (B, T) each

Global order (the contract in INTERFACES.md): samples of an epoch are a permutation seeded by (seed, epoch)
(val: file order). Optimizer step k consumes global samples [k*G, (k+1)*G) of the endless sequence
epoch 0, epoch 1, ...; micro-step m on rank r takes samples k*G + m*B*W + r*B ... + B. So 1, 2 or 4 ranks
with the same G see the same samples per step, and `state_dict()` (epoch + sample offset, no rank) resumes
under any world size. A step may span an epoch boundary; nothing is dropped.

Samples: pretrain = windows of T+1 tokens starting at multiples of T over the split's token stream (every
token is a target once per epoch; windows may cross shard and document boundaries, as in GPT-2/nanoGPT
training; with doc_delimiters each window also numbers its documents, `doc_ids`, for document masking);
sft padded = one example per row, right-padded; sft packed = rows filled greedily (next-fit, in
the epoch's order) with whole examples, `doc_ids` numbering them within the row; dpo = one pair.
An example is never cut here: the preparation guarantees it fits MAX_SEQ_LEN, and a loader whose T is
too small for the longest example refuses to start.

`sample_index` (B,) long, in every batch except packed SFT: each row's id within its split, i.e. its index
into the unshuffled sample list (window number for pretrain, example number for padded SFT, pair number for
DPO). It depends on the data only, not on seed, epoch, world size or resume, and one epoch covers
0..samples_per_epoch-1 exactly once; precomputed frozen-model outputs (objectives.py teacher/reference
caches) are keyed by it. A packed SFT row holds several examples and has no single id, so packed batches
carry no sample_index: caches need SFT_BATCHING=padded (their readers say so). Every row is a real sample
(steps run across epoch boundaries instead of padding), so no row is a filler; PAD_SAMPLE_INDEX (-1) is
reserved for one should a caller ever pad a batch, and cache readers refuse it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_manifest import open_shard, verify
from errors import UserError
from losses import IGNORE_INDEX

TRIM_MULTIPLE = 16  # a trimmed batch's width is a multiple of this
PAD_SAMPLE_INDEX = -1  # reserved sample_index of a filler row (the loader itself never makes one)
DATA_KIND = {"pretrain": "pretrain", "sft": "sft", "dpo": "dpo"}


class _Shards:
    """The split's arrays, memory-mapped; role -> list of per-shard arrays, plus cumulative counts."""

    def __init__(self, root: Path, manifest: dict[str, Any], split: str):
        shards = manifest["splits"][split]["shards"]
        if not shards:
            raise UserError(f"{root} has no {split} data (0 shards); re-run the preparation with a larger "
                            "dataset or VAL_FRACTION > 0")
        self.arrays: dict[str, list[np.ndarray]] = {}
        for shard in shards:
            for role, f in shard["files"].items():
                self.arrays.setdefault(role, []).append(open_shard(root / f["path"]))


class _Pretrain:
    def __init__(self, shards: _Shards, seq_len: int):
        self.tokens = shards.arrays["tokens"]
        self.starts = np.concatenate([[0], np.cumsum([len(a) for a in self.tokens])]).astype(np.int64)
        self.T = seq_len
        self.n = int((self.starts[-1] - 1) // seq_len)
        if self.n < 1:
            raise UserError(f"the split holds {int(self.starts[-1])} tokens, fewer than one window of "
                            f"MAX_SEQ_LEN+1={seq_len + 1}; prepare more data or lower MAX_SEQ_LEN")

    def window(self, i: int) -> np.ndarray:  # (T+1,)
        lo, hi = i * self.T, i * self.T + self.T + 1
        s = int(np.searchsorted(self.starts, lo, side="right")) - 1
        parts = []
        while lo < hi:
            a, base = self.tokens[s], int(self.starts[s])
            take = min(hi, base + len(a)) - lo
            parts.append(a[lo - base:lo - base + take])
            lo += take
            s += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class _Examples:
    """sft: (ids, mask) per example; dpo: (prompt, chosen, rejected) per pair."""

    def __init__(self, shards: _Shards, kind: str):
        self.kind = kind
        self.offsets = shards.arrays["offsets"]
        counts = [len(o) - 1 for o in self.offsets]
        self.first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n = int(self.first[-1])
        self.shards = shards.arrays
        # lengths in RAM (8 bytes per example): packing and the fit check need them all.
        if kind == "sft":
            self.lengths = np.concatenate([np.diff(np.asarray(o)) for o in self.offsets])
        else:
            self.lengths = np.concatenate([np.diff(np.asarray(o), axis=0) for o in self.offsets])  # (n, 3)

    def get(self, i: int) -> tuple[np.ndarray, ...]:
        s = int(np.searchsorted(self.first, i, side="right")) - 1
        j = i - int(self.first[s])
        o = self.offsets[s]
        if self.kind == "sft":
            lo, hi = int(o[j]), int(o[j + 1])
            return self.shards["tokens"][s][lo:hi], self.shards["mask"][s][lo:hi]
        return tuple(self.shards[r][s][int(o[j, c]):int(o[j + 1, c])]
                     for c, r in enumerate(("prompt", "chosen", "rejected")))


def pack_rows(lengths: np.ndarray, order: np.ndarray, seq_len: int) -> np.ndarray:
    """Next-fit packing of examples (in `order`) taking `lengths` positions each -> row start indices
    into `order` (len = rows + 1)."""
    starts = [0]
    used = 0
    for k, i in enumerate(order):
        n = int(lengths[i])
        if used + n > seq_len and used > 0:
            starts.append(k)
            used = 0
        used += n
    starts.append(len(order))
    return np.asarray(starts, dtype=np.int64)


class Loader:
    def __init__(self, kind: str, data: Any, split: str, seq_len: int, micro_batch: int, global_batch: int,
                 rank: int, world_size: int, seed: int, pad_id: int, packed: bool,
                 doc_delimiters: tuple[int, int] | None = None, reset_positions: bool = True,
                 trim: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.kind, self.data, self.split = kind, data, split
        self.T, self.B, self.rank, self.W = seq_len, micro_batch, rank, world_size
        self.shuffle = split == "train"
        self.G = global_batch if self.shuffle else micro_batch * world_size
        if self.G % (micro_batch * world_size):
            raise ValueError(f"global_batch {global_batch} is not a multiple of micro_batch*world_size "
                             f"{micro_batch * world_size}")
        self.A = self.G // (micro_batch * world_size)
        self.seed, self.pad_id, self.packed = seed, pad_id, packed and kind == "sft"
        self.doc_delimiters = doc_delimiters if kind == "pretrain" else None
        self.reset_positions = reset_positions
        # padding to the batch's longest row, and length-sorted steps, for one-example-per-row batches
        self.trim = trim and kind in ("sft", "dpo") and not self.packed
        self.bucket = self.trim and self.shuffle
        self._epoch_cache: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self.reset()

    # ---- order ------------------------------------------------------------------------------------
    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(permutation of the epoch's examples/windows, packed row starts or None); two epochs cached."""
        if epoch not in self._epoch_cache:
            n = self.data.n
            order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                     else np.arange(n, dtype=np.int64))
            rows = pack_rows(self.data.lengths - 1, order, self.T) if self.packed else None
            if len(self._epoch_cache) >= 2:
                self._epoch_cache.pop(min(self._epoch_cache))
            self._epoch_cache[epoch] = (order, rows)
        return self._epoch_cache[epoch]

    def _n(self, epoch: int) -> int:
        rows = self._order(epoch)[1]
        return self.data.n if rows is None else len(rows) - 1

    def _advance(self, pos: tuple[int, int], k: int) -> tuple[int, int]:
        epoch, off = pos[0], pos[1] + k
        while off >= (n := self._n(epoch)):
            off -= n
            epoch += 1
        return epoch, off

    @property
    def epoch(self) -> int:
        return self._advance(self._step, self._micro * self.B * self.W)[0]

    @property
    def samples_per_epoch(self) -> int:
        return self._n(self.epoch)

    def reset(self) -> None:
        self._step: tuple[int, int] = (0, 0)  # (epoch, sample offset) where the current optimizer step starts
        self._micro = 0

    def state_dict(self) -> dict[str, Any]:
        epoch, offset = self._advance(self._step, self._micro * self.B * self.W)
        return {"kind": self.kind, "split": self.split, "seed": self.seed, "epoch": epoch, "offset": offset,
                "packed": self.packed}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("kind") != self.kind or d.get("packed", False) != self.packed:
            raise UserError(f"dataloader state is for {d.get('kind')} (packed={d.get('packed')}) data, this run "
                            f"reads {self.kind} (packed={self.packed}); resume with the settings of the checkpoint")
        self._step, self._micro = (int(d["epoch"]), int(d["offset"])), 0

    # ---- batches ----------------------------------------------------------------------------------
    def _sample_length(self, epoch: int, offset: int) -> int:
        """Positions a padded sample fills (sft: the example; dpo: prompt + the longer response)."""
        i = int(self._order(epoch)[0][offset])
        lengths = self.data.lengths
        return int(lengths[i] if lengths.ndim == 1 else lengths[i, 0] + lengths[i, 1:].max())

    def _samples(self) -> list[tuple[int, int]]:
        """(epoch, offset) of this rank's B samples for the current micro-step. With length bucketing the
        step's G samples are first sorted by length (ties by position), so each micro-batch holds similar
        lengths: the step still trains on the same samples (same gradient), with less padding."""
        start = self._micro * self.B * self.W + self.rank * self.B
        if self.bucket:
            step = [self._step]
            for _ in range(self.G - 1):
                step.append(self._advance(step[-1], 1))
            step.sort(key=lambda p: self._sample_length(*p))
            out = step[start:start + self.B]
        else:
            out = [self._advance(self._step, start)]
            for _ in range(self.B - 1):
                out.append(self._advance(out[-1], 1))
        self._micro += 1
        if self._micro == self.A:
            self._step, self._micro = self._advance(self._step, self.G), 0
        return out

    def next_batch(self) -> dict[str, torch.Tensor]:
        samples = self._samples()
        B, T = self.B, self.T
        if self.kind == "pretrain":
            index = [int(self._order(e)[0][o]) for e, o in samples]
            x = torch.from_numpy(np.stack([self.data.window(i) for i in index]).astype(np.int64))  # (B, T+1)
            out = {"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous(),
                   "sample_index": torch.tensor(index, dtype=torch.long)}
            if self.doc_delimiters is not None:
                out["doc_ids"] = document_ids(out["input_ids"], *self.doc_delimiters)
                if not self.reset_positions:
                    out["positions"] = torch.arange(T).expand(B, T).contiguous()
            return out
        if self.kind == "dpo":
            return self._dpo([int(self._order(e)[0][o]) for e, o in samples])
        ids = np.full((B, T), self.pad_id, dtype=np.int64)
        labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        doc_ids = np.zeros((B, T), dtype=np.int64)
        for b, (e, o) in enumerate(samples):
            order, rows = self._order(e)
            members = order[rows[o]:rows[o + 1]] if rows is not None else order[o:o + 1]
            pos = 0
            for d, i in enumerate(members):
                tok, mask = self.data.get(int(i))
                tok = tok.astype(np.int64)
                n = len(tok) - 1  # inputs tok[:-1], targets tok[1:] where the mask trains them
                ids[b, pos:pos + n] = tok[:-1]
                labels[b, pos:pos + n] = np.where(mask[1:] > 0, tok[1:], IGNORE_INDEX)
                doc_ids[b, pos:pos + n] = d
                pos += n
            doc_ids[b, pos:] = len(members)  # padding is its own document: nothing attends across it
        if self.trim:
            ids, labels = (a[:, :self._width(int((labels != IGNORE_INDEX).any(0).nonzero()[0].max(initial=0)) + 1)]
                           for a in (ids, labels))
        out = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
        if self.packed:
            out["doc_ids"] = torch.from_numpy(doc_ids)
        else:  # one example per row: its example number (packed rows have none, see the module docstring)
            out["sample_index"] = torch.tensor([int(self._order(e)[0][o]) for e, o in samples], dtype=torch.long)
        return out

    def _width(self, used: int) -> int:
        """Columns a trimmed batch keeps: its longest row rounded up to TRIM_MULTIPLE (few distinct shapes
        for torch.compile), at most T."""
        return min(self.T, -(-used // TRIM_MULTIPLE) * TRIM_MULTIPLE)

    def _dpo(self, indices: list[int]) -> dict[str, torch.Tensor]:
        B, T = self.B, self.T
        if self.trim:  # the longest prompt + response of the batch, chosen or rejected
            T = self._width(max(int(self.data.lengths[i, 0] + self.data.lengths[i, 1:].max()) - 1 for i in indices))
        out = {}
        for name, c in (("chosen", 1), ("rejected", 2)):
            ids = np.full((B, T), self.pad_id, dtype=np.int64)
            labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
            for b, i in enumerate(indices):
                parts = self.data.get(i)
                seq = np.concatenate([parts[0], parts[c]]).astype(np.int64)  # prompt + response, no gap
                n, p = len(seq) - 1, len(parts[0])
                ids[b, :n] = seq[:-1]
                labels[b, p - 1:n] = seq[p:]  # targets are the response tokens only
            out[f"{name}_input_ids"], out[f"{name}_labels"] = torch.from_numpy(ids), torch.from_numpy(labels)
        out["sample_index"] = torch.tensor(indices, dtype=torch.long)  # (B,) pair numbers
        return out


def document_ids(ids: torch.Tensor, bos_id: int, eos_id: int) -> torch.Tensor:
    """(B, T) token ids of pretraining windows -> (B, T) document number of each token within its row: a
    document starts at each BOS (every prepared document is BOS ... EOS), and the tokens before the first
    BOS (the tail of a document begun in an earlier window) are document 0. When one token is both BOS and
    EOS, only the second of two in a row starts a document (the first ends the previous one)."""
    starts = ids == bos_id
    if bos_id == eos_id:
        starts[:, 1:] &= ids[:, :-1] == eos_id
    return starts.long().cumsum(dim=1)


def build_loader(kind: str, root: str | Path, split: str, *, seq_len: int, micro_batch: int, global_batch: int,
                 rank: int, world_size: int, seed: int, pad_id: int | None, packed: bool = False,
                 tokenizer_identity: dict[str, Any] | None = None, check_hashes: bool = False,
                 doc_delimiters: tuple[int, int] | None = None, reset_positions: bool = True,
                 trim: bool = False) -> Loader:
    """kind: pretrain | sft | dpo; split: train | val. Verifies the data (manifest, tokenizer, shard sizes,
    hashes if asked) first; every problem is an errors.UserError naming the file and the fix.

    doc_delimiters (pretrain only): (BOS id, EOS id); batches then carry `doc_ids` (document_ids) so each token
    attends within its document only, and with reset_positions=False also `positions` (B, T), the index in
    the window, instead of RoPE positions restarting at every document (the model's default for doc_ids)."""
    if kind not in DATA_KIND or split not in ("train", "val"):
        raise ValueError(f"kind {kind!r} / split {split!r}")
    root = Path(root)
    manifest = verify(root, tokenizer_identity, check_hashes, kind=DATA_KIND[kind])
    shards = _Shards(root, manifest, split)
    data: Any
    if kind == "pretrain":
        data = _Pretrain(shards, seq_len)
    else:
        data = _Examples(shards, kind)
        longest = int(data.lengths.max() if kind == "sft" else
                      (data.lengths[:, 0] + data.lengths[:, 1:].max(axis=1)).max())
        if longest - 1 > seq_len:
            raise UserError(f"{root}/{split} has examples of {longest} tokens, longer than MAX_SEQ_LEN={seq_len} "
                            f"allows; re-run the preparation with MAX_SEQ_LEN={seq_len} (examples are never cut "
                            "at load time)")
    return Loader(kind, data, split, seq_len, micro_batch, global_batch, rank, world_size, seed,
                  0 if pad_id is None else pad_id, packed, doc_delimiters, reset_positions, trim)
