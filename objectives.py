"""Training objectives: batch -> (summed loss, summed metrics). One table entry per stage.

The loop (train.py) never names an objective. For each optimizer step it
  1. draws the step's micro-batches from the loader named by `objective.batch_format`,
  2. sums `objective.units(batch)` over all micro-batches and ranks -> N (target tokens for
     cross-entropy, preference pairs for DPO),
  3. back-propagates `loss_sum / N` for every micro-batch (times world size under DDP/FSDP, which
     average gradients), so the step's loss is normalized by the whole step's count — not a mean of
     micro-batch means (which would over-weight short micro-batches in SFT).
`loss()` therefore returns SUMS over units; metrics are sums too and are divided by N when logged.
Frozen helpers (a teacher, a DPO reference) are built in `setup()` and never wrapped in DDP.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Summed next-token cross-entropy in fp32. logits (B, T, V), labels (B, T) already shifted."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=ignore_index,
                           reduction="sum")


def count_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    return int((labels != ignore_index).sum())


class Objective:
    """Base: a batch format, optional frozen helpers, a loss step."""

    name: str = ""
    batch_format: str = ""  # the dataloader kind: "pretrain" | "sft" | "dpo"

    def __init__(self, cfg: Any = None):
        self.cfg = cfg

    def setup(self, model: nn.Module, tokenizer: Any, device: torch.device) -> None:
        """Build frozen helpers (teacher, reference). Default: none."""

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """How many normalizing units (target tokens by default) this micro-batch holds."""
        return count_targets(batch["labels"])

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def eval_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(summed validation loss, units) — the plain cross-entropy for language-model stages."""
        logits = model(batch["input_ids"], doc_ids=batch.get("doc_ids"))
        return cross_entropy_sum(logits, batch["labels"]).detach(), self.units(batch)


class LanguageModeling(Objective):
    """Next-token cross-entropy on every target whose label is not IGNORE_INDEX.

    Pretraining labels every position; SFT labels only assistant content and its end-of-turn token
    (the loader writes IGNORE_INDEX elsewhere), so the same loss serves both.
    """

    def loss(self, model, batch):
        logits = model(batch["input_ids"], doc_ids=batch.get("doc_ids"))  # (B, T, V)
        loss_sum = cross_entropy_sum(logits, batch["labels"])
        return loss_sum, {"ce": loss_sum.detach()}


class Pretrain(LanguageModeling):
    name, batch_format = "pretrain", "pretrain"


class SupervisedFineTuning(LanguageModeling):
    name, batch_format = "instruct", "sft"


OBJECTIVES: dict[str, type[Objective]] = {
    "pretrain": Pretrain,
    "instruct": SupervisedFineTuning,
}


def build_objective(cfg: Any) -> Objective:
    """The objective for cfg.training.training_stage (a table lookup; no stage logic in the loop)."""
    stage = cfg.training.training_stage
    if stage not in OBJECTIVES:
        from errors import UserError

        raise UserError(f"TRAINING_STAGE={stage!r} has no objective yet: expected one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[stage](cfg)
