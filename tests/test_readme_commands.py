"""The shell commands of README's "Use your model elsewhere" subsections on lm-evaluation-harness and W&B,
run as written from a directory holding the checkpoints they name. Offline additions only: the hub
evaluation gets `--data TASK=FILE` per task (local files with the hub dataset's columns) and the upload
`--dry-run`. The transformers and PEFT subsections are run by test_hf_export.py and test_peft_export.py."""

from __future__ import annotations

import glob
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, TOKENIZER, make_parent, subprocess_env

# local stand-ins with the hub datasets' columns (Rowan/hellaswag, allenai/winogrande, allenai/ai2_arc)
WINOGRANDE = [{"sentence": "The cup did not fit in the box because _ was too big.", "option1": "the cup",
               "option2": "the box", "answer": "1"},
              {"sentence": "Anna thanked Maria because _ had helped her.", "option1": "Anna", "option2": "Maria",
               "answer": "2"},
              {"sentence": "The list was sorted quickly because _ was short.", "option1": "the list",
               "option2": "the sort", "answer": "1"}]
ARC = [{"id": f"q{i}", "question": q, "choices": {"text": c, "label": ["A", "B", "C"]}, "answerKey": k}
       for i, (q, c, k) in enumerate([("What does len return?", ["a count", "a colour", "a sound"], "A"),
                                      ("Which keyword defines a function?", ["class", "def", "with"], "B"),
                                      ("What is 2 + 2?", ["3", "5", "4"], "C")])]


def section_commands(heading: str) -> list[str]:
    """Non-comment lines of the bash blocks under README's `### heading`."""
    text = (ROOT / "README.md").read_text()
    body = text.split("## Use your model elsewhere\n", 1)[1].split("\n## ", 1)[0]
    body = body.split(f"\n### {heading}\n", 1)[1].split("\n### ", 1)[0]
    lines = [ln.split("  #")[0].strip() for b in re.findall(r"```bash\n(.*?)```", body, re.S) for ln in b.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def argv_of(command: str, cwd: Path) -> tuple[dict[str, str], list[str]]:
    """(environment additions, argv) of a README command: leading VAR=value words go to the environment,
    `python X.py` runs this repo's X.py with this interpreter, `wandb` the venv's CLI; globs are expanded as the
    shell would."""
    words, env = shlex.split(command), {}
    while re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    if words[0] == "python":
        words = [sys.executable, str(ROOT / words[1]), *words[2:]]
    elif words[0] == "wandb":
        words = [str(Path(sys.executable).with_name("wandb")), *words[1:]]
    expanded = []
    for w in words:
        hits = sorted(glob.glob(w, root_dir=cwd)) if any(c in w for c in "*?[") else []
        expanded += hits or [w]
    return env, expanded


def run(command: str, cwd: Path, extra: list[str] = ()) -> subprocess.CompletedProcess:
    env, argv = argv_of(command, cwd)
    if argv[1:2] == ["sync"]:
        argv.insert(2, "--dry-run")
    r = subprocess.run([*argv, *extra], cwd=cwd, env={**subprocess_env(), **env}, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, f"{command}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_readme_lm_eval_commands(tmp_path):
    commands = section_commands("lm-evaluation-harness")
    assert len(commands) == 2 and all(c.startswith("python evaluate.py --model checkpoints/dpo/latest") for c in commands)
    make_parent(tmp_path / "checkpoints" / "dpo")  # a checkpoint dir with a `latest` pointer, as a run leaves it
    shutil.copy(TOKENIZER, tmp_path)  # the checkpoint names ./tokenizer.model
    data = tmp_path / "data"
    r = subprocess.run([sys.executable, str(ROOT / "load_hellaswag_dataset.py"), "--demo", "--demo-n", "6", "--out",
                        str(data / "hellaswag" / "hellaswag_val.jsonl")], cwd=tmp_path, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for name, docs in (("winogrande", WINOGRANDE), ("arc_easy", ARC)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    files = {"hellaswag": data / "hellaswag" / "hellaswag_val.jsonl", "winogrande": data / "winogrande.jsonl",
             "arc_easy": data / "arc_easy.jsonl"}
    sizes = {"hellaswag": 6, "winogrande": 3, "arc_easy": 3}
    results = tmp_path / "runs" / "eval" / "dpo-step_0000000" / "results.json"  # default --out: stage and step

    hub = commands[0]
    tasks = shlex.split(hub)[shlex.split(hub).index("--tasks") + 1].split(",")
    run(hub, tmp_path, [a for t in tasks for a in ("--data", f"{t}={files[t]}")])
    res = json.loads(results.read_text())["results"]
    assert sorted(res) == sorted(tasks) == sorted(files)
    assert all(res[t]["sample_len"] == sizes[t] for t in tasks)
    # the model lm-eval scored is the checkpoint: our own evaluator on it gives the same HellaSwag scores
    import hellaswag_utils as hs
    import model_utils
    import tokenizer as tk

    model, _ = model_utils.load_model(tmp_path / "checkpoints" / "dpo" / "latest")
    ours = hs.evaluate(model, tk.load_tokenizer(TOKENIZER), hs.load_examples(files["hellaswag"]), progress=False)
    assert (res["hellaswag"]["acc,none"], res["hellaswag"]["acc_norm,none"]) == \
        pytest.approx((ours["acc"], ours["acc_norm"]), abs=1e-9)
    results.unlink()

    run(commands[1], tmp_path)  # already offline
    res = json.loads(results.read_text())["results"]
    assert list(res) == ["hellaswag"] and res["hellaswag"]["sample_len"] == 6


@pytest.mark.slow
def test_readme_wandb_commands(tmp_path, pretrain_data):
    commands = section_commands("Weights & Biases")
    assert len(commands) == 2 and "python train.py --env-file my.env" in commands[0]
    assert commands[1].startswith("wandb sync ")
    (tmp_path / "my.env").write_text((ROOT / "configs" / "debug.env").read_text() + "\n".join([
        "", f"TOKENIZER_CHECKPOINT_PATH={TOKENIZER}", f"PRETRAIN_DATALOADER_ROOT_PATH={pretrain_data}",
        "MAX_STEPS=3", "VALIDATE_EVERY_X_STEPS=0", "SAVE_CHECKPOINTS=false", "GENERATE_EVERY_X_STEPS=0",
        f"TEST_PROMPTS_FILE={ROOT / 'test_prompts.json'}", ""]))
    run(commands[0], tmp_path)
    run_id = (tmp_path / "runs" / "my-run" / "wandb_run_id").read_text().strip()
    offline = list((tmp_path / "runs" / "my-run" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and offline[0].name.endswith(run_id)
    r = run(commands[1], tmp_path)
    assert run_id in r.stdout + r.stderr  # the run the upload would send
