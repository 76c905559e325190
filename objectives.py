"""Training objectives: batch -> (summed loss, summed metrics). One table entry per stage.

The loop (train.py) never names an objective. For each optimizer step it
  1. draws the step's micro-batches from the loader named by `objective.batch_format`,
  2. sums `objective.units(batch)` over all micro-batches and ranks -> N (target tokens for
     cross-entropy, preference pairs for DPO),
  3. back-propagates `loss_sum / N` for every micro-batch (times world size under DDP/FSDP, which
     average gradients), so the step's loss is normalized by the whole step's count — not a mean of
     micro-batch means (which would over-weight short micro-batches in SFT).
`loss()` therefore returns SUMS over units; metrics are sums too and are divided by N when logged.

Frozen helpers (a distillation teacher, a DPO reference) are built in `setup()`, which must be called
with the UNWRAPPED model, before DDP/FSDP/compile: the DPO reference is a deep copy of that model
(or, under LoRA, the same model with adapters disabled) and is never wrapped in DDP. `setup()`
returns a dict of banner lines ({"teacher_memory_mb": ...}) for the loop to print.

Pure loss functions (DESIGN §3): `sequence_logps`, `dpo_loss`, `distillation_loss` (mean over masked
positions), `distillation_loss_sum`, `topk_distillation_loss_sum`.

CLI (precompute frozen-model outputs once, keyed by the loader's `sample_index`):
    python objectives.py cache-teacher --teacher SRC --data DIR --out DIR --top-k K [--env-file F] [KEY=VALUE ...]
    python objectives.py cache-reference --reference SRC --data DIR --out DIR [--env-file F] [KEY=VALUE ...]
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import lora
from distributed import unwrap
from errors import UserError

IGNORE_INDEX = -100
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---- pure loss functions ----------------------------------------------------------------------------


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half precisions to fp32 for softmax/log-sum-exp; keep fp64 (gradcheck) as it is."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Summed next-token cross-entropy in fp32. logits (B, T, V), labels (B, T) already shifted."""
    return F.cross_entropy(_at_least_fp32(logits.flatten(0, 1)), labels.flatten(), ignore_index=ignore_index,
                           reduction="sum")


def count_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    return int((labels != ignore_index).sum())


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """log p(response | prompt) per row: (B,). logits (B, T, V); labels (B, T) already shifted (logits[:, t]
    predicts labels[:, t]) and `ignore_index` everywhere but response tokens, so prompt and padding add
    exactly 0 (the seed summed over padding). Computed in fp32 even under bf16 autocast."""
    B, T, _ = logits.shape
    nll = F.cross_entropy(_at_least_fp32(logits.flatten(0, 1)), labels.flatten(), ignore_index=ignore_index,
                          reduction="none")  # (B*T,), 0 where ignored
    return -nll.view(B, T).sum(-1)


DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid",
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses (B,) and the implicit rewards beta * log(pi / ref) (B,) (detached).

    With h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l)):
      sigmoid: -(1 - eps) log s(beta h) - eps log s(-beta h)   DPO (Rafailov et al. 2023, eq. 7);
               eps > 0 is conservative DPO (Mitchell 2023, "cDPO"): labels flipped with probability eps
      hinge:   max(0, 1 - beta h)                                SLiC-style hinge (Zhao et al. 2023)
      ipo:     (h - 1 / (2 beta))^2                              IPO (Azar et al. 2023, eq. 17)
    All inputs are the log-probs the caller passes (the DPO objective passes SUMMED response log-probs
    for every type, as the IPO paper defines it; TRL length-averages them for IPO).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise UserError(f"DPO_LOSS_TYPE={loss_type!r}: expected one of {', '.join(DPO_LOSS_TYPES)}")
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)  # (B,)
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * h)
    else:
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def distillation_loss_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                          temperature: float) -> torch.Tensor:
    """T^2 * sum over masked positions of KL(softmax(teacher/T) || softmax(student/T)) (Hinton et al. 2015;
    T^2 keeps the gradient scale independent of T). logits (B, T, V); mask (B, T) bool. fp32 math."""
    s = _at_least_fp32(student_logits[mask]) / temperature  # (N, V), only positions that count
    t = _at_least_fp32(teacher_logits[mask]).to(s.dtype) / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)  # (N,)
    return temperature**2 * kl.sum()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) AVERAGED over masked positions (mean per target token; 0 if none)."""
    n = mask.sum().clamp(min=1)
    return distillation_loss_sum(student_logits, teacher_logits, mask, temperature) / n


def topk_distillation_loss_sum(student_logits: torch.Tensor, teacher_topk_logps: torch.Tensor,
                               teacher_topk_ids: torch.Tensor, mask: torch.Tensor, temperature: float,
                               teacher_tail_logps: torch.Tensor | None = None) -> torch.Tensor:
    """The cached-teacher approximation of `distillation_loss_sum`: T^2 * KL between the two distributions
    coarsened to K + 1 outcomes, the teacher's top-k tokens plus one "tail" bucket holding all other mass:

        KL ~= sum_i p_i log(p_i / q_i) + p_tail log(p_tail / q_tail),  p_tail = 1 - sum_i p_i, q_tail likewise

    with p = softmax(teacher / T), q = softmax(student / T). Exact when K = V; otherwise never above the exact
    KL (log-sum inequality: merging outcomes cannot increase a KL) and missing only p_tail * KL of the two
    distributions inside the tail, small when the teacher is peaked. Unlike renormalizing both over the top-k,
    the student is pushed to move mass out of the tail it over-weights. q_tail is a log-sum-exp over the
    complement of the top-k (exact, no 1 - sum cancellation).

    teacher_topk_logps (B, T, K): log p_i of the TEMPERED teacher, log_softmax(teacher_logits / T) at its top-k
    ids (the same ids as at T = 1: scaling by 1/T keeps the order); teacher_tail_logps (B, T): log p_tail if
    known exactly (the cache stores it), else log(1 - sum p_i) clamped at 0 mass. student_logits (B, T, V) raw.
    """
    s = _at_least_fp32(student_logits[mask]) / temperature  # (N, V), only positions that count
    ids = teacher_topk_ids[mask].long()  # (N, K)
    lse = torch.logsumexp(s, -1)  # (N,)
    log_q = s.gather(-1, ids) - lse[:, None]  # (N, K)
    log_p = teacher_topk_logps[mask].to(s.dtype)  # (N, K)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (N,)
    if ids.shape[-1] < s.shape[-1]:  # a non-empty complement: add the tail bucket
        log_q_tail = torch.logsumexp(s.scatter(-1, ids, float("-inf")), -1) - lse  # (N,)
        if teacher_tail_logps is None:
            p_tail = (1.0 - log_p.exp().sum(-1)).clamp(min=0.0)  # (N,)
            log_p_tail = torch.log(p_tail)
        else:
            log_p_tail = teacher_tail_logps[mask].to(s.dtype)
            p_tail = log_p_tail.exp()
        # 0 * log 0 = 0: a teacher with no tail mass adds nothing (and no NaN through the -inf)
        kl = kl + torch.where(p_tail > 0, p_tail * (log_p_tail.clamp(min=-1e30) - log_q_tail), 0.0)
    return temperature**2 * kl.sum()


# ---- objectives ------------------------------------------------------------------------------------


def _logits(model: nn.Module, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, T, V) from our Transformer or a transformers model (which returns an output object)."""
    if doc_ids is not None:
        if not hasattr(unwrap(model), "layers"):  # a transformers model has no document masking
            raise UserError("packed SFT batches (SFT_BATCHING=packed) need a teacher of this project's "
                            "architecture: load it with model_utils (any source) or use SFT_BATCHING=padded")
        out = model(input_ids, doc_ids=doc_ids)
    else:
        out = model(input_ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def _vocab_size(model: nn.Module) -> int:
    m = unwrap(model)
    args = getattr(m, "args", None) or getattr(m, "config", None)
    return int(args.vocab_size)


def _memory_bytes(model: nn.Module) -> int:
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[id(t)] = t.numel() * t.element_size()  # tied weights counted once
    return sum(seen.values())


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _require_unwrapped(model: nn.Module) -> None:
    if isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        raise RuntimeError("Objective.setup() must receive the unwrapped model, before DDP/FSDP/torch.compile: "
                           "frozen helpers are copies of it and must never be wrapped")


class Objective:
    """Base: a batch format, optional frozen helpers, a loss step."""

    name: str = ""
    batch_format: str = ""  # the dataloader kind: "pretrain" | "sft" | "dpo"

    def __init__(self, cfg: Any = None):
        self.cfg = cfg

    def setup(self, model: nn.Module, tokenizer: Any, device: torch.device) -> dict[str, Any]:
        """Build frozen helpers (teacher, reference) from the UNWRAPPED model, before parallelizing.
        Returns banner facts for the loop to print (empty when there are no helpers)."""
        return {}

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """How many normalizing units (target tokens by default) this micro-batch holds."""
        return count_targets(batch["labels"])

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def eval_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(summed validation loss, units) — the plain cross-entropy for language-model stages."""
        logits = model(batch["input_ids"], doc_ids=batch.get("doc_ids"))
        return cross_entropy_sum(logits, batch["labels"]).detach(), self.units(batch)


def fused_head_weight(model: nn.Module) -> torch.Tensor | None:
    """The output weight when the LM head and the loss can be fused (fused_ce): our Transformer, bare or
    under DDP / torch.compile, with a plain nn.Linear head. None for FSDP2 (fully_shard swaps the root's
    class, and its output weight is a sharded DTensor only the module's own forward gathers), for a
    LoRA-wrapped head and for other models."""
    from model import Transformer

    m = unwrap(model)
    if type(m) is Transformer and type(m.output) is nn.Linear:
        return m.output.weight
    return None


def fused_loss_weight(model: nn.Module, n_tokens: int, device_type: str) -> torch.Tensor | None:
    """fused_head_weight, when fusing also pays and is safe for this micro-batch:
    - memory: the fused path holds the (V, dim) fp32 head gradient from forward to backward instead of
      ~10 bytes per logit (compute-dtype logits, their fp32 copy, the saved log-softmax), so it only wins
      from n_tokens >= 0.4 * dim (SmolLM2: 230 tokens; Llama 3 8B: 1639) and loses below;
    - fp16: the fused path rounds the per-logit gradient to fp16 in the forward, before GradScaler's
      scale reaches it, so small gradients would underflow: fp16 keeps the full logits."""
    weight = fused_head_weight(model)
    if weight is None or 5 * n_tokens < 2 * weight.shape[1]:
        return None
    fp16 = (torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16
            or weight.dtype == torch.float16)
    return None if fp16 else weight


class LanguageModeling(Objective):
    """Next-token cross-entropy on every target whose label is not IGNORE_INDEX.

    Pretraining labels every position; SFT labels only assistant content and its end-of-turn token
    (the loader writes IGNORE_INDEX elsewhere), so the same loss serves both. Where fused_loss_weight
    allows, the model returns hidden states and fused_ce computes head + loss in chunks: the (B, T, V)
    logits, their fp32 copy and their gradient are never materialized (same loss and gradients).
    """

    def loss(self, model, batch):
        labels = batch["labels"]
        weight = fused_loss_weight(model, labels.numel(), labels.device.type)
        if weight is not None:
            from fused_ce import fused_linear_cross_entropy_sum

            h = model(batch["input_ids"], doc_ids=batch.get("doc_ids"), return_hidden=True)  # (B, T, dim)
            loss_sum = fused_linear_cross_entropy_sum(h, weight, batch["labels"])
        else:
            logits = model(batch["input_ids"], doc_ids=batch.get("doc_ids"))  # (B, T, V)
            loss_sum = cross_entropy_sum(logits, batch["labels"])
        return loss_sum, {"ce": loss_sum.detach()}


class Pretrain(LanguageModeling):
    name, batch_format = "pretrain", "pretrain"


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

    def __init__(self, cfg: Any, base: LanguageModeling, teacher: nn.Module | None = None):
        super().__init__(cfg)
        self.base = base
        self.name, self.batch_format = f"{base.name}+distill", base.batch_format
        d = cfg.distill
        self.alpha, self.temperature = float(d.distillation_alpha), float(d.distillation_temperature)
        self.teacher: nn.Module | None = teacher
        self.cache = None
        self.teacher_memory_bytes = 0

    def setup(self, model, tokenizer, device):
        _require_unwrapped(model)
        d = self.cfg.distill
        student_vocab = _vocab_size(model)
        if d.teacher_cache_path:
            if self.base.batch_format == "sft" and self.cfg.data.sft_batching == "packed":
                raise UserError("TEACHER_CACHE_PATH is keyed by sample_index, which packed SFT rows do not have: "
                                "set SFT_BATCHING=padded (for the cache build too) or unset TEACHER_CACHE_PATH")
            from objective_caches import TeacherCache

            self.cache = TeacherCache(d.teacher_cache_path)
            if abs(self.cache.temperature - self.temperature) > 1e-9:
                raise UserError(f"TEACHER_CACHE_PATH={d.teacher_cache_path} holds log-probs at temperature "
                                f"{self.cache.temperature} but DISTILLATION_TEMPERATURE={self.temperature}: rebuild "
                                "the cache with this DISTILLATION_TEMPERATURE or use the cache's")
            teacher_vocab, where = self.cache.vocab_size, f"TEACHER_CACHE_PATH={d.teacher_cache_path}"
            self.teacher_memory_bytes = 0
            info = {"teacher": f"cache {d.teacher_cache_path} (top-{self.cache.top_k})"}
        else:
            dtype = PRECISIONS[d.teacher_precision]
            if self.teacher is None:
                import model_utils

                self.teacher, _ = model_utils.load_model(d.teacher_model_checkpoint, device=device, dtype=dtype)
            else:
                self.teacher.to(device=device, dtype=dtype)
            _freeze(self.teacher)
            teacher_vocab, where = _vocab_size(self.teacher), f"TEACHER_MODEL_CHECKPOINT={d.teacher_model_checkpoint}"
            self.teacher_memory_bytes = _memory_bytes(self.teacher)
            info = {"teacher": d.teacher_model_checkpoint or type(self.teacher).__name__,
                    "teacher_precision": d.teacher_precision}
        if teacher_vocab != student_vocab:
            raise UserError(f"distillation: the teacher's vocabulary has {teacher_vocab} tokens ({where}) but the "
                            f"student's has {student_vocab}: both must use the same tokenizer")
        info["teacher_memory_mb"] = round(self.teacher_memory_bytes / 2**20, 1)
        return info

    def units(self, batch):
        return self.base.units(batch)

    def kd_sum(self, student_logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """alpha-free T^2 * KL summed over target positions, from the live teacher or the cache."""
        mask = batch["labels"] != IGNORE_INDEX  # (B, T)
        if self.cache is not None:
            if "sample_index" not in batch:
                raise UserError("TEACHER_CACHE_PATH is set but the batches carry no 'sample_index' (packed SFT rows "
                                "have none): use SFT_BATCHING=padded, or unset TEACHER_CACHE_PATH to run the teacher live")
            logps, ids, tail = self.cache.lookup(batch["sample_index"], student_logits.device)  # (B,T,K)x2, (B,T)
            if logps.shape[1] != student_logits.shape[1]:
                raise UserError(f"teacher cache rows hold {logps.shape[1]} positions, batches {student_logits.shape[1]}"
                                ": rebuild the cache with the same MAX_SEQ_LEN")
            return topk_distillation_loss_sum(student_logits, logps, ids, mask, self.temperature, tail)
        with torch.no_grad():
            teacher_logits = _logits(self.teacher, batch["input_ids"], batch.get("doc_ids"))
        return distillation_loss_sum(student_logits, teacher_logits, mask, self.temperature)

    def loss(self, model, batch):
        # one fp32 copy of the student logits serves both terms (each would otherwise upcast its own)
        logits = _at_least_fp32(model(batch["input_ids"], doc_ids=batch.get("doc_ids")))  # (B, T, V)
        ce = cross_entropy_sum(logits, batch["labels"])
        kd = self.kd_sum(logits, batch)
        loss_sum = (1.0 - self.alpha) * ce + self.alpha * kd
        return loss_sum, {"ce": ce.detach(), "kd": kd.detach()}

    def eval_loss(self, model, batch):
        return self.base.eval_loss(model, batch)


class DirectPreferenceOptimization(Objective):
    """DPO on (prompt, chosen, rejected) pairs; units = pairs.

    Chosen and rejected go through the policy in ONE concatenated forward (2B rows). The reference is a
    frozen deep copy of the starting model made in setup() (eval, no grad, never in DDP), or — when the
    model carries LoRA adapters — the same model with adapters disabled (no second copy; torchtune's
    trick). With DPO_REFERENCE_LOGPS_PATH the reference log-probs are read by batch["sample_index"].
    """

    name, batch_format = "dpo", "dpo"

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        d = cfg.dpo
        self.beta, self.label_smoothing, self.loss_type = float(d.dpo_beta), float(d.dpo_label_smoothing), d.dpo_loss_type
        self.reference: nn.Module | None = None
        self.base_model: nn.Module | None = None  # the unwrapped policy, for the adapters-off reference pass
        self.ref_cache = None

    def setup(self, model, tokenizer, device):
        _require_unwrapped(model)
        path = self.cfg.dpo.dpo_reference_logps_path
        if path:
            from objective_caches import ReferenceCache

            self.ref_cache = ReferenceCache(path)
            return {"reference": f"precomputed log-probs {path}", "reference_memory_mb": 0.0}
        # LoRA may be applied after setup() (apply_lora swaps modules inside this same object), so the
        # setting decides: the reference is then this model with its adapters switched off.
        if self.cfg.lora.lora_enabled or any(True for _ in lora.lora_modules(model)):
            self.base_model = model
            return {"reference": "policy with LoRA adapters disabled", "reference_memory_mb": 0.0}
        self.reference = _freeze(copy.deepcopy(model))
        return {"reference": "frozen copy of the initial policy",
                "reference_memory_mb": round(_memory_bytes(self.reference) / 2**20, 1)}

    def units(self, batch):
        return int(batch["chosen_input_ids"].shape[0])

    @staticmethod
    def _concat(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # (2B, T)
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])  # (2B, T)
        return ids, labels

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
            return sequence_logps(_logits(self.reference, ids), labels)
        if self.base_model is None:
            raise RuntimeError("DirectPreferenceOptimization.setup() was not called before loss()")
        if not any(True for _ in lora.lora_modules(self.base_model)):
            raise RuntimeError("LORA_ENABLED=true but the model has no adapters: apply_lora must run on the model "
                               "given to setup(); without adapters the policy would be its own reference")
        with lora.disable_lora(self.base_model):
            return sequence_logps(_logits(self.base_model, ids), labels)

    def _forward(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        ids, labels = self._concat(batch)
        B = batch["chosen_input_ids"].shape[0]
        policy = sequence_logps(_logits(model, ids), labels)  # (2B,) fp32
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


OBJECTIVES: dict[str, type[Objective]] = {
    "pretrain": Pretrain,
    "instruct": SupervisedFineTuning,
    "dpo": DirectPreferenceOptimization,
}
# Terms that wrap a stage's objective, keyed by the boolean setting (cfg group, attribute) that turns them on.
WRAPPERS: dict[tuple[str, str], type[Distillation]] = {
    ("distill", "is_model_distillation"): Distillation,
}


def build_objective(cfg: Any) -> Objective:
    """The objective for cfg.training.training_stage, wrapped by every enabled term (table lookups)."""
    stage = cfg.training.training_stage
    if stage not in OBJECTIVES:
        raise UserError(f"TRAINING_STAGE={stage!r} has no objective yet: expected one of {', '.join(OBJECTIVES)}")
    objective = OBJECTIVES[stage](cfg)
    for (group, key), wrapper in WRAPPERS.items():
        if getattr(getattr(cfg, group), key):
            if not isinstance(objective, LanguageModeling):
                raise UserError(f"{key.upper()}=true combines with pretrain or instruct, not TRAINING_STAGE={stage}")
            objective = wrapper(cfg, objective)
    return objective


_CACHE_NAMES = ("CACHE_FORMAT", "TeacherCache", "ReferenceCache", "build_cache", "write_cache", "main")


def __getattr__(name: str) -> Any:
    """The cache code lives in objective_caches.py (imported on first use: it imports this module)."""
    if name in _CACHE_NAMES:
        import objective_caches

        return getattr(objective_caches, name)
    raise AttributeError(f"module 'objectives' has no attribute {name!r}")


if __name__ == "__main__":
    from errors import run_cli
    from objective_caches import main

    run_cli(main)
