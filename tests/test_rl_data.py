"""load_rl_dataset.py: prompts for RL from jsonl / parquet / saved HF datasets, the GSM8K mapping, the offline
demo arithmetic set (deterministic, held-out questions), the output directory and its errors (one line, exit 2,
nothing left on disk)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import demo_data
import load_rl_dataset as lrl
from errors import UserError
from rewards import exact_answer

ROOT = Path(__file__).resolve().parent.parent

RECORDS = [
    {"prompt": "What is 2 + 2?", "answer": "4", "level": 1},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}],
     "answer": None, "level": 2},
    {"messages": [{"from": "Human", "value": "Say hi."}], "level": 3},  # the SFT name, ShareGPT's keys
    {"prompt": "", "answer": "1"},  # empty prompt: invalid
    {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},  # ends with a reply
    {"prompt": [{"role": "wizard", "content": "q"}]},  # unknown role
    {"text": "no prompt column"},
]
GOOD = 3


def run(tmp_path: Path, *args: str, out: str = "out") -> Path:
    target = tmp_path / out
    lrl.main([*args, "--out", str(target), "VAL_FRACTION=0"])
    return target


def read(root: Path, split: str = "train") -> list[dict]:
    return lrl.read_split(root, split)


def write_jsonl(path: Path, records: list, extra_lines: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + extra_lines)
    return path


# ---- formats -------------------------------------------------------------------------------------------------


def test_jsonl_records_prompts_fields_and_counts(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", RECORDS, "{not json\n[1, 2]\n")
    out = run(tmp_path, "--dataset", str(src))
    recs = read(out)
    assert [r["prompt_id"] for r in recs] == [0, 1, 2]
    assert recs[0] == {"prompt_id": 0, "prompt": "What is 2 + 2?", "answer": "4", "level": 1}
    assert recs[1]["prompt"][0] == {"role": "system", "content": "Be brief."} and recs[1]["answer"] is None
    assert recs[2] == {"prompt_id": 2, "prompt": [{"role": "user", "content": "Say hi."}], "level": 3}
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "rl" and m["format_version"] == 1
    assert m["counts"] == {"read": len(RECORDS) + 2, "invalid": len(RECORDS) - GOOD, "malformed": 2}
    assert m["fields"] == ["answer", "level"]  # besides prompt_id and prompt
    assert m["splits"]["train"]["records"] == GOOD and m["splits"]["train"]["chat_prompts"] == 2
    assert m["splits"]["val"]["records"] == 0 and (out / "val.jsonl").read_text() == ""
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train.jsonl", "val.jsonl"]


def test_parquet_and_a_directory_of_them_give_the_same_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = [{"prompt": f"q{i}", "answer": str(i), "level": i % 3} for i in range(20)]
    want = read(run(tmp_path, "--dataset", str(write_jsonl(tmp_path / "p.jsonl", flat)), out="a"))
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.Table.from_pylist(flat[:12]), tmp_path / "pq" / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(flat[12:]), tmp_path / "pq" / "part-1.parquet")
    assert read(run(tmp_path, "--dataset", str(tmp_path / "pq"), out="b")) == want
    assert len(want) == 20 and want[5] == {"prompt_id": 5, "prompt": "q5", "answer": "5", "level": 2}


def test_saved_hf_dataset_dirs_and_split_choice(tmp_path):
    import datasets

    chat = [{"prompt": [{"role": "user", "content": f"q{i}"}], "answer": str(i)} for i in range(5)]
    datasets.Dataset.from_list(chat).save_to_disk(str(tmp_path / "ds"))
    recs = read(run(tmp_path, "--dataset", str(tmp_path / "ds"), out="a"))
    assert recs[3] == {"prompt_id": 3, "prompt": [{"role": "user", "content": "q3"}], "answer": "3"}
    datasets.DatasetDict({"train": datasets.Dataset.from_list(chat[:2]),
                          "test": datasets.Dataset.from_list(chat[2:])}).save_to_disk(str(tmp_path / "dd"))
    recs = read(run(tmp_path, "--dataset", str(tmp_path / "dd"), "--split", "test", out="b"))
    assert [r["answer"] for r in recs] == ["2", "3", "4"]
    with pytest.raises(UserError, match=r"has no split 'validation' \(it has train, test\)"):
        run(tmp_path, "--dataset", str(tmp_path / "dd"), "--split", "validation", out="c")
    assert not (tmp_path / "c").exists()


def test_gsm8k_columns_map_to_prompt_and_final_answer(tmp_path):
    gsm = [{"question": "Natalia sold clips to 48 friends in April, and half as many in May. How many in all?",
            "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nIn all 48+24 = <<48+24=72>>72.\n#### 72"},
           {"question": "How many cents?", "answer": "It is 1234 cents.\n#### 1,234"}]
    recs = read(run(tmp_path, "--dataset", str(write_jsonl(tmp_path / "gsm.jsonl", gsm))))
    assert recs[0] == {"prompt_id": 0, "prompt": gsm[0]["question"], "answer": "72",
                       "solution": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nIn all 48+24 = <<48+24=72>>72."}
    assert recs[1]["answer"] == "1234"
    # the extracted answers are what the exact_answer reward compares with
    assert exact_answer([r["prompt"] for r in recs], ["so 72 clips", "\\boxed{1,234}"],
                        answer=[r["answer"] for r in recs]) == [1.0, 1.0]


def test_mix_file_interleaves_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "answer": "1"} for i in range(30)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"question": f"b{i}", "answer": "x\n#### 2"} for i in range(10)])
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps({"datasets": [{"id": str(a), "weight": 3}, {"id": str(b)}], "seed": 1}))
    recs = read(run(tmp_path, "--mix", str(mix)))
    assert sorted(r["prompt"] for r in recs) == sorted([f"a{i}" for i in range(30)] + [f"b{i}" for i in range(10)])
    assert {r["answer"] for r in recs if r["prompt"][0] == "b"} == {"2"}
    assert [r["prompt"] for r in recs][:40] != [f"a{i}" for i in range(30)] + [f"b{i}" for i in range(10)]


def test_prompt_field_flag(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"problem": "Solve x + 1 = 3.", "solution": "x = 2"}])
    assert read(run(tmp_path, "--dataset", str(src), "--prompt-field", "problem")) == [
        {"prompt_id": 0, "prompt": "Solve x + 1 = 3.", "solution": "x = 2"}]


def test_val_split_by_prompt_hash(tmp_path):
    recs = [{"prompt": f"question {i}", "answer": str(i)} for i in range(200)]
    recs += [{"prompt": "question 7", "answer": "dup"}]  # one prompt never lands in both splits
    src = write_jsonl(tmp_path / "p.jsonl", recs)
    out = tmp_path / "v"
    lrl.main(["--dataset", str(src), "--out", str(out), "--val-fraction", "0.25", "SEED=3"])
    train, val = read(out, "train"), read(out, "val")
    assert len(train) + len(val) == 201 and 25 < len(val) < 75
    assert sum(r["prompt"] == "question 7" for r in train) in (0, 2)
    assert [r["prompt_id"] for r in val] == list(range(len(val)))
    lrl.main(["--dataset", str(src), "--out", str(tmp_path / "w"), "--val-fraction", "0.25", "SEED=3"])
    assert (tmp_path / "w" / "val.jsonl").read_bytes() == (out / "val.jsonl").read_bytes()
    lrl.main(["--dataset", str(src), "--out", str(tmp_path / "all"), "--val-fraction", "1"])
    assert len(read(tmp_path / "all", "val")) == 201 and read(tmp_path / "all", "train") == []


# ---- the demo set ----------------------------------------------------------------------------------------------


def _value(prompt: str) -> int:
    a, op, b = prompt.removeprefix("What is ").removesuffix("?").split()
    return {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def test_demo_arithmetic_set_is_exact_seeded_and_held_out():
    d = demo_data.demo_arithmetic_set()
    assert (len(d["train"]), len(d["test"])) == (2000, 200)
    assert d == demo_data.demo_arithmetic_set()
    assert demo_data.demo_arithmetic_set(seed=1) != d
    assert all(str(_value(r["prompt"])) == r["answer"] for r in d["train"] + d["test"])
    train_q = {r["prompt"] for r in d["train"]}
    assert len(train_q) == 2000 and not train_q & {r["prompt"] for r in d["test"]}
    assert {r["prompt"].split()[3] for r in d["train"]} == {"+", "-", "*"}


def test_demo_cli_writes_the_same_bytes_every_time(tmp_path, capsys):
    a, b = run(tmp_path, out="a"), run(tmp_path, out="b")
    assert "offline demo arithmetic set" in capsys.readouterr().err
    for f in ("train.jsonl", "val.jsonl", "manifest.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    d = demo_data.demo_arithmetic_set()
    assert [{k: r[k] for k in ("prompt", "answer")} for r in read(a, "val")] == d["test"]
    assert len(read(a, "train")) == 2000


# ---- errors ------------------------------------------------------------------------------------------------------


def test_errors_leave_nothing_on_disk(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", RECORDS[3:])
    cases = [
        (["--dataset", str(bad)], "none of 4 records has a usable prompt"),
        (["--dataset", str(tmp_path / "missing.jsonl")], "not found"),
        (["--dataset", str(write_jsonl(tmp_path / "id.jsonl", [{"prompt": "q", "prompt_id": 9}]))],
         "has a field 'prompt_id'"),
        (["--dataset", str(bad), "--val-fraction", "1.5"], "between 0 and 1"),
    ]
    for args, match in cases:
        with pytest.raises(UserError, match=match):
            lrl.main([*args, "--out", str(tmp_path / "deep" / "out")])
        assert not (tmp_path / "deep").exists(), args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "id.jsonl"]


def test_existing_output_needs_overwrite_and_overwrite_only_replaces_rl_dirs(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", RECORDS[:1])
    out = run(tmp_path, "--dataset", str(src))
    with pytest.raises(UserError, match="already exists and is not empty"):
        run(tmp_path, "--dataset", str(src))
    lrl.main(["--out", str(out), "--overwrite"])  # the demo set replaces it
    assert len(read(out)) == 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "p.jsonl"]  # no temp or old dir left
    other = tmp_path / "shards"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"kind": "sft"}))
    with pytest.raises(UserError, match="not an RL prompt dir"):
        lrl.main(["--out", str(other), "--overwrite"])
    assert sorted(p.name for p in other.iterdir()) == ["manifest.json"]


def test_read_split_checks_the_hash(tmp_path):
    out = run(tmp_path, "--dataset", str(write_jsonl(tmp_path / "p.jsonl", RECORDS[:1])))
    with (out / "train.jsonl").open("a") as f:
        f.write('{"prompt_id": 1, "prompt": "added"}\n')
    with pytest.raises(UserError, match="does not match the sha256"):
        lrl.read_split(out)
    with pytest.raises(UserError, match="prepare the prompts with load_rl_dataset.py"):
        lrl.read_split(tmp_path / "nowhere")


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(ROOT)}
    for args in (["--dataset", "someorg/nosuchset"], ["--dataset", "nothere.jsonl"]):
        r = subprocess.run([sys.executable, str(ROOT / "load_rl_dataset.py"), *args, "--out", str(tmp_path / "o")],
                           cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and lines[-1].startswith("error: ") and args[1] in lines[-1], r.stderr
        assert not (tmp_path / "o").exists()
