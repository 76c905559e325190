"""Training objectives: batch -> (summed loss, summed metrics). One table entry per stage; the preference
stage's entry is chosen by PREFERENCE_OBJECTIVE (dpo, or the reference-free orpo and simpo).

The loop (train.py) never names an objective. For each optimizer step it
  1. draws the step's micro-batches from the loader named by `objective.batch_format`,
  2. sums `objective.units(batch)` over all micro-batches and ranks -> N (target tokens for
     cross-entropy, preference pairs for DPO),
  3. back-propagates `loss_sum / N` for every micro-batch (times world size under DDP/FSDP, which
     average gradients), so the step's loss is normalized by the whole step's count — not a mean of
     micro-batch means (which would over-weight short micro-batches in SFT).
`loss()` therefore returns SUMS over units; metrics are sums too and are divided by N when logged.

`work(batch, args)` says what a micro-batch costs, read from the host batch before it
goes to the device (shapes and labels: no device sync): the positions fed to the trained model (its B x T
after trimming; 2B x T for preference pairs), the targets that carry loss, and the FLOPs of every forward
and backward the loss step runs, frozen teacher / reference forwards included (model_utils.model_flops at
the batch's own width). The loop sums it over micro-batches and ranks for tokens/s and MFU.

Frozen helpers (a distillation teacher, a DPO reference) are built in `setup()`, which must be called
with the UNWRAPPED model, before DDP/FSDP/compile: the DPO reference is a deep copy of that model
(or, under LoRA, the same model with adapters disabled) and is never wrapped in DDP. `setup()`
returns a dict of banner lines ({"teacher_memory_mb": ...}) for the loop to print.

The loss math is losses.py's (pure functions); `dpo_loss` and `distillation_loss` are part of this module's
public surface too.

CLI (precompute frozen-model outputs once, keyed by the loader's `sample_index`):
    python objectives.py cache-teacher --teacher SRC --data DIR --out DIR --top-k K [--env-file F] [KEY=VALUE ...]
    python objectives.py cache-reference --reference SRC --data DIR --out DIR [--env-file F] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import config
import dataloaders
import distributed as D
import families
import load_rl_dataset
import lora
import model_utils
import moe
import precision
import rewards
import tokenizer
from distributed import shard_frozen_copy, unwrap, world_size
from errors import UserError, run_cli
from losses import (
    IGNORE_INDEX,
    chunked_cross_entropy_sum,
    count_targets,
    cross_entropy_sum,
    distillation_loss,  # noqa: F401  (public here too: objectives.distillation_loss)
    distillation_loss_sum,
    group_advantages,
    grpo_loss,
    orpo_loss,
    response_lengths,
    sequence_logps,
    simpo_loss,
    topk_distillation_loss_sum,
)
from losses import dpo_loss as _dpo_loss
from model import ModelArgs
from objective_caches import (
    ReferenceCache,
    TeacherCache,
    concat_pairs,
    freeze,
    logits_of,
    vocab_size_of,
    write_cache,
)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid",
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """losses.dpo_loss; an unknown `loss_type` is a DPO_LOSS_TYPE setting the user can fix (UserError)."""
    try:
        return _dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                         label_smoothing, loss_type)
    except ValueError as e:
        raise UserError(str(e)) from None


# ---- objectives ------------------------------------------------------------------------------------


def _memory_bytes(model: nn.Module) -> int:
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[id(t)] = t.numel() * t.element_size()  # tied weights counted once
    return sum(seen.values())


def _require_unwrapped(model: nn.Module) -> None:
    if isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        raise RuntimeError("Objective.setup() must receive the unwrapped model, before DDP/FSDP/torch.compile: "
                           "frozen helpers are copies of it and must never be wrapped")


@dataclass(frozen=True)
class Work:
    """What micro-batches cost: positions fed to the trained model (B x T as computed, after trimming),
    targets that carry loss, and the FLOPs of all model passes (frozen helpers' forwards included)."""

    positions: int = 0
    loss_tokens: int = 0
    flops: float = 0.0

    def __add__(self, other: Work) -> Work:
        return Work(self.positions + other.positions, self.loss_tokens + other.loss_tokens, self.flops + other.flops)


def args_of(model: nn.Module | None) -> ModelArgs | None:
    """The ModelArgs of our Transformer (bare or wrapped), None for other models (their FLOPs are not counted)."""
    args = getattr(unwrap(model), "args", None) if model is not None else None
    return args if isinstance(args, ModelArgs) else None


@dataclass
class Policy:
    """What the loop hands an objective in bind(): the model as the training forward calls it (DDP / FSDP2
    wrapper), the model generation runs on (the FSDP2 wrapper, else the bare model), the device, the run's
    autocast, its stop check (raises StopRequested on every rank), the sampler (generate.rollout's
    signature: generation lives above this layer) and the run's console (prints on the main rank)."""

    train_model: nn.Module
    sample_model: nn.Module
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager]
    stop_check: Callable[[], None]
    rollout: Callable[..., list[list[int]]]
    note: Callable[[str], None] = print


class Objective:
    """Base: a batch format, optional frozen helpers, a loss step."""

    name: str = ""
    batch_format: str = ""  # the dataloader kind: "pretrain" | "sft" | "dpo"
    requires_language_modeling: bool = False  # a wrapper term that only combines with pretrain / instruct

    def __init__(self, cfg: Any = None):
        self.cfg = cfg

    def setup(self, model: nn.Module, tokenizer: tokenizer.Tokenizer, device: torch.device) -> dict[str, Any]:
        """Build frozen helpers (teacher, reference) from the UNWRAPPED model, before parallelizing.
        Returns banner facts for the loop to print (empty when there are no helpers)."""
        return {}

    def loader_options(self, tokenizer: tokenizer.Tokenizer) -> dict[str, Any]:
        """Extra keyword arguments for dataloaders.build_loader (how this objective's batches are cut)."""
        return {}

    def own_loaders(self, tokenizer: tokenizer.Tokenizer, rank: int, world_size: int) -> tuple[Any, Any] | None:
        """(train, val) sources of micro-batches when the objective makes its own (they answer next_batch(),
        state_dict(), load_state_dict(), reset() and samples_per_epoch like a dataloaders.Loader; val may be
        None), or None: the loop reads `batch_format` shards with dataloaders.build_loader."""
        return None

    def bind(self, policy: Policy) -> None:
        """The training run's model, handed over once the run is built (before the first step): an objective
        whose batches come from the model itself (rollouts) samples with it."""

    def fill_frozen(self, model: nn.Module, device: torch.device, compute_dtype: torch.dtype | None) -> None:
        """After a meta-device build: `model` is sharded (FSDP2, gathering in `compute_dtype`) and filled; shard
        the frozen copies setup() took of it the same way and fill them from its local shards (no rank holds a
        whole copy)."""

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """How many normalizing units (target tokens by default) this micro-batch holds."""
        return count_targets(batch["labels"])

    def shape(self, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
        """(rows, width) of the trained model's forward on this micro-batch: its B x T as fed to the model."""
        rows, width = batch["input_ids"].shape
        return rows, width

    def loss_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Targets that carry loss in this micro-batch (labels other than IGNORE_INDEX)."""
        return count_targets(batch["labels"])

    def frozen_flops(self, batch: dict[str, torch.Tensor]) -> float:
        """FLOPs of the frozen helpers' forwards (teacher, reference) on this micro-batch."""
        return 0.0

    def work(self, batch: dict[str, torch.Tensor], args: ModelArgs, weight_grads: bool = True) -> Work:
        """What loss() on this micro-batch computes (see the module docstring): `args` the trained model's,
        `weight_grads` False for a frozen base under LoRA. The output head runs on every position (the fused
        head too: it masks targets instead of selecting them, which would cost a host sync)."""
        rows, width = self.shape(batch)
        flops = model_utils.model_flops(args, rows, width, weight_grads=weight_grads)
        return Work(rows * width, self.loss_tokens(batch), flops + self.frozen_flops(batch))

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def eval_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(summed validation loss, units) — the plain cross-entropy for language-model stages."""
        with torch.no_grad():
            if is_ours(model):
                loss_sum = model(batch["input_ids"], **document_inputs(batch), labels=batch["labels"])
            else:
                loss_sum = cross_entropy_sum(model(batch["input_ids"], **document_inputs(batch)), batch["labels"])
        return loss_sum, self.units(batch)


HOST_KEYS = ("sample_index",)  # batch entries only ever read on the host (cache lookups by sample)


def batch_to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on `device`, except HOST_KEYS: reading a device tensor on the host (a cache's row
    numbers) would wait for every kernel queued before it."""
    return {k: v if k in HOST_KEYS else v.to(device, non_blocking=True) for k, v in batch.items()}


def document_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The forward's document-masking inputs this batch carries (`doc_ids`, `positions`), as keyword
    arguments; empty for batches without documents."""
    return {k: batch[k] for k in ("doc_ids", "positions") if k in batch}


def is_ours(model: nn.Module) -> bool:
    """Whether the model (bare, under DDP / torch.compile, or FSDP2's subclass of it) is one of our families'
    (families.py: the Transformer, GPT-2), whose forward takes `labels` and returns the loss with the LM head
    fused into it (fused_ce.head_loss)."""
    return isinstance(unwrap(model), tuple(f.module_class for f in families.FAMILIES.values()))


def response_logps(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probs of each row's targets (B,) fp32: through the model's own fused head and loss when it
    is ours (no (B, T, V) logits), else from the full logits."""
    if is_ours(model):
        return model(ids, labels=labels, per_row=True)
    return sequence_logps(logits_of(model, ids), labels)


class LanguageModeling(Objective):
    """Next-token cross-entropy on every target whose label is not IGNORE_INDEX.

    Pretraining labels every position; SFT labels only assistant content and its end-of-turn token
    (the loader writes IGNORE_INDEX elsewhere), so the same loss serves both. Our model takes the labels and
    returns the summed loss, its head fused with the loss in chunks (fused_ce.head_loss): the (B, T, V)
    logits, their fp32 copy and their gradient are never materialized, under any wrapper.
    """

    def loss(self, model, batch):
        if is_ours(model):
            loss_sum = model(batch["input_ids"], **document_inputs(batch), labels=batch["labels"])
        else:
            loss_sum = cross_entropy_sum(model(batch["input_ids"], **document_inputs(batch)), batch["labels"])
        return loss_sum, {"ce": loss_sum.detach()}


class Pretrain(LanguageModeling):
    """Next-token prediction over windows of the token stream. With PRETRAIN_DOC_MASKING the loader numbers
    the documents of each window (BOS starts one) and attention stays inside a document (Llama 3 paper,
    sec. 3.2: no attention across documents in a sequence); PRETRAIN_DOC_RESET_POSITIONS also restarts RoPE
    positions at each document."""

    name, batch_format = "pretrain", "pretrain"

    def loader_options(self, tokenizer: tokenizer.Tokenizer) -> dict[str, Any]:
        if self.cfg is None or not self.cfg.data.pretrain_doc_masking:
            return {}
        return {"doc_delimiters": (tokenizer.bos_id, tokenizer.eos_id),
                "reset_positions": self.cfg.data.pretrain_doc_reset_positions}


class SupervisedFineTuning(LanguageModeling):
    name, batch_format = "instruct", "sft"


class Distillation(Objective):
    """A language-modeling objective plus a knowledge-distillation term, per target token:

        loss_sum = (1 - alpha) * CE_sum + alpha * T^2 * KL_sum(teacher || student)

    both summed over the positions whose label is not IGNORE_INDEX, so units (target tokens) and the
    step normalization are the base objective's. The teacher is frozen (eval, no grad, TEACHER_PRECISION)
    and never wrapped in DDP; with TEACHER_CACHE_PATH the term reads precomputed top-k teacher log-probs
    by `batch["sample_index"]` instead (top-k + tail-bucket KL, see topk_distillation_loss_sum; the cache holds
    the teacher at DISTILLATION_TEMPERATURE, so it is built for one T; packed SFT rows have no sample_index).
    Validation stays the plain CE of the base objective, so val curves compare with and without KD.
    """

    requires_language_modeling = True

    def __init__(self, cfg: config.Config, base: LanguageModeling, teacher: nn.Module | None = None):
        super().__init__(cfg)
        self.base = base
        self.name, self.batch_format = f"{base.name}+distill", base.batch_format
        d = cfg.distill
        self.alpha, self.temperature = float(d.distillation_alpha), float(d.distillation_temperature)
        self.teacher: nn.Module | None = teacher
        self.cache: TeacherCache | None = None
        self.teacher_memory_bytes = 0

    def setup(self, model: nn.Module, tokenizer: tokenizer.Tokenizer, device: torch.device) -> dict[str, Any]:
        _require_unwrapped(model)
        d = self.cfg.distill
        student_vocab = vocab_size_of(model)
        if d.teacher_cache_path:
            if self.base.batch_format == "sft" and self.cfg.data.sft_batching == "packed":
                raise UserError("TEACHER_CACHE_PATH is keyed by sample_index, which packed SFT rows do not have: "
                                "set SFT_BATCHING=padded (for the cache build too) or unset TEACHER_CACHE_PATH")
            self.cache = TeacherCache(d.teacher_cache_path)
            if abs(self.cache.temperature - self.temperature) > 1e-9:
                raise UserError(f"TEACHER_CACHE_PATH={d.teacher_cache_path} holds log-probs at temperature "
                                f"{self.cache.temperature} but DISTILLATION_TEMPERATURE={self.temperature}: rebuild "
                                "the cache with this DISTILLATION_TEMPERATURE or use the cache's")
            if self.base.batch_format == "pretrain":
                keys = ("doc_masking", "doc_reset_positions")
                if any(k not in self.cache.manifest for k in keys):
                    raise UserError(f"TEACHER_CACHE_PATH={d.teacher_cache_path} records no PRETRAIN_DOC_MASKING / "
                                    "PRETRAIN_DOC_RESET_POSITIONS (an older cache): rebuild it with `python "
                                    "objectives.py cache-teacher ...`")
                built = {k: bool(self.cache.manifest[k]) for k in keys}
                if built != document_attention(self.cfg, self.base.batch_format):
                    raise UserError(f"TEACHER_CACHE_PATH={d.teacher_cache_path} was built with PRETRAIN_DOC_MASKING="
                                    f"{str(built['doc_masking']).lower()}, PRETRAIN_DOC_RESET_POSITIONS="
                                    f"{str(built['doc_reset_positions']).lower()}, unlike this run (its teacher saw "
                                    "other document attention or positions): rebuild it with this run's settings "
                                    "or use the cache's")
            teacher_vocab, where = self.cache.vocab_size, f"TEACHER_CACHE_PATH={d.teacher_cache_path}"
            self.teacher_memory_bytes = 0
            info: dict[str, Any] = {"teacher": f"cache {d.teacher_cache_path} (top-{self.cache.top_k})"}
        else:
            dtype = precision.inference_dtype(d.teacher_precision, device)
            if self.teacher is None:
                self.teacher, _ = model_utils.load_model(d.teacher_model_checkpoint, device=device, dtype=dtype,
                                                         rope_scaling_factor=self.cfg.model.rope_scaling_factor)
            else:
                self.teacher.to(device=device, dtype=dtype)
            freeze(self.teacher)
            teacher_vocab, where = vocab_size_of(self.teacher), f"TEACHER_MODEL_CHECKPOINT={d.teacher_model_checkpoint}"
            self.teacher_memory_bytes = _memory_bytes(self.teacher)
            info = {"teacher": d.teacher_model_checkpoint or type(self.teacher).__name__,
                    "teacher_precision": precision.name_of(dtype)}
        if teacher_vocab != student_vocab:
            raise UserError(f"distillation: the teacher's vocabulary has {teacher_vocab} tokens ({where}) but the "
                            f"student's has {student_vocab}: both must use the same tokenizer")
        info["teacher_memory_mb"] = round(self.teacher_memory_bytes / 2**20, 1)
        return info

    def units(self, batch):
        return self.base.units(batch)

    def loader_options(self, tokenizer: tokenizer.Tokenizer) -> dict[str, Any]:
        return self.base.loader_options(tokenizer)

    def frozen_flops(self, batch):
        teacher = None if self.cache is not None else args_of(self.teacher)
        if teacher is None:  # a cache, or a model of another architecture
            return 0.0
        rows, width = self.shape(batch)
        return model_utils.model_flops(teacher, rows, width, backward=False)

    def kd_sum(self, student_logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """alpha-free T^2 * KL summed over target positions, from the live teacher or the cache."""
        mask = batch["labels"] != IGNORE_INDEX  # (B, T)
        if self.cache is not None:
            if "sample_index" not in batch:
                raise UserError("TEACHER_CACHE_PATH is set but the batches carry no 'sample_index' (packed SFT rows "
                                "have none): use SFT_BATCHING=padded, or unset TEACHER_CACHE_PATH to run the teacher live")
            logps, ids, tail = self.cache.lookup(batch["sample_index"], student_logits.device)  # (B,T,K)x2, (B,T)
            if logps.shape[1] > student_logits.shape[1]:  # a batch trimmed of its padding (TRIM_PADDING)
                T = student_logits.shape[1]
                logps, ids, tail = logps[:, :T], ids[:, :T], tail[:, :T]
            if logps.shape[1] != student_logits.shape[1]:
                raise UserError(f"teacher cache rows hold {logps.shape[1]} positions, batches {student_logits.shape[1]}"
                                ": rebuild the cache with the same MAX_SEQ_LEN")
            return topk_distillation_loss_sum(student_logits, logps, ids, mask, self.temperature, tail)
        assert self.teacher is not None, "setup() loads the teacher when there is no cache"
        with torch.no_grad():
            teacher_logits = logits_of(self.teacher, batch["input_ids"], batch.get("doc_ids"), batch.get("positions"))
        return distillation_loss_sum(student_logits, teacher_logits, mask, self.temperature)

    def loss(self, model, batch):
        # both terms read the compute-dtype logits in row chunks (losses.row_chunked_sum): no fp32 copy of them
        logits = model(batch["input_ids"], **document_inputs(batch))  # (B, T, V)
        ce = chunked_cross_entropy_sum(logits, batch["labels"])
        kd = self.kd_sum(logits, batch)
        loss_sum = (1.0 - self.alpha) * ce + self.alpha * kd
        return loss_sum, {"ce": ce.detach(), "kd": kd.detach()}

    def eval_loss(self, model, batch):
        return self.base.eval_loss(model, batch)


def preference_shape(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(2B, T): chosen and rejected go through the model as one concatenated forward."""
    B, T = batch["chosen_input_ids"].shape
    return 2 * B, T


def preference_loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The response tokens of chosen and rejected (the positions whose log-probs the loss reads)."""
    return count_targets(batch["chosen_labels"]) + count_targets(batch["rejected_labels"])


class DirectPreferenceOptimization(Objective):
    """DPO on (prompt, chosen, rejected) pairs; units = pairs.

    Chosen and rejected go through the policy in ONE concatenated forward (2B rows). The reference is a
    frozen deep copy of the starting model made in setup() (eval, no grad, never in DDP), or — when the
    model carries LoRA adapters — the same model with adapters disabled (no second copy; torchtune's
    trick). With DPO_REFERENCE_LOGPS_PATH the reference log-probs are read by batch["sample_index"].
    """

    name, batch_format = "dpo", "dpo"

    def __init__(self, cfg: config.Config):
        super().__init__(cfg)
        d = cfg.dpo
        self.beta, self.label_smoothing, self.loss_type = float(d.dpo_beta), float(d.dpo_label_smoothing), d.dpo_loss_type
        self.reference: nn.Module | None = None
        self.base_model: nn.Module | None = None  # the unwrapped policy, for the adapters-off reference pass
        self.ref_cache: ReferenceCache | None = None

    def setup(self, model: nn.Module, tokenizer: tokenizer.Tokenizer, device: torch.device) -> dict[str, Any]:
        _require_unwrapped(model)
        path = self.cfg.dpo.dpo_reference_logps_path
        if path:
            self.ref_cache = ReferenceCache(path)
            return {"reference": f"precomputed log-probs {path}", "reference_memory_mb": 0.0}
        # LoRA may be applied after setup() (apply_lora swaps modules inside this same object), so the
        # setting decides: the reference is then this model with its adapters switched off.
        if self.cfg.lora.lora_enabled or any(True for _ in lora.lora_modules(model)):
            self.base_model = model
            return {"reference": "policy with LoRA adapters disabled", "reference_memory_mb": 0.0}
        self.reference = freeze(copy.deepcopy(model))  # on the meta device too: fill_frozen fills it
        if self.reference.tok_embeddings.weight.is_meta:  # type: ignore[union-attr]  # a Transformer's nn.Embedding
            return {"reference": "frozen copy of the initial policy, sharded like it (FSDP2)",
                    "reference_memory_mb": round(_memory_bytes(self.reference) / world_size() / 2**20, 1)}
        return {"reference": "frozen copy of the initial policy",
                "reference_memory_mb": round(_memory_bytes(self.reference) / 2**20, 1)}

    def fill_frozen(self, model, device, compute_dtype):
        if self.reference is not None and self.reference.tok_embeddings.weight.is_meta:
            shard_frozen_copy(self.reference, model, device, compute_dtype)

    def units(self, batch):
        return int(batch["chosen_input_ids"].shape[0])

    def shape(self, batch):
        return preference_shape(batch)

    def loss_tokens(self, batch):
        return preference_loss_tokens(batch)

    def frozen_flops(self, batch):
        if self.ref_cache is not None:
            return 0.0
        reference = self.reference if self.reference is not None else self.base_model
        args = args_of(reference)
        if args is None:
            return 0.0
        rows, width = self.shape(batch)
        return model_utils.model_flops(args, rows, width, backward=False)

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor], ids: torch.Tensor, labels: torch.Tensor
                        ) -> torch.Tensor:
        """Reference log-probs (2B,) = [chosen; rejected]."""
        if self.ref_cache is not None:
            if "sample_index" not in batch:
                raise UserError("DPO_REFERENCE_LOGPS_PATH is set but the loader's batches carry no 'sample_index'; "
                                "unset it to run the reference live")
            c, r = self.ref_cache.lookup(batch["sample_index"], ids.device)
            return torch.cat([c, r])
        if self.reference is not None:
            return response_logps(self.reference, ids, labels)
        if self.base_model is None:
            raise RuntimeError("DirectPreferenceOptimization.setup() was not called before loss()")
        if not any(True for _ in lora.lora_modules(self.base_model)):
            raise RuntimeError("LORA_ENABLED=true but the model has no adapters: apply_lora must run on the model "
                               "given to setup(); without adapters the policy would be its own reference")
        with lora.disable_lora(self.base_model):
            return response_logps(self.base_model, ids, labels)

    def _forward(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        ids, labels = concat_pairs(batch)
        B = batch["chosen_input_ids"].shape[0]
        policy = response_logps(model, ids, labels)  # (2B,) fp32
        ref = self.reference_logps(batch, ids, labels)
        losses, cr, rr = dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], self.beta, self.label_smoothing,
                                  self.loss_type)
        return losses, cr, rr, policy.detach()

    def loss(self, model, batch):
        losses, cr, rr, policy = self._forward(model, batch)
        B = cr.shape[0]
        metrics = {
            "rewards_chosen": cr.sum(), "rewards_rejected": rr.sum(),
            "reward_accuracy": (cr > rr).float().sum(), "reward_margin": (cr - rr).sum(),
            "logps_chosen": policy[:B].sum(), "logps_rejected": policy[B:].sum(),
        }
        return losses.sum(), metrics

    def eval_loss(self, model, batch):
        with torch.no_grad():
            losses, *_ = self._forward(model, batch)
        return losses.sum(), self.units(batch)


class ReferenceFreePreference(Objective):
    """Preference optimization without a reference model, on the DPO batches; units = pairs.

    A response is scored by its LENGTH-NORMALIZED log-prob, mean log pi(y|x) per response token (prompt and
    padding excluded), from ONE concatenated forward of chosen and rejected (2B rows). setup() builds
    nothing: no reference copy, no adapters-off pass, no cache. Subclasses turn the (chosen, rejected) mean
    log-probs into per-pair losses and metrics.
    """

    batch_format = "dpo"

    def setup(self, model: nn.Module, tokenizer: tokenizer.Tokenizer, device: torch.device) -> dict[str, Any]:
        _require_unwrapped(model)
        return {"reference": "none (reference-free)", "reference_memory_mb": 0.0}

    def units(self, batch):
        return int(batch["chosen_input_ids"].shape[0])

    def shape(self, batch):
        return preference_shape(batch)

    def loss_tokens(self, batch):
        return preference_loss_tokens(batch)

    def pair_losses(self, chosen: torch.Tensor, rejected: torch.Tensor
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B,) mean log-probs of chosen and rejected -> per-pair losses (B,), per-pair metrics (B,) each."""
        raise NotImplementedError

    def loss(self, model, batch):
        ids, labels = concat_pairs(batch)
        B = batch["chosen_input_ids"].shape[0]
        logps = response_logps(model, ids, labels) / response_lengths(labels).clamp(min=1)  # (2B,)
        losses, metrics = self.pair_losses(logps[:B], logps[B:])
        metrics.update(avg_logps_chosen=logps[:B].detach(), avg_logps_rejected=logps[B:].detach())
        return losses.sum(), {k: v.sum() for k, v in metrics.items()}

    def eval_loss(self, model, batch):
        with torch.no_grad():
            loss, _ = self.loss(model, batch)
        return loss, self.units(batch)


class OddsRatioPreference(ReferenceFreePreference):
    """ORPO (Hong et al. 2024): the chosen response's mean NLL plus ORPO_LAMBDA times the odds-ratio loss,
    per pair (losses.orpo_loss). SFT and preference alignment in one stage, so it may start from a
    pretrained model as well as from an SFT one."""

    name = "orpo"

    def pair_losses(self, chosen, rejected):
        losses, nll, log_odds = orpo_loss(chosen, rejected, float(self.cfg.dpo.orpo_lambda))
        return losses, {"nll": nll, "log_odds_ratio": log_odds, "reward_accuracy": (log_odds > 0).float()}


class SimplePreference(ReferenceFreePreference):
    """SimPO (Meng et al. 2024): the reward is SIMPO_BETA times the mean log-prob per response token and the
    chosen reward must beat the rejected one by the margin SIMPO_GAMMA (losses.simpo_loss)."""

    name = "simpo"

    def pair_losses(self, chosen, rejected):
        d = self.cfg.dpo
        losses, cr, rr = simpo_loss(chosen, rejected, float(d.simpo_beta), float(d.simpo_gamma))
        return losses, {"rewards_chosen": cr, "rewards_rejected": rr, "reward_margin": cr - rr,
                        "reward_accuracy": (cr > rr).float()}


class RouterLosses(Objective):
    """Any stage's objective plus the Mixture-of-Experts router losses of the model's forward:

        loss_sum = base loss_sum + units * (MOE_LOAD_BALANCE_WEIGHT * lb + MOE_Z_LOSS_WEIGHT * z)

    lb and z (moe.router_losses) are means over this micro-batch's tokens; scaled by its units (targets, or
    pairs for DPO) they become a per-unit term the loop normalizes like the base loss, so the step's value is
    the unit-weighted mean of the micro-batches' lb and z. The load-balancing loss is nonlinear in the batch
    (a product of two batch means): it is defined per micro-batch (Mixtral), so gradient accumulation and DDP
    give the single-process step only for the language-model term, or for the whole loss when the micro-batches
    are the same (DDP with the same per-rank micro-batch). Metrics: moe_lb, moe_z, the expert load
    (moe_max_load, moe_min_load: busiest / idlest expert's share times E, 1 = even) and moe_dropped.
    Frozen helpers (a teacher, a DPO reference) run without gradients and leave the router state alone.
    """

    def __init__(self, cfg: config.Config, base: Objective):
        super().__init__(cfg)
        self.base = base
        self.name, self.batch_format = f"{base.name}+moe", base.batch_format
        self.lb_weight, self.z_weight = cfg.training.moe_load_balance_weight, cfg.training.moe_z_loss_weight
        self.top_k = cfg.model.moe_top_k

    def setup(self, model: nn.Module, tokenizer: tokenizer.Tokenizer, device: torch.device) -> dict[str, Any]:
        return self.base.setup(model, tokenizer, device)

    def loader_options(self, tokenizer: tokenizer.Tokenizer) -> dict[str, Any]:
        return self.base.loader_options(tokenizer)

    def fill_frozen(self, model, device, compute_dtype):
        self.base.fill_frozen(model, device, compute_dtype)

    def units(self, batch):
        return self.base.units(batch)

    def work(self, batch, args, weight_grads=True):
        return self.base.work(batch, args, weight_grads)

    def loss(self, model, batch):
        bare = unwrap(model)
        moe.forget_routing(bare)
        loss_sum, metrics = self.base.loss(model, batch)
        aux, load = moe.router_losses(bare, self.top_k), moe.expert_load(bare)
        moe.forget_routing(bare)
        # the base's units, counted on the device for language-model batches (units() would read it: a sync)
        n = (batch["labels"] != IGNORE_INDEX).sum() if "labels" in batch else self.base.units(batch)
        loss_sum = loss_sum + n * (self.lb_weight * aux["lb"] + self.z_weight * aux["z"])
        extra = {f"moe_{k}": v.detach() * n for k, v in (*aux.items(), *load.items())}
        return loss_sum, {**metrics, **extra}

    def eval_loss(self, model, batch):
        return self.base.eval_loss(model, batch)


# ---- GRPO: rollouts are the data ----------------------------------------------------------------------


def token_logps(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, temperature: float,
                with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(token_t | tokens_<t) at `temperature` (log_softmax of logits / T, as TRL takes them) for every
    position t whose label is not IGNORE_INDEX -> ((B, T) fp32, 0 elsewhere and at t = 0; with_entropy: the
    entropy of the distribution each such token was drawn from, (B, T), no gradient)."""
    logits = logits_of(model, ids)[:, :-1].float() / temperature  # (B, T-1, V): position t-1 predicts t
    logp = torch.log_softmax(logits, dim=-1)
    target = labels[:, 1:]
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    picked = F.pad(torch.where(target != IGNORE_INDEX, picked, 0.0), (1, 0))
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = F.pad(-(logp.exp() * logp).sum(-1), (1, 0))
    return picked, entropy


class RolloutSource:
    """GRPO's micro-batches, built from the policy's own completions (the objective's `train` loader).

    Generation batch k holds GRPO_PROMPTS_PER_STEP prompts: positions k*P .. k*P+P-1 of an endless sequence
    of epochs, each a permutation of the train prompts drawn from (SEED, epoch), so it names the same prompts
    for any world size; rank r samples the r-th of world_size equal slices (whole groups). Every optimizer
    step trains on the whole generation batch (`accum` micro-batches per rank) and GRPO_NUM_ITERATIONS steps
    reuse it. The state is the count of micro-batches handed out: a resumed run regenerates its batch with
    the same keyed noise (generate.KeyedSampling), so it samples the same completions."""

    def __init__(self, objective: GroupRelativePolicyOptimization, tok: tokenizer.Tokenizer,
                 records: list[dict[str, Any]], rank: int, world_size: int, accum: int):
        g = objective.cfg.grpo
        self.objective, self.tok, self.records = objective, tok, records
        self.rank, self.world, self.accum = rank, world_size, accum
        self.prompts, self.iterations = g.grpo_prompts_per_step, g.grpo_num_iterations
        self.seed = objective.cfg.training.seed
        self.consumed = 0
        self.buffer: tuple[int, list[dict[str, torch.Tensor]]] | None = None
        self._orders: dict[int, list[int]] = {}

    @property
    def samples_per_epoch(self) -> int:
        """Completions trained on per pass over the prompts (each generation batch counts once per iteration)."""
        return len(self.records) * self.objective.num_generations * self.iterations

    def reset(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "grpo", "consumed": self.consumed}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("kind") != "grpo":
            raise UserError("the checkpoint's data position is not a GRPO one (another stage's checkpoint): "
                            "start TRAINING_STAGE=grpo from it with INIT_FROM instead of resuming it")
        self.consumed = int(d["consumed"])

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.records)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def rank_records(self, k: int) -> list[dict[str, Any]]:
        """This rank's prompts of generation batch k."""
        return [r for r, _ in self.rank_prompts(k)]

    def rank_prompts(self, k: int) -> list[tuple[dict[str, Any], int]]:
        """This rank's prompts of generation batch k, each with its sampling key: epoch x prompts + prompt_id,
        so a prompt that occurs twice in one batch (across an epoch boundary) draws other completions."""
        n, share = len(self.records), self.prompts // self.world
        out = []
        for i in range(k * self.prompts + self.rank * share, k * self.prompts + (self.rank + 1) * share):
            record = self.records[self._order(i // n)[i % n]]
            out.append((record, (i // n) * n + int(record["prompt_id"])))
        return out

    def next_batch(self) -> dict[str, torch.Tensor]:
        k, within = divmod(self.consumed, self.accum * self.iterations)
        if self.buffer is None or self.buffer[0] != k:
            if within:
                raise UserError(f"this checkpoint lies inside a generation batch (step {self.consumed // self.accum},"
                                f" GRPO_NUM_ITERATIONS={self.iterations}), whose completions were not saved: resume "
                                "from a checkpoint at a multiple of GRPO_NUM_ITERATIONS steps")
            self.buffer = (k, self.objective.generation_batch(k, self.rank_prompts(k), self.tok, self.rank,
                                                               self.world, self.accum))
        batch = self.buffer[1][within % self.accum]
        self.consumed += 1
        return batch


class GroupRelativePolicyOptimization(Objective):
    """GRPO (Shao et al. 2024) with the DAPO / Dr. GRPO aggregations: online RL on the policy's own samples.

    Per generation batch (RolloutSource): GRPO_NUM_GENERATIONS completions of each prompt (generate.rollout,
    KV cache, GRPO_TEMPERATURE / GRPO_TOP_P, stop at end of turn), scored by the reward functions (rewards.py,
    TRL's calling convention), group-relative advantages over the whole batch (losses.group_advantages; the
    rewards are summed over ranks first so group and batch statistics are exact), then the clipped-ratio loss
    (losses.grpo_loss) on prompt + completion rows with the completion tokens as targets. Log-probs are taken at
    the sampling temperature. The "old" log-probs are the training model's own no-grad forward of the same
    micro-batch when GRPO_NUM_ITERATIONS > 1, and the current log-probs detached when it is 1 (the ratio is then
    exactly 1, as in TRL). The reference (GRPO_BETA > 0) is the starting model: adapters off under LoRA, else
    a frozen copy; none when GRPO_BETA = 0.

    units: completions (grpo), completion tokens (dapo: the loop sums them over micro-batches and ranks before
    the first backward) or completions x GRPO_MAX_COMPLETION_LEN (dr_grpo); loss() returns the matching sums.
    The first completions of each logging interval are printed with their rewards. Metrics are scaled so that
    the loop's division by the step's units gives: reward (mean), reward_<fn>
    (each function's mean over the samples it judged), reward_std (the mean group std), frac_reward_zero_std
    (groups whose rewards are all equal), completion_length (tokens, the stop token included), clip_ratio
    (+ _low / _high; completion tokens in the clipped region), entropy (per completion token) and kl (GRPO_BETA
    > 0, per completion token)."""

    name, batch_format = "grpo", "grpo"

    def __init__(self, cfg: config.Config):
        super().__init__(cfg)
        g = cfg.grpo
        self.num_generations, self.temperature = g.grpo_num_generations, float(g.grpo_temperature)
        self.loss_type, self.scale = g.grpo_loss_type, g.grpo_scale_rewards
        self.epsilon = float(g.grpo_epsilon)
        self.epsilon_high = float(g.grpo_epsilon_high) or None
        self.beta, self.iterations = float(g.grpo_beta), g.grpo_num_iterations
        self.max_completion = g.grpo_max_completion_len
        self.functions = rewards.load_reward_functions(g.grpo_rewards, g.grpo_format_regex)
        self.weights = list(g.grpo_reward_weights) or None
        self.stat_names = ["reward", *(f"reward_{_metric_name(f.name)}" for f in self.functions), "reward_std",
                           "frac_reward_zero_std", "completion_length"]
        self.reference: nn.Module | None = None
        self.base_model: nn.Module | None = None
        self.policy: Policy | None = None

    def setup(self, model: nn.Module, tokenizer: tokenizer.Tokenizer, device: torch.device) -> dict[str, Any]:
        _require_unwrapped(model)
        if self.beta == 0.0:
            return {"reference": "none (GRPO_BETA=0)", "reference_memory_mb": 0.0}
        if self.cfg.lora.lora_enabled or any(True for _ in lora.lora_modules(model)):
            self.base_model = model
            return {"reference": "policy with LoRA adapters disabled", "reference_memory_mb": 0.0}
        self.reference = freeze(copy.deepcopy(model))
        per_rank = world_size() if self.reference.tok_embeddings.weight.is_meta else 1  # type: ignore[union-attr]
        return {"reference": "frozen copy of the initial policy",
                "reference_memory_mb": round(_memory_bytes(self.reference) / per_rank / 2**20, 1)}

    def fill_frozen(self, model, device, compute_dtype):
        if self.reference is not None and self.reference.tok_embeddings.weight.is_meta:
            shard_frozen_copy(self.reference, model, device, compute_dtype)

    def own_loaders(self, tokenizer: tokenizer.Tokenizer, rank: int, world_size: int) -> tuple[Any, Any] | None:
        records = load_rl_dataset.read_split(self.cfg.grpo.grpo_data_path, "train")
        if not records:
            raise UserError(f"GRPO_DATA_PATH={self.cfg.grpo.grpo_data_path} has no train prompts; prepare them "
                            "with load_rl_dataset.py")
        _, accum = self.cfg.batch_geometry(world_size)
        return RolloutSource(self, tokenizer, records, rank, world_size, accum), None

    def bind(self, policy: Policy) -> None:
        self.policy = policy

    def units(self, batch):
        rows = int(batch["input_ids"].shape[0])
        if self.loss_type == "dapo":
            return count_targets(batch["labels"])
        return rows * self.max_completion if self.loss_type == "dr_grpo" else rows

    def frozen_flops(self, batch):
        args = args_of(self.reference if self.reference is not None else self.base_model)
        if self.beta == 0.0 or args is None:
            return 0.0
        rows, width = self.shape(batch)
        return model_utils.model_flops(args, rows, width, backward=False)

    # -- the generation batch --

    def encode(self, tok: tokenizer.Tokenizer, record: dict[str, Any]) -> list[int]:
        prompt = record["prompt"]
        if isinstance(prompt, list):
            ids = list(tokenizer.ChatFormat(tok).encode_dialog(prompt, add_generation_prompt=True)[0])
        else:
            ids = list(tok.encode(prompt, bos=tok.wants_bos))
        room = self.cfg.model.max_seq_len - self.max_completion
        if len(ids) > room:
            raise UserError(f"GRPO prompt_id {record.get('prompt_id')} has {len(ids)} tokens, more than MAX_SEQ_LEN="
                            f"{self.cfg.model.max_seq_len} - GRPO_MAX_COMPLETION_LEN={self.max_completion} leaves; "
                            "raise MAX_SEQ_LEN or drop the long prompts")
        return ids

    def generation_batch(self, k: int, prompts: list[tuple[dict[str, Any], int]], tok: tokenizer.Tokenizer,
                         rank: int, world: int, accum: int) -> list[dict[str, torch.Tensor]]:
        """Rollouts of this rank's prompts of generation batch k ((record, sampling key) pairs) -> its `accum`
        micro-batches. Collective."""
        policy = self.policy
        records = [r for r, _ in prompts]
        if policy is None:
            raise RuntimeError("GroupRelativePolicyOptimization.bind() was not called before the first batch")
        G = self.num_generations
        prompt_ids = [self.encode(tok, r) for r in records]
        pad = tok.pad_id if tok.pad_id is not None and tok.pad_id >= 0 else 0
        with policy.autocast():
            completions = policy.rollout(
                policy.sample_model, prompt_ids, [key for _, key in prompts], G, self.max_completion,
                temperature=self.temperature, top_p=self.cfg.grpo.grpo_top_p, stop_ids=tok.stop_ids,
                seed=self.cfg.training.seed, step=k, pad_id=pad, stop_check=policy.stop_check,
                all_ranks_done=lambda done: not D.any_rank(not done))
        stops = set(tok.stop_ids)
        texts = [tok.decode(c[:-1] if c and c[-1] in stops else c) for c in completions]
        samples = [r for r in records for _ in range(G)]
        total, per_fn = rewards.score(self.functions, self.weights, [r["prompt"] for r in samples], texts,
                                      completions, samples)
        if (k * self.iterations) % self.cfg.logging.log_every_x_steps == 0:  # a few samples per logging interval
            for i in range(min(2, len(samples))):
                p = samples[i]["prompt"]
                shown = p if isinstance(p, str) else p[-1]["content"]
                policy.note(f"  rollout | {shown[:200]!r} -> {texts[i][:200]!r} | reward {float(total[i]):.4g}")
        # the whole generation batch on every rank: group and batch statistics exact over all of it
        n, K = len(samples), len(self.functions)
        full = torch.zeros(n * world, 2 + K, dtype=torch.float64)
        full[rank * n:(rank + 1) * n] = torch.cat(
            [total.double()[:, None], torch.tensor([float(len(c)) for c in completions],
                                                   dtype=torch.float64)[:, None], per_fn.double()], dim=1)
        full = D.all_reduce_sum(full.to(policy.device)).cpu()
        all_rewards, lengths = full[:, 0].float(), full[:, 1]
        advantages, _, _ = group_advantages(all_rewards, G, self.scale)
        _, group_std, zero_std = group_advantages(all_rewards, G, "group")
        stats = torch.stack([torch.nanmean(full[:, 0]), *(torch.nanmean(full[:, 2 + j]) for j in range(K)),
                             torch.nanmean(group_std.double()), zero_std.view(-1, G)[:, 0].double().mean(),
                             lengths.mean()])
        N, T = float(n * world), float(lengths.sum())
        U = T if self.loss_type == "dapo" else N * self.max_completion if self.loss_type == "dr_grpo" else N
        mine = advantages[rank * n:(rank + 1) * n]
        rows = [p + c for p, c in zip([p for p in prompt_ids for _ in range(G)], completions, strict=True)]
        micro = n // accum
        batches = []
        for m in range(accum):
            idx = range(m * micro, (m + 1) * micro)
            width = max(len(rows[i]) for i in idx)
            ids = torch.full((micro, width), pad, dtype=torch.long)
            labels = torch.full((micro, width), IGNORE_INDEX, dtype=torch.long)
            for b, i in enumerate(idx):
                ids[b, :len(rows[i])] = torch.tensor(rows[i])
                start = len(rows[i]) - len(completions[i])
                labels[b, start:len(rows[i])] = torch.tensor(completions[i], dtype=torch.long)
            batches.append({"input_ids": ids, "labels": labels, "advantages": mine[m * micro:(m + 1) * micro],
                            "stats": stats * (U * micro / N), "token_scale": torch.tensor(U / max(T, 1.0),
                                                                                          dtype=torch.float64)})
        self._frozen_logps(batches)
        return batches

    @torch.no_grad()
    def _frozen_logps(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """The old (GRPO_NUM_ITERATIONS > 1) and reference (GRPO_BETA > 0) log-probs of each micro-batch, from
        forwards of the same micro-batches the training step runs."""
        policy = self.policy
        assert policy is not None
        for batch in batches:
            ids, labels = batch["input_ids"].to(policy.device), batch["labels"].to(policy.device)
            with policy.autocast():
                if self.iterations > 1:
                    batch["old_logps"] = token_logps(policy.train_model, ids, labels, self.temperature)[0]
                if self.beta != 0.0:
                    if self.reference is not None:
                        batch["ref_logps"] = token_logps(self.reference, ids, labels, self.temperature)[0]
                    else:
                        assert self.base_model is not None
                        with lora.disable_lora(self.base_model):
                            batch["ref_logps"] = token_logps(self.base_model, ids, labels, self.temperature)[0]

    # -- the loss --

    def loss(self, model, batch):
        labels = batch["labels"]
        logps, entropy = token_logps(model, batch["input_ids"], labels, self.temperature, with_entropy=True)
        mask = labels != IGNORE_INDEX
        old = batch.get("old_logps", logps.detach())
        # num_sequences / num_tokens / max_completion_length 1: sums; the loop divides by the step's units
        loss_sum, m = grpo_loss(logps, old, batch["advantages"], mask, loss_type=self.loss_type,
                                epsilon=self.epsilon, epsilon_high=self.epsilon_high, beta=self.beta,
                                ref_logps=batch.get("ref_logps"), max_completion_length=1, num_sequences=1,
                                num_tokens=1)
        per_token = batch["token_scale"]
        assert entropy is not None
        metrics = {"clip_ratio": m["clip_region"] * per_token, "clip_ratio_low": m["clip_low"] * per_token,
                   "clip_ratio_high": m["clip_high"] * per_token,
                   "entropy": (entropy * mask).sum() * per_token,
                   **dict(zip(self.stat_names, batch["stats"].unbind(), strict=True))}
        if "kl" in m:
            metrics["kl"] = m["kl"] * per_token
        return loss_sum, metrics

    def eval_loss(self, model, batch):
        raise UserError("TRAINING_STAGE=grpo has no validation loss: set VALIDATE_EVERY_X_STEPS=0")


def _metric_name(name: str) -> str:
    """A reward function's name as a metric key: module:function -> function."""
    return name.rsplit(":", 1)[-1].replace(".", "_")


OBJECTIVES: dict[str, type[Objective]] = {
    "pretrain": Pretrain,
    "instruct": SupervisedFineTuning,
    "dpo": DirectPreferenceOptimization,
    "orpo": OddsRatioPreference,
    "simpo": SimplePreference,
    "grpo": GroupRelativePolicyOptimization,
}
# Stages whose objective a setting picks among the entries above: stage -> (cfg group, attribute).
CHOSEN_BY: dict[str, tuple[str, str]] = {
    "dpo": ("dpo", "preference_objective"),
}
# Terms that wrap a stage's objective, in this order, keyed by the setting (cfg group, attribute) whose true /
# non-zero value turns them on.
WRAPPERS: dict[tuple[str, str], type[Objective]] = {
    ("distill", "is_model_distillation"): Distillation,
    ("model", "moe_num_experts"): RouterLosses,
}


def build_objective(cfg: config.Config) -> Objective:
    """The objective for cfg.training.training_stage, wrapped by every enabled term (table lookups)."""
    stage = cfg.training.training_stage
    if stage not in OBJECTIVES:
        raise UserError(f"TRAINING_STAGE={stage!r} has no objective yet: expected one of {', '.join(OBJECTIVES)}")
    choice = CHOSEN_BY.get(stage)
    objective = OBJECTIVES[getattr(getattr(cfg, choice[0]), choice[1]) if choice else stage](cfg)
    for (group, key), wrapper in WRAPPERS.items():
        if getattr(getattr(cfg, group), key):
            if wrapper.requires_language_modeling and not isinstance(objective, LanguageModeling):
                raise UserError(f"{key.upper()}=true combines with pretrain or instruct, not TRAINING_STAGE={stage}")
            objective = wrapper(cfg, objective)  # type: ignore[call-arg]  # a wrapper takes (cfg, base)
    return objective


# ---- CLI: precompute frozen-model outputs ----------------------------------------------------------


def document_attention(cfg: config.Config, batch_format: str) -> dict[str, bool]:
    """What a pretraining teacher's outputs depend on besides the tokens: per-document attention and
    positions (PRETRAIN_DOC_MASKING / PRETRAIN_DOC_RESET_POSITIONS); recorded in a teacher cache's manifest."""
    pretrain = batch_format == "pretrain"
    return {"doc_masking": pretrain and bool(cfg["PRETRAIN_DOC_MASKING"]),
            "doc_reset_positions": pretrain and bool(cfg["PRETRAIN_DOC_MASKING"])
            and bool(cfg["PRETRAIN_DOC_RESET_POSITIONS"])}


def _cache_loader(cfg: config.Config, kind: str, data: str, batch_size: int, tok: tokenizer.Tokenizer,
                  options: dict[str, Any]):
    return dataloaders.build_loader(
        kind, data, "train", seq_len=cfg["MAX_SEQ_LEN"], micro_batch=batch_size, global_batch=batch_size,
        rank=0, world_size=1, seed=cfg["SEED"], pad_id=tok.pad_id,
        packed=kind == "sft" and cfg["SFT_BATCHING"] == "packed", tokenizer_identity=tok.identity(), **options)


def build_cache(kind: str, cfg: config.Config, model_source: str, data: str, out: str, top_k: int = 64,
                batch_size: int = 8, device: str = "cpu") -> dict[str, Any]:
    """Run a frozen model once over one epoch of the train shards (the loader's own samples, world size 1)
    and store its outputs per `sample_index` (see write_cache). Returns the manifest."""
    if kind == "teacher" and cfg["TRAINING_STAGE"] not in ("pretrain", "instruct"):
        raise UserError(f"cache-teacher: TRAINING_STAGE={cfg['TRAINING_STAGE']}; distillation data is pretrain "
                        "or instruct: set TRAINING_STAGE to the stage the cache is for")
    if kind == "teacher" and cfg["TRAINING_STAGE"] == "instruct" and cfg["SFT_BATCHING"] == "packed":
        raise UserError("cache-teacher: SFT_BATCHING=packed rows hold several examples and have no sample_index to "
                        "key a cache by: build and train with SFT_BATCHING=padded")
    dtype = precision.inference_dtype(cfg["TEACHER_PRECISION"], device) if kind == "teacher" else torch.float32
    model, _ = model_utils.load_model(model_source, device=device, dtype=dtype)
    tok = tokenizer.load_tokenizer(cfg["TOKENIZER_CHECKPOINT_PATH"])
    if kind == "teacher" and vocab_size_of(model) != tok.vocab_size:
        raise UserError(f"cache-teacher: the teacher's vocabulary has {vocab_size_of(model)} tokens but the tokenizer "
                        f"{cfg['TOKENIZER_CHECKPOINT_PATH']} has {tok.vocab_size}: use the student's tokenizer")
    objective = None if kind == "reference" else OBJECTIVES[cfg["TRAINING_STAGE"]](cfg)
    batch_format = "dpo" if objective is None else objective.batch_format
    options = {} if objective is None else objective.loader_options(tok)  # the teacher sees the training batches
    loader = _cache_loader(cfg, batch_format, data, batch_size, tok, options)
    n = loader.samples_per_epoch
    batches = (loader.next_batch() for _ in range(2 * ((n + batch_size - 1) // batch_size)))
    meta = {"model": str(model_source), "data": str(data), "batch_format": batch_format, "split": "train",
            "tokenizer": tok.identity(), **document_attention(cfg, batch_format)}
    compute = precision.resolve(cfg["TRAINING_PRECISION"], device).dtype  # what the live teacher / reference runs in
    meta["compute_precision"] = precision.name_of(compute)
    return write_cache(kind, model, batches, n, cfg["MAX_SEQ_LEN"], out, top_k=top_k, device=device, meta=meta,
                       temperature=cfg["DISTILLATION_TEMPERATURE"], compute_dtype=compute)


def main(argv: list[str] | None = None) -> int:
    overrides, rest = config.split_overrides(list(sys.argv[1:] if argv is None else argv))
    p = argparse.ArgumentParser(prog="objectives.py", description="Precompute frozen-model outputs for training.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for cmd, who in (("cache-teacher", "--teacher"), ("cache-reference", "--reference")):
        s = sub.add_parser(cmd, help=f"run {who[2:]} once over the train shards and store its outputs",
                           epilog="Settings (MAX_SEQ_LEN, SEED, TOKENIZER_CHECKPOINT_PATH, TRAINING_STAGE, "
                           "SFT_BATCHING, TEACHER_PRECISION, TRAINING_PRECISION ...) may follow as "
                           "KEY=VALUE.")
        s.add_argument(who, dest="model", required=True, help="any model_utils.load_model source")
        s.add_argument("--data", required=True, help="shard root (the loader's root: train/ val/ manifest.json)")
        s.add_argument("--out", required=True, help="cache directory to write")
        s.add_argument("--batch-size", type=int, default=8)
        s.add_argument("--device", default="cpu")
        s.add_argument("--env-file", default=None, help="settings file (default: ./.env when present)")
        if cmd == "cache-teacher":
            s.add_argument("--top-k", type=int, default=None, help="default: TEACHER_CACHE_TOP_K")
    args = p.parse_args(rest)
    cfg = config.load_config(args.env_file, overrides)
    kind = "teacher" if args.cmd == "cache-teacher" else "reference"
    top_k = getattr(args, "top_k", None) or cfg["TEACHER_CACHE_TOP_K"]
    build_cache(kind, cfg, args.model, args.data, args.out, top_k=top_k, batch_size=args.batch_size,
                device=args.device)
    return 0


if __name__ == "__main__":
    run_cli(main)
