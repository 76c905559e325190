"""Frozen models and their precomputed outputs: calling a teacher / reference (ours or transformers'), and
the caches of their outputs (teacher top-k for distillation, DPO reference log-probs): the readers the
objectives use (TeacherCache, ReferenceCache) and the writer behind `python objectives.py cache-teacher|
cache-reference`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

import precision
from distributed import unwrap
from errors import UserError
from losses import IGNORE_INDEX
from model import Transformer

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np

# ---- frozen models (teacher, reference): calling and freezing them --------------------------------------


def logits_of(model: nn.Module, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
              positions: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, T, V) from our Transformer or a transformers model (which returns an output object)."""
    if doc_ids is not None:
        if not hasattr(unwrap(model), "layers"):  # a transformers model has no document masking
            raise UserError("document-masked batches (SFT_BATCHING=packed, PRETRAIN_DOC_MASKING=true) need a "
                            "teacher of this project's architecture: load it with model_utils (any source), or "
                            "use SFT_BATCHING=padded / PRETRAIN_DOC_MASKING=false")
        out = model(input_ids, doc_ids=doc_ids, positions=positions)
    else:
        out = model(input_ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def vocab_size_of(model: nn.Module) -> int:
    m = unwrap(model)
    args: Any = getattr(m, "args", None) or getattr(m, "config", None)  # ModelArgs, or an HF model's config
    return int(args.vocab_size)


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def hidden_rows(model: nn.Module, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """-> (rows (B*T, d), head: rows (n, d) -> logits (n, V)): the final hidden states of our Transformer and
    its output layer, so a caller can take the logits a chunk of rows at a time. A transformers model makes
    the logits inside its forward: its rows are then the logits (B*T, V) and the head the identity."""
    m = unwrap(model)
    if isinstance(m, Transformer):
        h = model(input_ids, doc_ids=doc_ids, positions=positions, return_hidden=True)  # (B, T, d)
        return h.flatten(0, 1), m.output
    return logits_of(model, input_ids, doc_ids, positions).flatten(0, 1), lambda rows: rows


def concat_pairs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A preference batch as one (2B, T) forward: [chosen; rejected] ids and labels."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # (2B, T)
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])  # (2B, T)
    return ids, labels



# ---- precomputed frozen-model outputs (teacher top-k, DPO reference log-probs) ----------------------
# A cache is a directory: manifest.json + .npy arrays whose first axis is the loader's `sample_index`
# (a sample's id within its split, independent of seed, epoch and world size), so any run over the
# same shards reads the right rows whatever its batch geometry. Written into <out>.tmp, then renamed.

CACHE_FORMAT = "llama3-objectives-cache-v1"


def _read_cache_manifest(path: str, kind: str, setting: str) -> dict[str, Any]:
    import json
    from pathlib import Path

    f = Path(path) / "manifest.json"
    if not f.is_file():
        raise UserError(f"{setting}={path}: no manifest.json there; build it with `python objectives.py "
                        f"cache-{kind} ...` or unset {setting}")
    m = json.loads(f.read_text())
    if m.get("format") != CACHE_FORMAT or m.get("kind") != kind:
        raise UserError(f"{setting}={path} is not a {kind} cache of this version ({m.get('format')}, "
                        f"{m.get('kind')}); rebuild it with `python objectives.py cache-{kind}`")
    return m


def _rows(index: torch.Tensor, n: int, path: str) -> np.ndarray:
    # the training step keeps sample_index on the host (objectives.batch_to_device): .cpu() is then free
    idx = index.cpu().long().numpy()
    if idx.min() < 0:
        raise UserError(f"cache {path}: a batch row has sample_index {int(idx.min())} (a filler row, not a sample); "
                        "cached outputs exist only for real samples: do not pad batches when using a cache")
    if idx.max() >= n:
        raise UserError(f"cache {path} has {n} samples but a batch asks for sample {int(idx.max())}: the cache was "
                        "built from other shards; rebuild it for this data")
    return idx


class TeacherCache:
    """Reads the tempered teacher's top-k: lookup(sample_index (B,)) -> (logps (B, T, K) fp32, ids (B, T, K) long,
    tail_logps (B, T) fp32), all of log_softmax(teacher_logits / temperature) (see write_cache)."""

    def __init__(self, path: str):
        import numpy as np

        self.path, self.manifest = path, _read_cache_manifest(path, "teacher", "TEACHER_CACHE_PATH")
        if "temperature" not in self.manifest:
            raise UserError(f"TEACHER_CACHE_PATH={path} is an older teacher cache without its temperature and tail "
                            "mass; rebuild it with `python objectives.py cache-teacher ...`")
        self.vocab_size, self.top_k = int(self.manifest["vocab_size"]), int(self.manifest["top_k"])
        self.temperature = float(self.manifest["temperature"])
        self.logps = np.load(f"{path}/topk_logps.npy", mmap_mode="r")  # (N, T, K) float16
        self.ids = np.load(f"{path}/topk_ids.npy", mmap_mode="r")  # (N, T, K) uint16 | int32
        self.tail = np.load(f"{path}/tail_logps.npy", mmap_mode="r")  # (N, T) float32

    def lookup(self, sample_index: torch.Tensor, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        import numpy as np

        idx = _rows(sample_index, self.logps.shape[0], self.path)
        logps = torch.from_numpy(np.ascontiguousarray(self.logps[idx])).float()
        ids = torch.from_numpy(np.ascontiguousarray(self.ids[idx]).astype(np.int64))
        tail = torch.from_numpy(np.ascontiguousarray(self.tail[idx])).float()
        return logps.to(device, non_blocking=True), ids.to(device, non_blocking=True), tail.to(device, non_blocking=True)


class ReferenceCache:
    """Reads DPO reference log-probs: lookup(sample_index (B,)) -> (chosen (B,), rejected (B,)) fp32."""

    def __init__(self, path: str):
        import numpy as np

        self.path, self.manifest = path, _read_cache_manifest(path, "reference", "DPO_REFERENCE_LOGPS_PATH")
        self.logps = np.load(f"{path}/ref_logps.npy", mmap_mode="r")  # (N, 2) float32

    def lookup(self, sample_index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(self.logps[_rows(sample_index, self.logps.shape[0], self.path)].copy())
        return rows[:, 0].to(device, non_blocking=True), rows[:, 1].to(device, non_blocking=True)


# (rows, V) logits a cache builder holds at once: 2**26 values (256 MiB in fp32), e.g. 523 rows of Llama 3's
# 128,256-token vocabulary; a whole (B, T, V) batch at B = 8, T = 8192 would be 33.6 GB.
CHUNK_VALUES = 2**26


def teacher_topk(rows: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], top_k: int,
                 temperature: float, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Of log_softmax(head(rows) / temperature), chunk_rows rows at a time: (top-k log-probs (N, K) fp32, their
    ids (N, K), log of the mass outside the top-k (N,) fp32, exact: a log-sum-exp over the complement)."""
    vals, ids, tails = [], [], []
    for s in range(0, rows.shape[0], chunk_rows):
        z = head(rows[s:s + chunk_rows]).float() / temperature  # (n, V) fp32
        lse = torch.logsumexp(z, -1)  # (n,)
        v, i = z.topk(top_k, dim=-1)  # (n, K)
        tail = (torch.logsumexp(z.scatter_(-1, i, float("-inf")), -1) - lse if top_k < z.shape[-1]
                else torch.full_like(lse, float("-inf")))
        vals.append(v - lse[:, None])
        ids.append(i)
        tails.append(tail)
        del z
    return torch.cat(vals), torch.cat(ids), torch.cat(tails)


def sequence_logps_chunked(rows: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                           chunk_rows: int) -> torch.Tensor:
    """losses.sequence_logps of head(rows) without its (B, T, V) logits: rows (B*T, d), labels (B, T) already
    shifted; only the target positions go through the head, chunk_rows at a time. -> (B,) fp32."""
    B, T = labels.shape
    flat = labels.flatten()
    where = (flat != IGNORE_INDEX).nonzero().squeeze(1)  # (M,) target positions
    out = torch.zeros(B, dtype=torch.float32, device=rows.device)
    for s in range(0, where.numel(), chunk_rows):
        at = where[s:s + chunk_rows]
        logits = head(rows[at]).float()  # (n, V) fp32
        out.index_add_(0, at // T, -F.cross_entropy(logits, flat[at], reduction="none"))
        del logits
    return out


def write_cache(kind: str, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], n: int, seq_len: int,
                out: str, top_k: int = 64, device: str | torch.device = "cpu", meta: dict[str, Any] | None = None,
                temperature: float = 1.0, compute_dtype: torch.dtype = torch.float32,
                chunk_rows: int | None = None) -> dict[str, Any]:
    """Store a frozen model's outputs for samples 0..n-1, read from `batches` (dicts with "sample_index"
    (B,) and the loader's keys; extra batches past the first full cover are skipped):
      kind "teacher":   of the TEMPERED teacher log_softmax(logits / temperature) at every position: the top-k
                        log-probs (n, seq_len, K) float16 with their ids (uint16 when the vocabulary fits), and
                        the log of the mass outside the top-k (n, seq_len) float32, exact (a log-sum-exp over
                        the complement). Stored at one T (in the manifest; the objective checks it equals
                        DISTILLATION_TEMPERATURE) because top-k values at T = 1 cannot give the tail mass at
                        another T; the ids are the same for every T.
      kind "reference": summed response log-probs of chosen and rejected, (n, 2) float32.
    The forward runs under autocast to `compute_dtype` (the training run's precision: the live teacher and
    reference run under it too); the logits exist chunk_rows rows at a time (default: CHUNK_VALUES / V),
    never for a whole batch, and the softmax statistics are fp32.
    Written into <out>.tmp, renamed to <out> when complete. Returns the manifest."""
    import shutil
    import time
    from functools import partial
    from pathlib import Path

    model, V = freeze(model), vocab_size_of(model)
    top_k = min(top_k, V)
    chunk_rows = chunk_rows or max(1, CHUNK_VALUES // V)
    final, tmp = Path(out), Path(f"{out}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arrays: _TeacherArrays | _ReferenceArrays
    outputs: Callable[[dict[str, torch.Tensor]], Any]
    if kind == "teacher":
        arrays = _TeacherArrays(tmp, n, seq_len, top_k, V)
        outputs = partial(_teacher_outputs, model=model, device=device, compute_dtype=compute_dtype,
                          chunk_rows=chunk_rows, top_k=top_k, temperature=temperature)
    else:
        arrays = _ReferenceArrays(tmp, n)
        outputs = partial(_reference_outputs, model=model, device=device, compute_dtype=compute_dtype,
                          chunk_rows=chunk_rows)
    t0 = time.time()
    missing = _fill(kind, batches, n, outputs, arrays)
    if missing:
        shutil.rmtree(tmp)
        raise UserError(f"cache-{kind}: the batches never produced {missing} of {n} sample indices; "
                        "sample_index must cover 0..n-1")
    arrays.close()
    manifest = {"format": CACHE_FORMAT, "kind": kind, **(meta or {}), "n_samples": n, "seq_len": seq_len,
                "vocab_size": V, "top_k": top_k if kind == "teacher" else None,
                **({"temperature": float(temperature), "values": "log_softmax(logits / temperature): top-k and "
                    "log of the mass outside it"} if kind == "teacher" else {}),
                "seconds": round(time.time() - t0, 1)}
    _commit(tmp, final, manifest)
    print(f"cache-{kind}: {n} samples x {seq_len} positions -> {final} in {manifest['seconds']} s")
    return manifest


def _teacher_outputs(batch: dict[str, torch.Tensor], model: nn.Module, device: str | torch.device,
                     compute_dtype: torch.dtype, chunk_rows: int, top_k: int, temperature: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch's tempered teacher top-k on the host: (log-probs (B, T, K) fp32, ids (B, T, K), log of the
    mass outside the top-k (B, T) fp32)."""
    doc_ids, positions = (batch[k].to(device) if k in batch else None for k in ("doc_ids", "positions"))
    B, T = batch["input_ids"].shape
    with precision.autocast(torch.device(device).type, compute_dtype):
        hidden, head = hidden_rows(model, batch["input_ids"].to(device), doc_ids, positions)
        vals, ids, tail = teacher_topk(hidden, head, top_k, temperature, chunk_rows)
    return vals.view(B, T, -1).cpu(), ids.view(B, T, -1).cpu(), tail.view(B, T).cpu()


def _reference_outputs(batch: dict[str, torch.Tensor], model: nn.Module, device: str | torch.device,
                       compute_dtype: torch.dtype, chunk_rows: int) -> torch.Tensor:
    """One preference batch's summed response log-probs on the host: (B, 2) fp32, chosen then rejected."""
    ids, labels = concat_pairs({k: v.to(device) for k, v in batch.items()})
    with precision.autocast(torch.device(device).type, compute_dtype):
        hidden, head = hidden_rows(model, ids)
        lp = sequence_logps_chunked(hidden, head, labels, chunk_rows).cpu()  # (2B,): chosen rows, then rejected
    return lp.view(2, -1).T


class _TeacherArrays:
    """The teacher cache's .npy files, memory-mapped in the cache's temporary dir and filled row by row."""

    def __init__(self, root: Path, n: int, seq_len: int, top_k: int, vocab_size: int):
        import numpy as np

        shape = (n, seq_len, top_k)
        self.logps = np.lib.format.open_memmap(root / "topk_logps.npy", "w+", np.float16, shape)
        self.ids = np.lib.format.open_memmap(root / "topk_ids.npy", "w+",
                                             np.uint16 if vocab_size <= 65536 else np.int32, shape)
        self.tail = np.lib.format.open_memmap(root / "tail_logps.npy", "w+", np.float32, (n, seq_len))

    def put(self, rows: np.ndarray, new: np.ndarray, outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
            ) -> None:
        """Store the batch rows flagged `new` (bool (B,)) at sample rows `rows`."""
        import numpy as np

        vals, ids, tail = outputs
        keep = torch.from_numpy(new)
        self.logps[rows] = vals[keep].numpy().astype(np.float16)
        self.ids[rows] = ids[keep].numpy().astype(self.ids.dtype)
        self.tail[rows] = tail[keep].numpy()

    def close(self) -> None:
        """Flush the files and drop the maps (the dir is renamed next)."""
        for arr in (self.logps, self.ids, self.tail):
            arr.flush()
        del self.logps, self.ids, self.tail


class _ReferenceArrays:
    """The reference cache's (n, 2) log-probs, held in memory and saved as one .npy on close."""

    def __init__(self, root: Path, n: int):
        import numpy as np

        self.root, self.logps = root, np.zeros((n, 2), np.float32)

    def put(self, rows: np.ndarray, new: np.ndarray, outputs: torch.Tensor) -> None:
        self.logps[rows] = outputs.numpy()[new]

    def close(self) -> None:
        import numpy as np

        np.save(self.root / "ref_logps.npy", self.logps)


def _fill(kind: str, batches: Iterable[dict[str, torch.Tensor]], n: int,
          outputs: Callable[[dict[str, torch.Tensor]], Any], arrays: _TeacherArrays | _ReferenceArrays) -> int:
    """Compute and store the outputs of each batch that holds samples not stored yet, with a progress bar,
    until all n are; -> how many samples the batches never produced."""
    import numpy as np
    from tqdm import tqdm

    filled = np.zeros(n, bool)
    bar = tqdm(total=n, desc=f"cache-{kind}", unit="sample")
    with torch.no_grad():
        for batch in batches:
            if "sample_index" not in batch:
                raise UserError("the data loader provides no 'sample_index'; caches need batches that carry it")
            idx = batch["sample_index"].cpu().numpy()
            new = ~filled[idx]
            if new.any():
                arrays.put(idx[new], new, outputs(batch))
                filled[idx[new]] = True
                bar.update(int(new.sum()))
            if filled.all():
                break
    bar.close()
    return int((~filled).sum())


def _commit(tmp: Path, final: Path, manifest: dict[str, Any]) -> None:
    """The manifest last, then <out>.tmp renamed to <out> (replacing an older cache there)."""
    import json
    import os
    import shutil

    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
