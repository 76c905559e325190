"""The peer side of bench/jobs.py: the same job run with the tool a user would pick instead of this repo.

    <peer venv python> -m bench.jobs_peer sft|dpo|pretrain --work DIR --spec JSON

Runs in the bench-only venv that adds TRL (bench/jobs.py makes it). Every job reads the tokens bench/jobs.py
wrote from this repo's own shards, so both sides train on the same token ids:
- sft: TRL SFTTrainer on (input_ids, labels) rows; labels are -100 outside assistant content + end of turn,
  which is the scope our SFT trains; `packing` switches on TRL's packing (its default strategy).
- dpo: TRL DPOTrainer with a peft LoraConfig on (prompt_ids, chosen_ids, rejected_ids) rows, the token ids
  of our DPO shards (the trainer's text tokenization is skipped, its collator and loss are used as is).
- pretrain: transformers Trainer with LlamaForCausalLM on windows of T+1 tokens of our pretrain shards.
Everything else is the library's default unless the spec sets it for both sides (batch, accumulation, steps,
learning rate and its schedule, weight decay, clipping, precision, seed). Prints one RESULT line (jobs_common).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from bench.jobs_common import heldout_loss, loss_tokens, print_result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


class CountingCollator:
    """Wraps the trainer's collator; counts the loss-carrying tokens of every batch it builds."""

    def __init__(self, inner, label_key: str = "labels", mask_key: str | None = None):
        self.inner, self.label_key, self.mask_key = inner, label_key, mask_key
        self.batches: list[tuple[int, int]] = []  # (useful tokens, rows) per batch built

    def consumed(self, spec: dict) -> tuple[int, int]:
        """(useful tokens, rows) of the batches the run trained on: the data loader may build one batch ahead
        of the last step, which no step uses."""
        used = self.batches[: spec["steps"] * spec["accum"]]
        return sum(t for t, _ in used), sum(r for _, r in used)

    def __call__(self, examples):
        batch = self.inner(examples)
        if self.mask_key:  # DPO: completion_mask (B, T) marks the response tokens, aligned with the inputs
            labels = torch.where(batch[self.mask_key] > 0, batch["input_ids"], -100)
        else:
            labels = batch[self.label_key]
        self.batches.append((loss_tokens(labels, shifted=False), len(examples)))
        return batch


def common_args(spec: dict, out: Path) -> dict:
    return dict(output_dir=str(out), per_device_train_batch_size=spec["batch"],
                gradient_accumulation_steps=spec["accum"], max_steps=spec["steps"], learning_rate=spec["lr"],
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                bf16=spec["precision"] == "bf16", logging_steps=1, save_strategy="no", report_to="none",
                seed=spec["seed"], use_cpu=True, dataloader_num_workers=0, disable_tqdm=False)


def autocast_for(spec: dict):
    if spec["precision"] == "bf16":
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


def run_sft(work: Path, spec: dict) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    train = Dataset.from_list(read_jsonl(work / "sft_train.jsonl"))
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    cfg = SFTConfig(**common_args(spec, work / f"peer_{spec['name']}"), max_length=spec["seq_len"],
                    packing=spec.get("packing", False), eval_strategy="no")
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=train, processing_class=tok)
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    model.eval()
    held = [(r["input_ids"], r["labels"]) for r in read_jsonl(work / spec["heldout_file"])]
    loss = heldout_loss(lambda x: model(input_ids=x).logits, held, autocast_for(spec))
    tokens, rows = counter.consumed(spec)
    return {"train_seconds": seconds, "useful_tokens": tokens, "rows": rows, "heldout_loss": loss,
            "heldout_examples": len(held), "gradient_checkpointing": bool(cfg.gradient_checkpointing)}


def run_dpo(work: Path, spec: dict) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer on rows that already hold prompt_ids / chosen_ids / rejected_ids (our shards' ids)."""

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    rows = read_jsonl(work / "dpo_train.jsonl")
    train = Dataset.from_list(rows)
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    lora = LoraConfig(task_type="CAUSAL_LM", r=spec["lora_rank"], lora_alpha=spec["lora_alpha"],
                      lora_dropout=0.0, target_modules=spec["lora_targets_hf"])
    cfg = DPOConfig(**common_args(spec, work / "peer_dpo"), beta=spec["beta"], max_length=None, eval_strategy="no")
    trainer = PretokenizedDPOTrainer(model=model, args=cfg, train_dataset=train, processing_class=tok,
                                     peft_config=lora)
    counter = CountingCollator(trainer.data_collator, mask_key="completion_mask")
    trainer.data_collator = counter
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    acc = [h["rewards/accuracies"] for h in trainer.state.log_history if "rewards/accuracies" in h]
    tokens, pairs = counter.consumed(spec)
    return {"train_seconds": seconds, "useful_tokens": tokens, "pairs": pairs,
            "reward_accuracy": sum(acc) / max(len(acc), 1), "gradient_checkpointing": bool(cfg.gradient_checkpointing)}


def run_pretrain(work: Path, spec: dict) -> dict:
    from datasets import Dataset
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    windows = read_jsonl(work / "pretrain_windows.jsonl")
    train = Dataset.from_list([{"input_ids": w["input_ids"], "labels": w["input_ids"]} for w in windows])
    model = LlamaForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    cfg = TrainingArguments(**common_args(spec, work / "peer_pretrain"), eval_strategy="no")
    trainer = Trainer(model=model, args=cfg, train_dataset=train)
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens, rows = counter.consumed(spec)
    return {"train_seconds": seconds, "useful_tokens": tokens, "rows": rows,
            "final_loss": losses[-1] if losses else None}


JOBS = {"sft": run_sft, "dpo": run_dpo, "pretrain": run_pretrain}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("job", choices=sorted(JOBS))
    p.add_argument("--work", required=True, help="bench/jobs.py's work dir (the prepared data and model)")
    p.add_argument("--spec", required=True, help="JSON: the job's shared settings")
    a = p.parse_args()
    spec = json.loads(a.spec)
    torch.manual_seed(spec["seed"])
    res = JOBS[a.job](Path(a.work), spec)
    import trl

    print_result({**res, "peer": f"trl {trl.__version__}"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
