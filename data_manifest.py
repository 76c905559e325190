"""Reading and checking a prepared dataset dir: the format constants, the manifest, shard opening, `verify`.

data_preparation_utils.py writes the format (and documents it); the loaders call `verify` before they read a shard.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from errors import UserError
from fileio import sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
JOURNAL = "progress.json"
SPLITS = ("train", "val")
# role -> file prefix, per kind; "tokens" is the array counted against shard_size for pretrain/sft.
SHARD_FILES: dict[str, dict[str, str]] = {
    "pretrain": {"tokens": "data"},
    "sft": {"tokens": "data", "mask": "mask", "offsets": "offsets"},
    "dpo": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "offsets": "offsets"},
}
TOKEN_ROLES = {"pretrain": ("tokens",), "sft": ("tokens",), "dpo": ("prompt", "chosen", "rejected")}


def tokenizer_label(identity: dict[str, Any] | None) -> str:
    if not identity:
        return "an unknown tokenizer"
    return (f"{Path(str(identity.get('source', '?'))).name} ({identity.get('kind')}, vocab "
            f"{identity.get('vocab_size')}, sha256 {str(identity.get('sha256'))[:12]})")


_IDENTITY_KEYS = ("sha256", "vocab_size", "bos_id", "eos_id", "eot_id", "pad_id")


def same_tokenizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same file content and special ids; the path may differ (a moved tokenizer is still the same)."""
    return all(a.get(k) == b.get(k) for k in _IDENTITY_KEYS)


def _seed_manifest(root: Path) -> dict[str, Any]:
    """Manifest-less pretrain shards (<dir>/{train,val}/data_*.npy, uint32): described, with a warning."""
    splits = {}
    dtype = None
    for split in SPLITS:
        shards = []
        for i, p in enumerate(sorted((root / split).glob("data_*.npy"))):
            arr = open_shard(p)
            dtype = dtype or str(arr.dtype)
            shards.append({"index": i, "tokens": int(arr.shape[0]),
                           "files": {"tokens": {"path": f"{split}/{p.name}", "shape": list(arr.shape),
                                                "dtype": str(arr.dtype), "sha256": None}}})
        splits[split] = {"documents": None, "tokens": sum(s["tokens"] for s in shards), "stats": {},
                         "shards": shards}
    print(f"warning: {root} has no {MANIFEST} (seed-format shards): the tokenizer cannot be checked; "
          "re-run load_pretrain_dataset.py to get a manifest", file=sys.stderr)
    return {"format_version": 0, "kind": "pretrain", "tokenizer": None, "dtype": dtype, "complete": True,
            "splits": splits}


def open_shard(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"shard {path} is truncated or corrupt ({str(e).splitlines()[0]}); delete the dataset "
                        "dir and re-run the preparation") from None


def read_manifest(root: str | Path) -> dict[str, Any]:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data dir {root} does not exist; run the matching load_*_dataset.py to prepare it")
    path = root / MANIFEST
    if not path.is_file():
        if any(any((root / s).glob("data_*.npy")) for s in SPLITS):
            return _seed_manifest(root)
        hint = " (a preparation is unfinished: re-run it to resume)" if (root / JOURNAL).is_file() else ""
        raise UserError(f"{root} has no {MANIFEST}{hint}; run the matching load_*_dataset.py to prepare it")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); re-run the preparation") from None
    if manifest.get("format_version") != FORMAT_VERSION or not manifest.get("complete"):
        raise UserError(f"{path}: format version {manifest.get('format_version')} / complete="
                        f"{manifest.get('complete')}; re-run the preparation with this version of the repo")
    return manifest


def verify(root: str | Path, tokenizer_identity: dict[str, Any] | None = None, check_hashes: bool = False,
           kind: str | None = None) -> dict[str, Any]:
    """The training-start check; returns the manifest or raises UserError (one line, names what to do)."""
    root = Path(root)
    manifest = read_manifest(root)
    if kind is not None and manifest["kind"] != kind:
        raise UserError(f"{root} holds {manifest['kind']} data but this run needs {kind} data; point the "
                        "*_DATALOADER_ROOT_PATH setting at a dir prepared by the right load_*_dataset.py")
    data_tok = manifest.get("tokenizer")
    if tokenizer_identity is not None and data_tok is not None:
        if not same_tokenizer(data_tok, tokenizer_identity):
            raise UserError(f"{root} was tokenized with {tokenizer_label(data_tok)} but training uses "
                            f"{tokenizer_label(tokenizer_identity)}; re-run the data preparation with "
                            f"TOKENIZER_CHECKPOINT_PATH={tokenizer_identity.get('source')}")
    vocab = (tokenizer_identity or data_tok or {}).get("vocab_size")
    if vocab is not None and np.iinfo(np.dtype(manifest["dtype"])).max < vocab - 1:
        raise UserError(f"{root}: token dtype {manifest['dtype']} cannot hold ids of a {vocab}-token vocabulary; "
                        "re-run the preparation with the training tokenizer")
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            for f in shard["files"].values():
                path = root / f["path"]
                if not path.is_file():
                    raise UserError(f"shard {path} listed in {root / MANIFEST} is missing; re-run the preparation")
                arr = open_shard(path)
                if list(arr.shape) != f["shape"] or str(arr.dtype) != f["dtype"]:
                    raise UserError(f"shard {path} has shape {list(arr.shape)} {arr.dtype}, the manifest says "
                                    f"{f['shape']} {f['dtype']}; re-run the preparation")
                if check_hashes and not f.get("sha256"):
                    raise UserError(f"shard {path} has no sha256 to check against ({root} has seed-format shards "
                                    "without a manifest); re-run the preparation to get one, or do not ask for "
                                    "hash checks (VERIFY_DATA=false)")
                if check_hashes and sha256_file(path) != f["sha256"]:
                    raise UserError(f"shard {path} does not match its sha256 in {root / MANIFEST} (corrupted or "
                                    "modified); re-run the preparation with --overwrite")
    return manifest
