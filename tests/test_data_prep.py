"""Data preparation: shards decode to the documents, resume is byte-identical, deterministic split,
SFT/DPO rendering goldens, input adapters, and the training-start checks (tokenizer, truncation)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data_preparation_utils as dpu
import data_sources
import dataloaders as dl
import load_dpo_dataset as ldpo
import load_instruct_dataset as lid
import tokenizer
from errors import UserError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok():
    return tokenizer.load_tokenizer(ROOT / "tokenizer.model")


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
    """A second, different tokenizer: 256 single bytes + the Llama 3 specials."""
    path = tmp_path_factory.mktemp("tok") / "bytes.model"
    tokenizer.write_tiktoken_file({bytes([i]): i for i in range(256)}, path)
    return tokenizer.load_tokenizer(path)


def docs_fixture() -> list[str]:
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)[:30]]
    # unicode, a literal special-token string (must stay text), whitespace-only, empty (skipped), a long run
    docs[3:3] = ["héllo wörld ✓ 日本語", "text with <|eot_id|> inside", "   ", "", "x" * 30000 + " tail"]
    return docs


def dir_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_pretrain(tok, docs, out, **kw):
    args = dict(tokenizer_identity=tok.identity(), source="test docs", seed=7, val_fraction=0.3,
                shard_size=700, workers=1, progress=False)
    args.update(kw)
    return dpu.prepare("pretrain", docs, out, dpu.PretrainEncoder(tok), **args)


def split_docs(stream: np.ndarray, bos: int) -> list[np.ndarray]:
    starts = np.flatnonzero(stream == bos).tolist() + [len(stream)]
    return [stream[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]


def read_stream(root: Path, manifest: dict, split: str, role: str = "tokens") -> np.ndarray:
    return np.concatenate([np.load(root / s["files"][role]["path"]) for s in manifest["splits"][split]["shards"]])


def test_shards_decode_to_the_documents(tok, tmp_path):
    docs = docs_fixture()
    m = run_pretrain(tok, docs, tmp_path / "d", workers=2)
    assert m["dtype"] == "uint16" and m["complete"] and m["tokenizer"] == tok.identity()
    seen = {}
    for split in ("train", "val"):
        stream = read_stream(tmp_path / "d", m, split)
        assert stream.dtype == np.uint16 and len(stream) == m["splits"][split]["tokens"]
        assert all(s["tokens"] == 700 for s in m["splits"][split]["shards"][:-1])  # docs span shard boundaries
        pieces = split_docs(stream, tok.bos_id)
        assert len(pieces) == m["splits"][split]["documents"]
        for p in pieces:
            assert p[-1] == tok.eos_id
            text = tok.decode(p[1:-1].tolist())
            assert p[1:-1].tolist() == tok.encode(text)  # the ids are the tokenizer's own, not just equal text
            seen.setdefault(split, []).append(text)
    nonempty = [d for d in docs if d]
    assert sorted(seen["train"] + seen["val"]) == sorted(nonempty)
    for part in seen.values():  # input order is kept within each split
        idx = [nonempty.index(t) for t in part]
        assert idx == sorted(idx)
    assert seen["val"] and seen["train"]


def test_pretrain_encoder_frames_tiktoken_ids_with_bos_eos(tok):
    enc = dpu.PretrainEncoder(tok)
    for text in docs_fixture() + ["mixed  \n\n spaces\t\tand tabs"]:
        if text:  # raw tiktoken is the independent reference for text without 25k-char runs
            out = enc(text)[0]["tokens"].tolist()
            assert out == [tok.bos_id, *tok.model.encode_ordinary(text), tok.eos_id]
    for text in ["a" * 26000 + " b", " " * 26000 + "c"]:  # long runs take the chunked path: still lossless
        out = enc(text)[0]["tokens"].tolist()
        assert out[0] == tok.bos_id and out[-1] == tok.eos_id and tok.decode(out[1:-1]) == text


def test_split_is_deterministic_and_worker_independent(tok, tmp_path):
    keys = [f"document number {i}" for i in range(3000)]
    splits = [dpu.split_of(k, 7, 0.1) for k in keys]
    assert 0.08 < splits.count("val") / len(keys) < 0.12
    assert splits != [dpu.split_of(k, 8, 0.1) for k in keys]  # the seed matters
    # a fresh interpreter (different hash randomization) agrees
    code = "import data_preparation_utils as d; print(''.join('v' if d.split_of(f'document number {i}', 7, 0.1) " \
           "== 'val' else 't' for i in range(3000)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.strip()
    assert out == "".join("v" if s == "val" else "t" for s in splits)
    docs = docs_fixture()
    run_pretrain(tok, docs, tmp_path / "w1", workers=1)
    run_pretrain(tok, docs, tmp_path / "w2", workers=2)
    assert dir_bytes(tmp_path / "w1") == dir_bytes(tmp_path / "w2")


@contextlib.contextmanager
def interrupted_after_shards(n: int):
    """A preparation stopped right after its n-th shard is journaled (the kill the journal exists for):
    dpu.write_journal, which runs in the preparing process (the pool's workers only encode), raises once the
    journal is on disk. The block must end in that interruption."""
    journal = dpu.write_journal
    written = 0

    def journal_then_stop(*args, **kwargs):
        nonlocal written
        journal(*args, **kwargs)
        written += 1
        if written == n:
            raise RuntimeError(f"interrupted after {written} shards")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dpu, "write_journal", journal_then_stop)
        with pytest.raises(RuntimeError, match=f"interrupted after {n} shards"):
            yield


def journaled_shards(root: Path) -> int:
    journal = json.loads((root / dpu.JOURNAL).read_text())
    return sum(len(journal["splits"][s]["shards"]) for s in ("train", "val"))


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_interrupted_prep_resumes_byte_identical(tok, tmp_path, kind):
    if kind == "pretrain":
        records, enc, size = docs_fixture(), dpu.PretrainEncoder(tok), 700
    else:
        import demo_data

        records, enc, size = demo_data.demo_instruct_set(modules=False), lid.SFTEncoder(tok, "Be brief.", 0, 512), 1200
    kw = dict(tokenizer_identity=tok.identity(), source="s", seed=3, val_fraction=0.3, shard_size=size,
              progress=False, options={"k": kind})
    full = dpu.prepare(kind, records, tmp_path / "a", enc, **kw)
    assert sum(len(full["splits"][s]["shards"]) for s in ("train", "val")) > 5
    b = tmp_path / "b"
    with interrupted_after_shards(2):
        dpu.prepare(kind, records, b, enc, workers=2, **kw)
    assert not (b / dpu.MANIFEST).exists() and journaled_shards(b) == 2
    journal_2 = (b / dpu.JOURNAL).read_bytes()
    with interrupted_after_shards(2):  # resume, interrupted again
        dpu.prepare(kind, records, b, enc, **kw)
    assert journaled_shards(b) == 4
    # a kill after a shard's rename but before its journal entry: the journal lags behind the files
    (b / dpu.JOURNAL).write_bytes(journal_2)
    (b / "train" / "data_000001.npy.tmp").write_bytes(b"half a shard")
    dpu.prepare(kind, records, b, enc, **kw)
    assert dir_bytes(b) == dir_bytes(tmp_path / "a")
    # a finished dir is left alone; different settings are refused
    assert dpu.prepare(kind, records, b, enc, **kw) == full
    with pytest.raises(UserError, match="--overwrite"):
        dpu.prepare(kind, records, b, enc, **{**kw, "seed": 4})


def test_preparation_has_no_test_hooks():
    """Interruptions are simulated by patching the journal write (above); no function of the preparation takes
    a parameter, or holds a message, that exists only for tests."""
    import ast
    import re

    src = (ROOT / "data_preparation_utils.py").read_text()
    params = [a.arg for node in ast.walk(ast.parse(src)) if isinstance(node, ast.arguments)
              for a in node.posonlyargs + node.args + node.kwonlyargs]
    assert "encoder" in params and "shard_size" in params  # the walk sees prepare's parameters
    assert [p for p in params if re.search("fail|fault|hook|inject", p)] == []
    assert "test hook" not in src


def test_tokenizer_mismatch_is_one_clear_line_exit_2(tok, byte_tok, tmp_path):
    run_pretrain(byte_tok, docs_fixture()[:5], tmp_path / "d")
    r = subprocess.run([sys.executable, "data_preparation_utils.py", "verify", str(tmp_path / "d"),
                        "--tokenizer", str(ROOT / "tokenizer.model")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "bytes.model" in lines[0] and "tokenizer.model" in lines[0] and "re-run" in lines[0]
    with pytest.raises(UserError, match="bytes.model.*tokenizer.model"):
        dl.build_loader("pretrain", tmp_path / "d", "train", seq_len=16, micro_batch=1, global_batch=1, rank=0,
                        world_size=1, seed=0, pad_id=0, tokenizer_identity=tok.identity())
    r = subprocess.run([sys.executable, "data_preparation_utils.py", "verify", str(tmp_path / "d"), "--tokenizer",
                        byte_tok.source, "--check-hashes"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_truncated_or_corrupt_shard_is_named(tok, tmp_path):
    d = tmp_path / "d"
    m = run_pretrain(tok, docs_fixture(), d)
    shard = d / m["splits"]["train"]["shards"][1]["files"]["tokens"]["path"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    kw = dict(seq_len=16, micro_batch=1, global_batch=1, rank=0, world_size=1, seed=0, pad_id=0)
    with pytest.raises(UserError, match=str(shard)):
        dl.build_loader("pretrain", d, "train", **kw)
    shard.write_bytes(data[:-3] + b"\x01\x02\x03")  # same size, different bytes: only the hash sees it
    dl.build_loader("pretrain", d, "train", **kw)
    with pytest.raises(UserError, match=f"{shard}.*sha256"):
        dl.build_loader("pretrain", d, "train", check_hashes=True, **kw)
    shard.write_bytes(b"not numpy")
    with pytest.raises(UserError, match="truncated or corrupt"):
        dpu.verify(d)
    (d / dpu.MANIFEST).unlink()
    shutil.rmtree(d / "train")
    shutil.rmtree(d / "val")
    with pytest.raises(UserError, match="no manifest.json"):
        dpu.verify(d)


def test_seed_format_shards_load_with_warning(tmp_path, capsys):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        np.save(tmp_path / split / "data_000000.npy", np.arange(100, dtype=np.uint32))
        np.save(tmp_path / split / "data_000001.npy", np.arange(100, 200, dtype=np.uint32))
    loader = dl.build_loader("pretrain", tmp_path, "val", seq_len=10, micro_batch=2, global_batch=2, rank=0,
                             world_size=1, seed=0, pad_id=0)
    assert "no manifest.json" in capsys.readouterr().err
    b = loader.next_batch()
    assert b["input_ids"].tolist() == [list(range(0, 10)), list(range(10, 20))]
    assert b["labels"].tolist() == [list(range(1, 11)), list(range(11, 21))]


def h(tok, role: str) -> list[int]:
    sp = tok.special_tokens
    return [sp["<|start_header_id|>"], *tok.encode(role), sp["<|end_header_id|>"], *tok.encode("\n\n")]


def test_sft_golden_three_turns_through_shards_and_loader(tok, tmp_path):
    dialog = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    eot, bos = tok.special_tokens["<|eot_id|>"], tok.bos_id
    pieces = [([bos], 0), (h(tok, "system"), 0), (tok.encode("Be brief."), 0), ([eot], 0),
              (h(tok, "user"), 0), (tok.encode("Hi there"), 0), ([eot], 0),
              (h(tok, "assistant"), 0), (tok.encode("Hello!"), 1), ([eot], 1),
              (h(tok, "user"), 0), (tok.encode("2+2?"), 0), ([eot], 0),
              (h(tok, "assistant"), 0), (tok.encode("4"), 1), ([eot], 1)]
    ids = [i for p, _ in pieces for i in p]
    mask = [m for p, m in pieces for _ in p]
    enc = lid.SFTEncoder(tok, "Be brief.", 0, 128)
    dpu.prepare("sft", [{"messages": dialog}], tmp_path / "d", enc, tokenizer_identity=tok.identity(), source="g",
                seed=0, val_fraction=0.0, shard_size=1024, progress=False)
    loader = dl.build_loader("sft", tmp_path / "d", "train", seq_len=64, micro_batch=1, global_batch=1, rank=0,
                             world_size=1, seed=0, pad_id=tok.pad_id, tokenizer_identity=tok.identity())
    b = loader.next_batch()
    n = len(ids) - 1
    assert b["input_ids"][0].tolist() == ids[:-1] + [tok.pad_id] * (64 - n)
    assert b["labels"][0].tolist() == [t if m else -100 for t, m in zip(ids[1:], mask[1:], strict=True)] + [-100] * (64 - n)
    # the same dialog in the other formats renders identically
    sharegpt = {"conversations": [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]}
                                  for m in dialog]}
    assert enc(sharegpt)[0]["tokens"].tolist() == ids
    alpaca = enc({"instruction": "Hi", "input": "there", "output": "Hello!"})[0]["tokens"].tolist()
    assert tok.decode(alpaca).count("Hi\n\nthere") == 1


def test_sft_overlong_loses_whole_trailing_turns_or_is_dropped(tok):
    dialog = [{"role": "user", "content": "question one " * 5}, {"role": "assistant", "content": "answer one " * 5},
              {"role": "user", "content": "question two " * 20}, {"role": "assistant", "content": "answer two " * 20}]
    full = lid.SFTEncoder(tok, "", 0, 10_000)({"messages": dialog})[0]["tokens"]
    first = lid.SFTEncoder(tok, "", 0, 10_000)({"messages": dialog[:2]})[0]["tokens"]
    arrays, event = lid.SFTEncoder(tok, "", 0, len(full) - 1)({"messages": dialog})
    assert event == "truncated" and arrays["tokens"].tolist() == first.tolist()
    assert lid.SFTEncoder(tok, "", 0, len(first) - 1)({"messages": dialog}) == (None, "dropped_too_long")
    assert lid.SFTEncoder(tok, "", 3, 10_000)({"messages": dialog})[0]["tokens"].tolist() == first.tolist()  # MAX_TURNS
    assert lid.SFTEncoder(tok, "", 0, 100)({"messages": [{"role": "user", "content": "x"}]}) == (None, "invalid")
    # 6 exchanges of different lengths: for every budget, the kept prefix is the longest whole-exchange
    # prefix that fits (checked against encoding each prefix directly)
    long = [m for k in range(6) for m in ({"role": "user", "content": f"q{k} " * (3 + 7 * k % 5)},
                                          {"role": "assistant", "content": f"a{k} " * (2 + 5 * k % 4)})]
    prefix = [len(lid.SFTEncoder(tok, "", 0, 10_000)({"messages": long[:2 * k]})[0]["tokens"]) for k in range(1, 7)]
    for budget in range(prefix[0] - 1, prefix[-1] + 1):
        got, event = lid.SFTEncoder(tok, "", 0, budget)({"messages": long})
        fits = [k for k, n in enumerate(prefix, 1) if n <= budget]
        if not fits:
            assert (got, event) == (None, "dropped_too_long")
        else:
            assert len(got["tokens"]) == prefix[fits[-1] - 1]
            assert event == (None if fits[-1] == 6 else "truncated")


def test_instruct_cli_skips_and_counts_malformed_lines(tok, tmp_path, capsys):
    f = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    f.write_text(json.dumps(good) + "\n{not json\n" + json.dumps({"instruction": "c", "output": "d"}) + "\n")
    lid.main(["--dataset", str(f), "--out", str(tmp_path / "o"), "--no-progress", "VAL_FRACTION=0",
              f"TOKENIZER_CHECKPOINT_PATH={ROOT / 'tokenizer.model'}", "SYSTEM_PROMPT="])
    assert f"{f}:2" in capsys.readouterr().err
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["splits"]["train"]["documents"] == 2 and m["splits"]["train"]["stats"] == {"malformed": 1}
    offsets = np.load(tmp_path / "o" / m["splits"]["train"]["shards"][0]["files"]["offsets"]["path"])
    assert offsets[0] == 0 and len(offsets) == 3


def test_dpo_rendering_and_hh_rlhf(tok):
    enc = ldpo.DPOEncoder(tok, "", 512)
    a, _ = enc({"prompt": "Why?", "chosen": "Because.", "rejected": "No."})
    eot, bos = tok.special_tokens["<|eot_id|>"], tok.bos_id
    assert a["prompt"].tolist() == [bos, *h(tok, "user"), *tok.encode("Why?"), eot, *h(tok, "assistant")]
    assert a["chosen"].tolist() == tok.encode("Because.") + [eot]
    assert a["rejected"].tolist() == tok.encode("No.") + [eot]
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: Why?\n\nAssistant: Because.",
          "rejected": "\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: Why?\n\nAssistant: No."}
    b, _ = enc(hh)
    assert b["prompt"].tolist() == [bos, *h(tok, "user"), *tok.encode("Hi"), eot, *h(tok, "assistant"),
                                    *tok.encode("Hey"), eot, *h(tok, "user"), *tok.encode("Why?"), eot,
                                    *h(tok, "assistant")]
    assert b["chosen"].tolist() == a["chosen"].tolist() and b["rejected"].tolist() == a["rejected"].tolist()
    msgs = {"chosen": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}],
            "rejected": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "No."}]}
    assert {k: v.tolist() for k, v in enc(msgs)[0].items()} == {k: v.tolist() for k, v in a.items()}
    assert enc({"prompt": "Why?", "chosen": "Same", "rejected": "Same"}) == (None, "identical")
    assert ldpo.DPOEncoder(tok, "", 10)(hh) == (None, "dropped_too_long")


def test_mix_file_interleaves_reproducibly(tmp_path):
    for name, n in (("a", 300), ("b", 100)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"t": f"{name}{i}"}) + "\n" for i in range(n)))
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps({"datasets": [{"id": str(tmp_path / "a.jsonl"), "weight": 3, "text_field": "t"},
                                            {"id": str(tmp_path / "b.jsonl"), "weight": 1, "text_field": "t",
                                             "max_datapoints": 50}], "seed": 5}))
    first = list(data_sources.mix_records(str(mix), "text")[0])
    assert first == list(data_sources.mix_records(str(mix), "text")[0])
    assert sorted(first) == sorted([f"a{i}" for i in range(300)] + [f"b{i}" for i in range(50)])
    assert [x for x in first if x[0] == "a"] == [f"a{i}" for i in range(300)]  # each source keeps its order
    head = first[:100]
    assert 60 < sum(x[0] == "a" for x in head) < 90  # ~3:1 while both last
    with pytest.raises(UserError, match="local path"):
        list(data_sources.open_dataset("no-such-org/no-such-dataset")[0])


@pytest.mark.parametrize("script", ["load_pretrain_dataset.py", "load_instruct_dataset.py", "load_dpo_dataset.py"])
def test_unreachable_hub_id_fails_in_one_line_and_leaves_no_directory(script, tmp_path):
    """Offline, a hub id fails on its first record, after prepare made the output dirs: none may stay."""
    (tmp_path / "mine").mkdir()  # a directory the user made is never removed, only what the run created
    for out in (tmp_path / "new" / "deeper" / "out", tmp_path / "mine"):
        r = subprocess.run([sys.executable, str(ROOT / script), "--dataset", "someorg/nosuchset", "--out", str(out),
                            "--no-progress", f"TOKENIZER_CHECKPOINT_PATH={ROOT / 'tokenizer.model'}"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=180,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)})
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and lines[-1].startswith("error: ") and "someorg/nosuchset" in lines[-1], r.stderr
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


@pytest.mark.parametrize("script,content", [
    ("load_instruct_dataset.py", "notes.txt"), ("load_dpo_dataset.py", "notes.txt"),
    ("load_instruct_dataset.py", "chat.jsonl"), ("load_pretrain_dataset.py", "empty.jsonl")])
def test_preparation_that_yields_no_record_exits_2_naming_the_counts_and_writes_nothing(script, content, tmp_path):
    """A plain text file given to the chat / preference CLIs, jsonl lines without the expected fields, or a
    jsonl without text: no record comes out, so the run fails in one line with the counts and leaves no
    manifest, no shard and no directory it made (a directory the user made stays, empty)."""
    src = tmp_path / content
    if content == "notes.txt":
        src.write_text("".join(f"note {i}: buy milk\n" for i in range(24)))
    elif content == "chat.jsonl":
        src.write_text("".join(json.dumps({"note": i}) + "\n" for i in range(5)) + "{not json\n")
    else:
        src.write_text("".join(json.dumps({"body": f"doc {i}"}) + "\n" for i in range(5)))
    (tmp_path / "mine").mkdir()
    for out in (tmp_path / "new" / "out", tmp_path / "mine"):
        r = subprocess.run([sys.executable, str(ROOT / script), "--dataset", str(src), "--out", str(out),
                            "--no-progress", f"TOKENIZER_CHECKPOINT_PATH={ROOT / 'tokenizer.model'}"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=180,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and lines[-1].startswith("error: "), r.stderr[-2000:]
        assert "0 records" in lines[-1] and str(src) in lines[-1], lines[-1]
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


def test_a_missing_local_dataset_path_is_refused_before_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for spec in ("data/train.jsonl", "data/nothing", "./x", "a/b/c"):
        with pytest.raises(UserError, match=rf"--dataset '{spec}' not found"):
            data_sources.open_dataset(spec)
    records, desc = data_sources.open_dataset("someorg/someset")  # a hub id: streamed lazily, not opened here
    assert desc.startswith("hf someorg/someset")
