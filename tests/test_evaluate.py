"""evaluate.py: any checkpoint through lm-evaluation-harness, offline on a local task file. lm-eval's
accuracy must equal the one computed here directly from our model's log-probabilities with lm-eval's
context/continuation split (evaluation.encode_pair), and the results JSON lands in the output dir."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, make_parent, subprocess_env

import evaluation
import hellaswag_utils as hs
import model_utils
import tokenizer as tk
from errors import UserError, run_cli

DOCS = [
    {"query": "The function returns", "choices": ["a list of strings.", "purple elephants dancing.", "None."],
     "label": 0},
    {"query": "To open a file in Python, call", "choices": ["open().", "the ocean.", "print() twice."], "label": 0},
    {"query": "A dictionary maps", "choices": ["keys to values.", "rivers to mountains.", "nothing."], "label": 0},
    {"query": "The loop ends when", "choices": ["the condition is false.", "it rains.", "we sleep."], "label": 0},
    {"query": "An exception is raised", "choices": ["when an error occurs.", "by birds.", "at noon."], "label": 0},
]

TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "choices"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    (d / "docs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in DOCS))
    (d / "tiny_choice.yaml").write_text(TASK.format(path=d / "docs.jsonl"))
    return d


def _our_accuracy(source: str) -> float:
    model, _ = model_utils.load_model(source)
    tok = tk.load_tokenizer(model_utils.tokenizer_source(source))
    right = 0
    with torch.no_grad():
        for doc in DOCS:
            lls = []
            for choice in doc["choices"]:
                ctx, cont = evaluation.encode_pair(tok, doc["query"], " " + choice, add_bos=False)
                ids = torch.tensor([ctx + cont])
                logp = torch.log_softmax(model(ids[:, :-1])[0].double(), -1)
                lls.append(logp[len(ctx) - 1:].gather(-1, ids[0, len(ctx):, None]).sum().item())
            right += max(range(len(lls)), key=lambda i: (lls[i], -i)) == doc["label"]
    return right / len(DOCS)


@pytest.mark.slow
def test_evaluate_cli_runs_lm_eval_offline_and_matches_our_scoring(tmp_path, task_dir):
    source = str(make_parent(tmp_path / "ck"))
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model", source, "--tasks", "tiny_choice",
                        "--include-path", str(task_dir), "--out", str(out), "--batch-size", "2"],
                       cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    acc = res["results"]["tiny_choice"]["acc,none"]
    assert acc == pytest.approx(_our_accuracy(source), abs=1e-9)
    assert "tiny_choice: acc" in r.stdout and res["model_source"] == source


def test_evaluate_cli_errors_are_one_line(tmp_path, task_dir):
    source = str(make_parent(tmp_path / "ck"))
    for args, needle in [(["--tasks", "no_such_task_xyz", "--include-path", str(task_dir)], "unknown lm-eval task"),
                         (["--tasks", "tiny_choice", "--include-path", str(tmp_path / "nope")], "is not a directory"),
                         (["--tasks", "tiny_choice", "--limit", "0"], "--limit 0")]:
        r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model", source, *args,
                            "--out", str(tmp_path / "eval")], cwd=tmp_path, env=subprocess_env(),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
        assert not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_data_flag_runs_lm_evals_own_hellaswag_on_a_local_file_and_equals_our_evaluator(tmp_path):
    """--data hellaswag=FILE: lm-eval's built-in hellaswag task (its process_docs, prompts and acc / acc_norm)
    on a local file in the official format gives exactly the scores of our in-loop evaluator (hellaswag_utils),
    which implements the same definitions independently. A real model (SmolLM2-135M-Instruct) so that the
    scores depend on how the context is rendered, not only on the endings."""
    source = str(model_utils.smollm2_gguf())
    data = tmp_path / "hellaswag.jsonl"
    r = subprocess.run([sys.executable, str(ROOT / "load_hellaswag_dataset.py"), "--demo", "--demo-n", "12",
                        "--out", str(data)], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model", source, "--tasks", "hellaswag",
                        "--data", f"hellaswag={data}", "--out", str(out)], cwd=tmp_path, env=subprocess_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    theirs = json.loads((out / "results.json").read_text())["results"]["hellaswag"]
    model, _ = model_utils.load_model(source)
    ours = hs.evaluate(model, tk.load_tokenizer(source), hs.load_examples(data), progress=False)
    print(f"lm-eval hellaswag {theirs}; ours {ours}")
    assert ours["n"] == theirs["sample_len"] == 12
    assert theirs["acc,none"] == pytest.approx(ours["acc"], abs=1e-9)
    assert theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"], abs=1e-9)


def test_data_flag_errors_are_one_line(tmp_path, task_dir, monkeypatch, capsys):
    """Checked before lm-eval is imported or the model exported: one line, exit 2, no output dir."""
    import evaluate

    for args, needle in [(["--data", "hellaswag"], "expected TASK=FILE"),
                         (["--data", f"hellaswag={tmp_path / 'none.jsonl'}"], "no such file"),
                         (["--data", f"hellaswag={task_dir / 'tiny_choice.yaml'}"], "expected a .jsonl"),
                         (["--data", f"winogrande={task_dir / 'docs.jsonl'}"], "--tasks does not list")]:
        monkeypatch.setattr(sys, "argv", ["evaluate.py", "--model", str(tmp_path / "unused"), "--tasks", "hellaswag",
                                          *args, "--out", str(tmp_path / "eval")])
        with pytest.raises(SystemExit) as e:
            run_cli(evaluate.main)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and needle in err[0], err
        assert not (tmp_path / "eval").exists()


@pytest.fixture(scope="module")
def lm_eval_tasks():
    from lm_eval.tasks import TaskManager

    return TaskManager()


@pytest.mark.parametrize("name", ["mmlu", "ai2_arc"])
def test_data_flag_refuses_a_group_or_tag(tmp_path, name, lm_eval_tasks):
    """--data replaces one task's documents: a group (mmlu) or a tag (ai2_arc) spans several data sets."""
    import evaluate

    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps(DOCS[0]) + "\n")
    with pytest.raises(UserError, match=f"{name} is not a single lm-eval task"):
        evaluate.local_task(lm_eval_tasks, name, str(data))


def test_data_flag_refuses_a_few_shot_task(tmp_path, lm_eval_tasks):
    """gsm8k is 5-shot in its YAML: with one local file its examples would come from the documents scored."""
    import evaluate

    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps(DOCS[0]) + "\n")
    with pytest.raises(UserError, match="gsm8k is a 5-shot task"):
        evaluate.local_task(lm_eval_tasks, "gsm8k", str(data))


# ---- where results go by default --------------------------------------------------------------------------


@pytest.fixture
def fake_lm_eval(monkeypatch):
    """lm-eval replaced by a stand-in that scores every model 0.5 on task `tiny`: evaluate.py's own steps (model
    export, results file) run for real, fast."""
    from types import SimpleNamespace

    import evaluate as ev

    class Manager:
        all_tasks = ["tiny"]

        def __init__(self, include_path=None):
            pass

    class LM:
        def __init__(self, **kw):
            pass

    def simple_evaluate(model, tasks, **kw):
        return {"results": {"tiny": {"acc,none": 0.5}}}

    monkeypatch.setattr(ev, "_lm_eval", lambda: (SimpleNamespace(simple_evaluate=simple_evaluate), LM, Manager))
    return ev


def test_default_out_never_overwrites_another_models_results(tmp_path, monkeypatch, fake_lm_eval):
    """checkpoints/pretrain/latest then checkpoints/dpo/latest: two results files, each naming its model; a
    second run elsewhere whose checkpoint has the same stage and step is refused (exit 2), the first kept."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "tokenizer.model", tmp_path / "tokenizer.model")  # the checkpoints name ./tokenizer.model
    for stage in ("pretrain", "dpo"):
        make_parent(tmp_path / "checkpoints" / stage)
    for stage in ("pretrain", "dpo"):
        assert fake_lm_eval.main(["--model", f"checkpoints/{stage}/latest", "--tasks", "tiny"]) == 0
    results = sorted((tmp_path / "runs" / "eval").glob("*/results.json"))
    assert len(results) == 2, results
    named = {json.loads(p.read_text())["model_source"]: p for p in results}
    assert set(named) == {"checkpoints/pretrain/latest", "checkpoints/dpo/latest"}
    other = tmp_path / "other-run"
    make_parent(other / "checkpoints" / "pretrain")
    before = {p: p.read_bytes() for p in results}
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--model", str(other / "checkpoints" / "pretrain" / "latest"),
                                      "--tasks", "tiny"])
    with pytest.raises(SystemExit) as e:
        run_cli(fake_lm_eval.main)
    assert e.value.code == 2
    assert {p: p.read_bytes() for p in results} == before
