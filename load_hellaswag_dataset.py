"""Get HellaSwag into the project's format: one validated jsonl file (the official record layout).

    python load_hellaswag_dataset.py                              # the official validation jsonl (network)
    python load_hellaswag_dataset.py --source ~/hellaswag_val.jsonl   # a local copy of it
    python load_hellaswag_dataset.py --source Rowan/hellaswag     # the HF dataset (needs `datasets`)
    python load_hellaswag_dataset.py --demo                       # offline DEMO data, not a benchmark

--source is a URL, a local file (.jsonl in the official or HF `Rowan/hellaswag` layout, or .parquet /
.json that `datasets` reads) or an HF dataset id. Every record is validated; a malformed one stops the
run with `error: FILE:LINE: what is wrong` and nothing is written. Output records keep the official
fields (ind, activity_label, ctx_a, ctx_b, ctx, endings, source_id, split, split_type, label) with an
int label, written to a temp file and renamed, so a partial file never exists.

--demo builds a HellaSwag-format set from `pydoc_data.topics` (ships with Python): the context is a
documentation sentence plus the first words of the next one, the true ending is the rest of that next
sentence and the three distractors finish sentences from other topics. It is deterministic given
--seed and exists so the evaluator can run end to end without network. Its numbers say nothing about
HellaSwag; every record carries split_type "demo" and source_id "demo:pydoc_data.topics/...". It is written
to its own file (hellaswag_utils.DEMO_DATA), never over the real one; the evaluator and HELLASWAG_PATH's
default read it, with a note, while the real file is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import urllib.request
from pathlib import Path
from typing import Any

from data_preparation_utils import atomic_write, iter_jsonl
from errors import UserError, run_cli
from hellaswag_utils import DEFAULT_DATA, DEMO_DATA, validate_record

OFFICIAL_VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
OUT_FIELDS = ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id", "split",
              "split_type", "label")


# ---- sources ---------------------------------------------------------------------------------------
def normalize(doc: dict[str, Any], where: str, index: int) -> dict[str, Any]:
    """Validate one record (official or HF layout) and return it in the official layout, int label."""
    validate_record(doc, where)
    return {
        "ind": doc.get("ind", index),
        "activity_label": doc["activity_label"],
        "ctx_a": doc["ctx_a"],
        "ctx_b": doc["ctx_b"],
        "ctx": doc.get("ctx") or (doc["ctx_a"] + " " + doc["ctx_b"]).strip(),
        "endings": list(doc["endings"]),
        "source_id": doc.get("source_id", ""),
        "split": doc.get("split", "val"),
        "split_type": doc.get("split_type", ""),
        "label": int(doc["label"]),
    }


def read_local_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every line of a jsonl file, validated; a bad line fails naming path:line."""
    records: list[dict[str, Any]] = []
    for lineno, doc in iter_jsonl(path):
        records.append(normalize(doc, f"{path}:{lineno}", len(records)))
    if not records:
        raise UserError(f"{path} holds no records; expected HellaSwag jsonl, one JSON object per line")
    return records


def read_with_datasets(source: str, split: str) -> list[dict[str, Any]]:
    """An HF dataset id or a .parquet/.json file through `datasets` (the Rowan/hellaswag layout)."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"reading {source} needs the `datasets` package: pip install datasets") from None
    try:
        p = Path(source)
        if p.is_file():
            kind = {".parquet": "parquet", ".json": "json"}.get(p.suffix)
            if kind is None:
                raise UserError(f"{source}: unknown file type {p.suffix!r}; expected .jsonl, .json or .parquet")
            ds = datasets.load_dataset(kind, data_files=str(p), split="train")
        else:
            ds = datasets.load_dataset(source, split=split)
    except UserError:
        raise
    except Exception as e:  # offline hub, unknown id, unreadable file: all user-fixable
        raise UserError(f"could not load {source!r} (split {split!r}) with datasets: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}; pass a local jsonl with --source FILE") from None
    return [normalize(dict(row), f"{source}[{i}]", i) for i, row in enumerate(ds)]


def download(url: str, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Fetch a jsonl over HTTP(S) into memory and validate it."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (user-given http(s) URL)
            text = r.read().decode("utf-8")
    except Exception as e:
        raise UserError(f"could not download {url} ({type(e).__name__}: {e}); without network, download "
                        f"hellaswag_val.jsonl elsewhere and pass it with --source FILE "
                        f"(or --demo for offline demo data)") from None
    records: list[dict[str, Any]] = []
    for lineno, doc in iter_jsonl(text.splitlines(), name=url, hint=None):
        records.append(normalize(doc, f"{url}:{lineno}", len(records)))
    return records


def load_source(source: str, split: str = "validation") -> list[dict[str, Any]]:
    if re.match(r"^https?://", source):
        return download(source)
    p = Path(source).expanduser()
    if p.is_file():
        return read_local_jsonl(p) if p.suffix == ".jsonl" else read_with_datasets(str(p), split)
    if p.exists():
        raise UserError(f"--source {source} is a directory; pass the jsonl file inside it")
    if re.match(r"^[\w.-]+/[\w.-]+$", source) and not source.endswith((".jsonl", ".json", ".parquet")):
        return read_with_datasets(source, split)
    raise UserError(f"--source {source}: no such file, and not a URL or an HF dataset id (owner/name)")


# ---- demo data -----------------------------------------------------------------------------------------
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")


def _prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of running prose: no code blocks, grammar rules or headings."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if not block.strip() or any(ln.startswith((" ", "\t")) for ln in lines):
            continue  # indented = code / grammar / quoted example
        if any(ch in block for ch in ("::=", "***", "===", "---", ">>>")):
            continue
        out.append(re.sub(r"\s+", " ", block).strip())
    return out


def _candidate_pairs(topics: dict[str, str]) -> list[tuple[str, str, str]]:
    """(topic, sentence, next sentence) where both read as ordinary English sentences."""
    pairs = []
    for topic in sorted(topics):
        for para in _prose_paragraphs(topics[topic]):
            sents = _SENT_SPLIT.split(para)
            for a, b in zip(sents, sents[1:], strict=False):
                wa, wb = a.split(), b.split()
                if 6 <= len(wa) <= 45 and 9 <= len(wb) <= 35 and b.endswith(".") and ":" not in b:
                    pairs.append((topic, a, b))
    return pairs


def build_demo(n: int = 500, seed: int = 1234, n_prefix_words: int = 3) -> list[dict[str, Any]]:
    """A deterministic HellaSwag-format DEMO set from pydoc_data.topics (see the module doc)."""
    from pydoc_data.topics import topics

    pairs = _candidate_pairs(topics)
    rng = random.Random(seed)
    rng.shuffle(pairs)
    chosen = pairs[:n]
    if len(chosen) < n:
        raise UserError(f"--demo-n {n}: the embedded corpus yields only {len(pairs)} examples; ask for fewer")

    def split_next(sentence: str) -> tuple[str, str]:
        words = sentence.split()
        head = " ".join(words[:n_prefix_words])
        return head[0].lower() + head[1:], " ".join(words[n_prefix_words:])

    records = []
    for i, (topic, first, nxt) in enumerate(chosen):
        ctx_b, true_end = split_next(nxt)
        distractors: list[str] = []
        while len(distractors) < 3:  # other topics' sentence tails: fluent but off-topic
            t2, _, other = pairs[rng.randrange(len(pairs))]
            tail = split_next(other)[1]
            if t2 != topic and tail not in distractors and tail != true_end:
                distractors.append(tail)
        label = rng.randrange(4)
        endings = distractors[:label] + [true_end] + distractors[label:]
        records.append({
            "ind": i, "activity_label": topic.replace("-", " ").capitalize(), "ctx_a": first, "ctx_b": ctx_b,
            "ctx": first + " " + ctx_b, "endings": endings, "source_id": f"demo:pydoc_data.topics/{topic}",
            "split": "val", "split_type": "demo", "label": label,
        })
    return records


# ---- output ------------------------------------------------------------------------------------------------
def write_jsonl_atomic(records: list[dict[str, Any]], out: str | os.PathLike) -> Path:
    """The official fields of every record, one JSON line each, written atomically (no partial file ever)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps({k: r[k] for k in OUT_FIELDS}, ensure_ascii=False) + "\n" for r in records)
    atomic_write(out, text.encode("utf-8"), rerun_note="")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write HellaSwag (validated, official layout) to a jsonl file.")
    ap.add_argument("--source", default=OFFICIAL_VAL_URL,
                    help="URL, local .jsonl/.json/.parquet, or HF dataset id (default: the official val jsonl)")
    ap.add_argument("--split", default="validation", help="split for an HF dataset id (default validation)")
    ap.add_argument("--out", default=None, help=f"output jsonl (default {DEFAULT_DATA}; with --demo "
                                                f"{DEMO_DATA})")
    ap.add_argument("--limit", type=int, default=None, help="keep the first N records")
    ap.add_argument("--demo", action="store_true", help="build offline DEMO data from pydoc_data.topics")
    ap.add_argument("--demo-n", type=int, default=500, help="number of demo examples (default 500)")
    ap.add_argument("--seed", type=int, default=1234, help="demo data seed")
    a = ap.parse_args(argv)
    if a.demo:
        records = build_demo(a.demo_n, a.seed)
        what = f"DEMO data from pydoc_data.topics (seed {a.seed}; not a benchmark)"
    else:
        records = load_source(a.source, a.split)
        what = a.source
    if a.limit is not None:
        records = records[: a.limit]
    out = write_jsonl_atomic(records, a.out or (DEMO_DATA if a.demo else DEFAULT_DATA))
    print(f"wrote {len(records)} HellaSwag records from {what} to {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
