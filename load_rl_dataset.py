"""Prompts for reinforcement learning (GRPO) -> a directory of jsonl records, one per prompt.

    python load_rl_dataset.py --out data/rl                        # the offline demo arithmetic set
    python load_rl_dataset.py --dataset openai/gsm8k --name main --split train --out data/gsm8k
    python load_rl_dataset.py --dataset openai/gsm8k --name main --split test --val-fraction 1 --out data/gsm8k_test
    python load_rl_dataset.py --dataset prompts.jsonl --out data/rl   # also .parquet, a dir or glob of them,
                                                                      # or a dir written by datasets' save_to_disk

Records in (per record; the prompt column is --prompt-field, else the first of these present):
- {"prompt": str | messages, ...}: messages = [{"role": "system"|"user"|"assistant", "content": str}, ...],
  rendered later with the chat format and a generation prompt, so the last message must not be the assistant's;
- {"messages": messages, ...}: the same list under the SFT name;
- GSM8K: {"question": str, "answer": "...reasoning...\\n#### 72"}: the question is the prompt. In any record, a
  string `answer` with a "####" line becomes the final answer after it (thousands commas removed: "1,234" ->
  "1234"), and the text before it is kept as `solution`.
Every other field is kept as it is and passed to the reward functions (rewards.py), e.g. `answer`. A record
without a usable prompt counts as `invalid`, a jsonl line that is not a JSON object as `malformed`; both are
skipped and counted (the counts are in the manifest), as the other dataset CLIs do.

Out (written as a whole into a temp dir and renamed: --out is complete or absent):
- `train.jsonl`, `val.jsonl`: one record per line, {"prompt_id": n, "prompt": ..., other fields...}, prompt_id
  the record's number within its file (0, 1, ...). A record goes to val when the hash of its prompt (and SEED)
  falls under the validation fraction (--val-fraction, default the VAL_FRACTION setting; 1 = all held out), so
  one prompt never lands in both. The demo set has its own held-out questions: they are val.jsonl.
- `manifest.json`: {"kind": "rl", "format_version": 1, "source", "seed", "val_fraction", "counts": {"read",
  "invalid", "malformed"}, "fields": [the other fields], "splits": {"train"|"val": {"file", "records",
  "chat_prompts", "sha256"}}}. `read_split(root, split)` reads a split back, checking the hash.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import data_preparation_utils as dpu
import demo_data
from data_sources import common_args, mix_records, open_dataset, parse_cli
from errors import UserError, run_cli
from fileio import atomic_dir, fsync_dir, read_json

KIND = "rl"
FORMAT_VERSION = 1
DEFAULT_OUT = "data/rl"
SPLITS = ("train", "val")
PROMPT_FIELDS = ("prompt", "messages", "question")
ID_FIELD = "prompt_id"
_HF_SAVED = ("dataset_info.json", "state.json", "dataset_dict.json")  # what datasets' save_to_disk writes


# ---- records -------------------------------------------------------------------------------------------------


def messages_prompt(value: Any) -> list[dict[str, str]] | None:
    """A chat prompt: messages with known roles and string content, at least one user message, not ending
    with the assistant's (the model answers it). Roles normalized (human -> user, ...)."""
    if not isinstance(value, list) or not value:
        return None
    out = []
    for m in value:
        if not isinstance(m, dict):
            return None
        role = str(m.get("role", m.get("from", ""))).lower()  # ShareGPT's from / value also read
        content = m.get("content", m.get("value"))
        if role not in dpu.ROLES or not isinstance(content, str):
            return None
        out.append({"role": dpu.ROLES[role], "content": content})
    if out[-1]["role"] == "assistant" or not any(m["role"] == "user" and m["content"].strip() for m in out):
        return None
    return out


def gsm8k_answer(text: str) -> tuple[str, str] | None:
    """"...reasoning...\\n#### 1,234" -> ("1234", "...reasoning..."); None without a "####" line."""
    head, sep, tail = text.rpartition("####")
    if not sep or not tail.strip():
        return None
    return tail.strip().replace(",", ""), head.strip()


def to_rl_record(record: Any, prompt_field: str | None = None) -> dict[str, Any] | None:
    """A source record -> {"prompt": str | messages, other fields...}, or None when it has no usable prompt."""
    if not isinstance(record, dict):
        return None
    field = prompt_field or next((f for f in PROMPT_FIELDS if f in record), None)
    if field is None or field not in record:
        return None
    value = record[field]
    if isinstance(value, str):
        prompt: Any = value if value.strip() else None
    else:
        prompt = messages_prompt(value)
    if prompt is None:
        return None
    out = {"prompt": prompt, **{k: v for k, v in record.items() if k not in (field, "prompt")}}
    if isinstance(out.get("answer"), str) and (parsed := gsm8k_answer(out["answer"])) is not None:
        out["answer"], solution = parsed
        out.setdefault("solution", solution)
    return out


# ---- sources -------------------------------------------------------------------------------------------------


def _saved_hf_dataset(path: Path, split: str) -> Iterator[dict]:
    """A directory written by datasets' save_to_disk (a Dataset, or a DatasetDict: then `split` picks one)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise UserError(f"--dataset {path}: cannot read it as a saved Hugging Face dataset "
                        f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}); check the directory") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"--dataset {path} has no split {split!r} (it has {', '.join(ds)}); pass --split")
        ds = ds[split]
    yield from ds


def open_source(args: argparse.Namespace) -> tuple[Iterator[Any], str, dict[str, list[dict]] | None]:
    """-> (records, description, the demo's splits or None)."""
    if args.dataset:
        p = Path(args.dataset)
        if p.is_dir() and any((p / f).is_file() for f in _HF_SAVED):
            return _saved_hf_dataset(p, args.split), f"hf saved {p} split={args.split}", None
        records, desc = open_dataset(args.dataset, args.name, args.split)
        return records, desc, None
    if args.mix:
        records, desc, _ = mix_records(args.mix, None)
        return records, desc, None
    demo = demo_data.demo_arithmetic_set()
    print("no --dataset or --mix: preparing the offline demo arithmetic set (demo_data.py); pass --dataset for "
          "real data", file=sys.stderr)
    return iter(()), "demo arithmetic set (demo_data.demo_arithmetic_set)", demo


# ---- writing -------------------------------------------------------------------------------------------------


def collect(records: Iterator[Any], prompt_field: str | None, seed: int, val_fraction: float,
            ) -> tuple[dict[str, list[dict]], dict[str, int]]:
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    counts = {"read": 0, "invalid": 0, "malformed": 0}
    shown = 0
    for n, rec in enumerate(records):
        counts["read"] += 1
        if isinstance(rec, dpu.Malformed):
            counts["malformed"] += 1
            if shown < 10:
                print(f"warning: skipping {rec.where}: {rec.reason}", file=sys.stderr)
                shown += 1
            continue
        out = to_rl_record(rec, prompt_field)
        if out is None:
            counts["invalid"] += 1
            continue
        if ID_FIELD in out:
            raise UserError(f"record {n} has a field {ID_FIELD!r}, which load_rl_dataset.py sets (the record's "
                            "number in its split); rename that field in the data")
        split = dpu.split_of(dpu.record_key(out["prompt"]), seed, val_fraction)
        splits[split].append(out)
    return splits, counts


def _jsonl(records: list[dict]) -> bytes:
    lines = [json.dumps({ID_FIELD: i, **r}, ensure_ascii=False, default=str) for i, r in enumerate(records)]
    return "".join(line + "\n" for line in lines).encode("utf-8")


def check_out(out: Path, overwrite: bool) -> bool:
    """-> whether `out` holds something (which only --overwrite may replace)."""
    taken = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if taken and not overwrite:
        raise UserError(f"output {out} already exists and is not empty; choose another --out, or pass "
                        "--overwrite to replace the RL prompts there")
    return taken


def write(out: Path, splits: dict[str, list[dict]], manifest: dict[str, Any], overwrite: bool) -> None:
    """Both splits and the manifest into a temp dir, renamed to `out`; with overwrite, an existing RL dataset
    at `out` is replaced only once the new one is complete."""
    replace = None
    if check_out(out, overwrite):
        old = read_json(out / "manifest.json") if (out / "manifest.json").is_file() else None
        if not isinstance(old, dict) or old.get("kind") != KIND:
            raise UserError(f"--overwrite: {out} is not an RL prompt dir written by load_rl_dataset.py (no "
                            "manifest.json of kind rl); remove it yourself or choose another --out")
        replace, out = out, out.with_name(f".{out.name}.new")
        shutil.rmtree(out, ignore_errors=True)
    with atomic_dir(out) as tmp:
        manifest["splits"] = {}
        for split in SPLITS:
            data = _jsonl(splits[split])
            dpu.atomic_write(tmp / f"{split}.jsonl", data, rerun_note="")
            manifest["splits"][split] = {"file": f"{split}.jsonl", "records": len(splits[split]),
                                         "chat_prompts": sum(isinstance(r["prompt"], list) for r in splits[split]),
                                         "sha256": hashlib.sha256(data).hexdigest()}
        dpu.atomic_write(tmp / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode(), rerun_note="")
    if replace is not None:
        trash = replace.with_name(f".{replace.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        replace.rename(trash)
        out.rename(replace)
        fsync_dir(replace.parent)
        shutil.rmtree(trash, ignore_errors=True)


def read_split(root: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """The records of one split of a directory written here, its sha256 checked against the manifest."""
    root = Path(root)
    manifest = read_json(root / "manifest.json", f"prepare the prompts with load_rl_dataset.py --out {root}")
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND or split not in manifest.get("splits", {}):
        raise UserError(f"{root} is not an RL prompt dir with a {split!r} split (manifest.json of kind {KIND!r}); "
                        "prepare it with load_rl_dataset.py")
    entry = manifest["splits"][split]
    data = (root / entry["file"]).read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise UserError(f"{root / entry['file']} does not match the sha256 in {root / 'manifest.json'} (changed "
                        "after it was written); prepare it again with load_rl_dataset.py")
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prompts (+ fields for the reward functions) for RL.")
    common_args(parser)
    parser.set_defaults(out=DEFAULT_OUT)
    parser.add_argument("--prompt-field", default=None,
                        help=f"the column holding the prompt (default: the first of {', '.join(PROMPT_FIELDS)})")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="fraction held out as val.jsonl by prompt hash (default: VAL_FRACTION; 1 = all)")
    args, cfg = parse_cli(parser, argv)
    val_fraction = cfg["VAL_FRACTION"] if args.val_fraction is None else args.val_fraction
    if not 0.0 <= val_fraction <= 1.0:
        raise UserError(f"--val-fraction {val_fraction} must be between 0 and 1")
    out = Path(args.out)
    check_out(out, args.overwrite)  # before the source is read
    records, desc, demo = open_source(args)
    if demo is not None:
        splits = {"train": demo["train"], "val": demo["test"]}
        counts = {"read": len(demo["train"]) + len(demo["test"]), "invalid": 0, "malformed": 0}
        val_fraction = len(demo["test"]) / counts["read"]
    else:
        splits, counts = collect(records, args.prompt_field, cfg["SEED"], val_fraction)
    kept = sum(len(v) for v in splits.values())
    if kept == 0:
        raise UserError(f"--dataset {args.dataset or args.mix}: none of {counts['read']} records has a usable "
                        f"prompt ({counts['invalid']} invalid, {counts['malformed']} malformed); records need a "
                        f"string or message-list field {' / '.join(PROMPT_FIELDS)} (or name it with --prompt-field)")
    fields = sorted({k for v in splits.values() for r in v for k in r} - {"prompt"})
    manifest = {"kind": KIND, "format_version": FORMAT_VERSION, "source": desc, "seed": cfg["SEED"],
                "val_fraction": val_fraction, "counts": counts, "fields": fields}
    write(out, splits, manifest, args.overwrite)
    print(f"{out}: {len(splits['train'])} train / {len(splits['val'])} val prompts (fields: "
          f"{', '.join(fields) or 'none'}; {counts['invalid']} invalid, {counts['malformed']} malformed skipped)")
    return 0


if __name__ == "__main__":
    run_cli(main)
