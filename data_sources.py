"""Where the dataset CLIs' records come from, and the flags and flow the three of them share.

A record source is a Hugging Face hub id (streamed with `datasets`), a local file / directory / glob
(`.txt`/`.md` one document per file, `.jsonl`, `.parquet`), a mix file (seeded weighted interleaving of
sources) or, without any of these, the CLI's offline demo set. The user-facing description of the
sources and of the mix-file format is the docstring of load_pretrain_dataset.py, which error messages
point to. `prepare_from_cli` is what load_pretrain_dataset.py, load_instruct_dataset.py and
load_dpo_dataset.py do after parsing their flags: pick the records, load the tokenizer, write the shards.
"""

from __future__ import annotations

import argparse
import glob
import json
import random
import sys
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import config
import data_preparation_utils as dpu
import tokenizer
from errors import UserError
from fileio import check_hub_id

TEXT_SUFFIXES = (".txt", ".md")
# The embedded corpus and demo sets have a few hundred documents: at least this val fraction, so the
# offline demo gets a validation split worth the name (real datasets use VAL_FRACTION as given).
DEMO_MIN_VAL_FRACTION = 0.05
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".json", ".parquet")


def local_files(spec: str) -> list[Path] | None:
    """A file, a directory (searched recursively) or a glob -> sorted data files; None if nothing local."""
    p = Path(spec)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
    else:
        files = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())
    if not files and (p.is_dir() or glob.has_magic(spec)):
        raise UserError(f"--dataset {spec!r} matches no {'/'.join(SUFFIXES)} files; check the path or glob")
    return files or None


def iter_local(files: list[Path]) -> Iterator[Any]:
    """Records of local files in order: str for text files, dict (or dpu.Malformed) for jsonl / parquet."""
    for f in files:
        if f.suffix in TEXT_SUFFIXES:
            yield f.read_text(encoding="utf-8", errors="replace")
        elif f.suffix == ".parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
                yield from batch.to_pylist()
        else:
            for _, rec in dpu.iter_jsonl(f, errors="replace", malformed="yield"):
                yield rec


def iter_hub(dataset_id: str, name: str | None, split: str) -> Iterator[dict]:
    try:
        import datasets

        ds = datasets.load_dataset(dataset_id, name or None, split=split, streaming=True)
        it = iter(ds)
        first = next(it, None)
    except UserError:
        raise
    except Exception as e:  # offline, no such repo, bad config name: all user-fixable
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"could not stream {dataset_id!r} (name={name!r}, split={split!r}) from the Hugging Face "
                        f"hub: {msg[:200]}; pass a local path (--dataset data/*.jsonl) instead") from None
    if first is not None:
        yield first
        yield from it


def open_dataset(spec: str, name: str | None = None, split: str = "train") -> tuple[Iterator[Any], str]:
    """-> (records, description for the manifest)."""
    files = local_files(spec)
    if files is not None:
        return iter_local(files), f"local {spec} ({len(files)} files)"
    check_hub_id(spec, "--dataset")  # a mistyped local path is refused here, not asked of the hub
    return iter_hub(spec, name, split), f"hf {spec} name={name} split={split}"


def with_text_field(records: Iterable[Any], text_field: str, where: str) -> Iterator[Any]:
    """dict records -> their text; a record without a string text field becomes dpu.Malformed (skipped)."""
    for n, rec in enumerate(records):
        if isinstance(rec, dict):
            text = rec.get(text_field)
            if not isinstance(text, str):
                keys = ", ".join(list(rec)[:8])
                yield dpu.Malformed(f"{where} record {n}", json.dumps(rec, default=str)[:10000],
                                    f"no string field {text_field!r} (fields: {keys}); set --text-field")
                continue
            yield text
        else:
            yield rec


def read_mix(path: str) -> dict[str, Any]:
    try:
        mix = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"mix file {path} not found; check the *_DATASET_MIX_FILE setting") from None
    except json.JSONDecodeError as e:
        raise UserError(f"mix file {path} is not valid JSON ({e}); see the format in load_pretrain_dataset.py") from None
    entries = mix.get("datasets") if isinstance(mix, dict) else None
    if not entries or not isinstance(entries, list):
        raise UserError(f"mix file {path} has no \"datasets\" list; expected {{\"datasets\": [{{\"id\", \"name\", "
                        "\"split\", \"weight\"}], \"seed\"}")
    for i, d in enumerate(entries):
        if not isinstance(d, dict) or not isinstance(d.get("id"), str):
            raise UserError(f"mix file {path}: datasets[{i}] has no string \"id\"")
        if not isinstance(d.get("weight", 1.0), int | float) or d.get("weight", 1.0) <= 0:
            raise UserError(f"mix file {path}: datasets[{i}] weight {d.get('weight')!r} must be a positive number")
    return mix


def mix_records(path: str, default_text_field: str | None) -> tuple[Iterator[Any], str, dict[str, Any]]:
    """Seeded weighted interleaving of the mix's sources; text_field None keeps dict records (SFT/DPO)."""
    mix = read_mix(path)
    entries = mix["datasets"]
    seed = int(mix.get("seed", 0))

    def source(d: dict) -> Iterator[Any]:
        records, desc = open_dataset(d["id"], d.get("name"), d.get("split", "train"))
        field = d.get("text_field", default_text_field)
        if field is not None:
            records = with_text_field(records, field, desc)
        if d.get("max_datapoints") is not None:
            records = islice(records, int(d["max_datapoints"]))
        return records

    def interleave() -> Iterator[Any]:
        rng = random.Random(seed)
        active = [(source(d), float(d.get("weight", 1.0))) for d in entries]
        while active:
            k = rng.choices(range(len(active)), weights=[w for _, w in active])[0]
            rec = next(active[k][0], StopIteration)
            if rec is StopIteration:
                active.pop(k)
            else:
                yield rec

    desc = "mix " + json.dumps({"datasets": entries, "seed": seed}, sort_keys=True)
    return interleave(), desc, mix


def common_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by the three dataset CLIs (besides --env-file and KEY=VALUE overrides)."""
    parser.epilog = "Any setting may follow as KEY=VALUE (e.g. SHARD_SIZE=1000000 NUMBER_OF_CPU_PROCESSES=4)."
    parser.add_argument("--env-file", default=None, help="settings file (default: ./.env when present)")
    parser.add_argument("--dataset", default=None, help="HF hub id, or a local file / dir / glob")
    parser.add_argument("--name", default=None, help="HF dataset config name")
    parser.add_argument("--split", default="train", help="HF split to read (default train)")
    parser.add_argument("--mix", default=None, help="JSON mix file (overrides the *_DATASET_MIX_FILE setting)")
    parser.add_argument("--out", default=None, help="output dir (overrides the *_DATASET_TARGET_PATH setting)")
    parser.add_argument("--overwrite", action="store_true", help="replace data already prepared in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_cli(parser: argparse.ArgumentParser, argv: list[str] | None):
    """-> (args, cfg): KEY=VALUE overrides are pulled out first (config.split_overrides)."""
    overrides, rest = config.split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(rest)
    return args, config.load_config(args.env_file, overrides)


def shard_size_for(cfg: config.Config, mix: dict[str, Any] | None) -> int:
    if mix and mix.get("shard_size") and cfg.source("SHARD_SIZE") in ("", "default", None):
        return int(mix["shard_size"])
    return int(cfg["SHARD_SIZE"])


def prepare_from_cli(kind: str, args: argparse.Namespace, cfg: config.Config, *, mix_key: str, out_key: str,
                     demo: Callable[[], tuple[Iterable[Any], str]], make_encoder: Callable[[tokenizer.Tokenizer], Any],
                     text_field: str | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the three dataset CLIs share after parsing: pick the records (--dataset, else --mix or the `mix_key`
    setting, else the offline demo set), load the tokenizer, write the shards. text_field None keeps dict
    records (SFT/DPO); the demo set gets at least DEMO_MIN_VAL_FRACTION."""
    mix_file = args.mix or cfg[mix_key]
    records: Iterable[Any]
    mix, val_fraction = None, cfg["VAL_FRACTION"]
    if args.dataset:
        records, desc = open_dataset(args.dataset, args.name, args.split)
        if text_field is not None:
            records = with_text_field(records, text_field, desc)
            desc += f" text_field={text_field}"
    elif mix_file:
        records, desc, mix = mix_records(mix_file, text_field)
    else:
        records, desc = demo()
        val_fraction = max(val_fraction, DEMO_MIN_VAL_FRACTION)
        print(f"no --dataset, --mix or {mix_key}: preparing the offline demo set ({desc}); pass --dataset for "
              "real data", file=sys.stderr)
    tok = tokenizer.load_tokenizer(cfg["TOKENIZER_CHECKPOINT_PATH"])
    return dpu.prepare(kind, records, args.out or cfg[out_key], make_encoder(tok), tokenizer_identity=tok.identity(),
                       source=desc, seed=cfg["SEED"], val_fraction=val_fraction, shard_size=shard_size_for(cfg, mix),
                       workers=cfg["NUMBER_OF_CPU_PROCESSES"], options=options, overwrite=args.overwrite,
                       progress=not args.no_progress)
