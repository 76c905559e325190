"""Pretraining data -> token shards (see data_preparation_utils for the format).

    python load_pretrain_dataset.py                                   # the embedded corpus (offline demo)
    python load_pretrain_dataset.py --dataset HuggingFaceFW/fineweb-edu --name sample-10BT --split train
    python load_pretrain_dataset.py --dataset 'corpus/*.jsonl' --text-field text --out data/pretrain
    python load_pretrain_dataset.py HF_PRETRAIN_DATASET_MIX_FILE=mix.json NUMBER_OF_CPU_PROCESSES=8

Sources (data_sources.py; also used by load_instruct_dataset.py and load_dpo_dataset.py):
- a Hugging Face hub id (`--name` config, `--split`), read with `datasets` in streaming mode;
- a local file, directory or glob: `.txt`/`.md` = ONE document per file (a paragraph is rarely a document,
  and a file is what people split corpora into); `.jsonl` = one JSON object per line (a line that is not
  valid JSON is skipped, counted and warned about with file:line); `.parquet` read in record batches;
- a mix file: {"datasets": [{"id", "name", "split", "weight", "max_datapoints"?,
  "text_field"?}], "seed", "shard_size"?}; records are interleaved by a random.Random(seed) draw weighted
  by `weight` over the sources not yet exhausted, so the order is reproducible.
Settings: TOKENIZER_CHECKPOINT_PATH, HF_PRETRAIN_DATASET_TARGET_PATH (or --out), HF_PRETRAIN_DATASET_MIX_FILE,
SHARD_SIZE (explicit setting wins over the mix file's), VAL_FRACTION, SEED (split seed),
NUMBER_OF_CPU_PROCESSES. The embedded corpus and the demo SFT/DPO sets hold a few hundred documents, so
they use max(VAL_FRACTION, 0.05) to get a usable validation split.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

import data_preparation_utils as dpu
from bpe import embedded_corpus
from data_sources import common_args, parse_cli, prepare_from_cli
from errors import run_cli


def embedded_source() -> tuple[Iterator[str], str]:
    return embedded_corpus(), (f"embedded corpus (pydoc_data.topics + stdlib docstrings, Python "
                               f"{sys.version.split()[0]})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Tokenize pretraining text into shards with a manifest.")
    common_args(parser)
    parser.add_argument("--text-field", default="text", help="field holding the text in jsonl/parquet/HF records")
    args, cfg = parse_cli(parser, argv)
    prepare_from_cli("pretrain", args, cfg, mix_key="HF_PRETRAIN_DATASET_MIX_FILE",
                     out_key="HF_PRETRAIN_DATASET_TARGET_PATH", demo=embedded_source,
                     make_encoder=dpu.PretrainEncoder, text_field=args.text_field)
    return 0


if __name__ == "__main__":
    run_cli(main)
