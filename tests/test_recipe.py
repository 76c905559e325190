"""The one-GPU recipe (configs/llama3.2-1b-sft-lora.env -> configs/llama3.2-1b-dpo-lora.env -> evaluate.py)
run end to end on CPU, with SmolLM2-135M-Instruct (the GGUF on PyPI) standing in for Llama-3.2-1B-Instruct:
the recipe's own env files and commands, only the base model (BASE_MODEL, as the configs document it), the
device and the sizes overridden, the data sets the offline demo sets."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, read_metrics, subprocess_env

import checkpoint as ckpt
import hellaswag_utils as hs
import model_utils
import tokenizer as tk

SFT, DPO = "configs/llama3.2-1b-sft-lora.env", "configs/llama3.2-1b-dpo-lora.env"
# CPU-sized: 2 rows of 128 tokens per step, 2 steps, one validation and one save at the end
CPU = {"DEVICE": "cpu", "MAX_SEQ_LEN": "128", "MAX_BATCH_SIZE": "2", "TOTAL_BATCH_SIZE": "256", "MAX_STEPS": "2",
       "WARMUP_STEPS": "1", "VALIDATE_EVERY_X_STEPS": "2", "VAL_STEPS": "1", "SAVE_EVERY_X_STEPS": "2",
       "GENERATE_EVERY_X_STEPS": "0", "NUMBER_OF_CPU_PROCESSES": "1"}


def run(cwd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(args)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_recipe_lora_sft_then_dpo_then_lm_eval_on_cpu_with_smollm2(tmp_path, monkeypatch):
    gguf = str(model_utils.smollm2_gguf())
    env = {**subprocess_env(), "BASE_MODEL": gguf}
    kv = [f"{k}={v}" for k, v in CPU.items()]
    for config in (SFT, DPO):
        (tmp_path / "configs").mkdir(exist_ok=True)
        (tmp_path / config).write_text((ROOT / config).read_text())

    # 1. LoRA-SFT from the base model
    run(tmp_path, env, "load_instruct_dataset.py", "--env-file", SFT, "--no-progress", *kv)
    run(tmp_path, env, "train.py", "--env-file", SFT, *kv)
    sft_step = tmp_path / "checkpoints/llama3.2-1b/instruct" / ckpt.step_name(2)
    sft_conf = json.loads((sft_step / ckpt.CONFIG_FILE).read_text())
    assert sft_conf["base_model"]["source"] == gguf and sft_conf["lora"]["rank"] == 16
    assert (sft_step / ckpt.PEFT_ADAPTER_DIR / "adapter_model.safetensors").is_file()  # LORA_SAVE_PEFT_ADAPTER
    sft_metrics = read_metrics(tmp_path / "runs/llama3.2-1b-sft-lora")
    assert [m["step"] for m in sft_metrics if "loss" in m] == [1, 2]
    assert any("val_loss" in m for m in sft_metrics)

    # 2. DPO from the SFT checkpoint (INIT_FROM=checkpoints/llama3.2-1b/instruct/latest in the config)
    run(tmp_path, env, "load_dpo_dataset.py", "--env-file", DPO, "--no-progress", *kv)
    run(tmp_path, env, "train.py", "--env-file", DPO, *kv)
    dpo_step = tmp_path / "checkpoints/llama3.2-1b/dpo" / ckpt.step_name(2)
    state = json.loads((dpo_step / ckpt.STATE_FILE).read_text())
    assert (tmp_path / state["parent"]).resolve() == sft_step.resolve()  # recorded as given, relative to the run
    losses = [m["loss"] for m in read_metrics(tmp_path / "runs/llama3.2-1b-dpo-lora") if "loss" in m]
    # the first step's policy is the SFT model itself (new adapters start at B = 0) and so is the reference
    # (the SFT model with the adapters off): the loss is exactly ln 2
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-5)

    # 3. lm-eval on the DPO checkpoint: lm-eval's own hellaswag task on a local file, results in the run dir
    run(tmp_path, env, "load_hellaswag_dataset.py", "--demo", "--demo-n", "8")
    r = run(tmp_path, env, "evaluate.py", "--model", "checkpoints/llama3.2-1b/dpo/latest", "--tasks", "hellaswag",
            "--data", "hellaswag=data/hellaswag/hellaswag_demo.jsonl", "--out", "runs/llama3.2-1b-dpo-lora/lm-eval")
    res = json.loads((tmp_path / "runs/llama3.2-1b-dpo-lora/lm-eval/results.json").read_text())
    scores = res["results"]["hellaswag"]
    assert scores["sample_len"] == 8 and "hellaswag: acc" in r.stdout
    # the model lm-eval scored is the whole chain (base + SFT adapters + DPO adapters): our evaluator on the
    # same checkpoint agrees (loaded from the run's directory: the recipe's INIT_FROM is relative to it)
    monkeypatch.chdir(tmp_path)
    model, _ = model_utils.load_model(dpo_step)
    ours = hs.evaluate(model, tk.load_tokenizer(gguf), hs.load_examples(tmp_path / "data/hellaswag/hellaswag_demo.jsonl"),
                       progress=False)
    assert (scores["acc,none"], scores["acc_norm,none"]) == pytest.approx((ours["acc"], ours["acc_norm"]), abs=1e-9)
