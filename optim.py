"""Optimizers and learning-rate schedules: per-parameter policies as tables, schedules as pure functions.

Weight decay policy: decoupled decay on every parameter with >= 2 dimensions — the attention/MLP
matrices, the output projection AND the token embedding — and none on 1-D tensors (RMSNorm gains).
Embeddings are decayed as in GPT-2 / nanoGPT / llm.c: with tied embeddings the table *is* the output
projection, which everyone decays, and splitting one tensor between two policies is impossible; keeping
the rule "matrices decay, gains don't" makes tied and untied models train alike. Gains are excluded
because decaying a multiplicative scale towards 0 fights the normalization it belongs to.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"): SGD-momentum (Nesterov) whose update
for a 2-D hidden matrix is replaced by the nearest semi-orthogonal matrix, computed with a quintic
Newton–Schulz iteration in bf16. It is meant for hidden matrices only: embeddings, the output head and
gains use AdamW, with their own learning rate (MAX_LR) — two param-group families, one schedule shape.

Schedules are pure functions of the step (resumable by construction: no scheduler object state beyond
the step, which trainer_state.json records).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

# ---- schedules ---------------------------------------------------------------------------------------


def cosine_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from max_lr/warmup to max_lr over warmup_steps, then cosine to min_lr at total_steps
    (as in nanoGPT / llm.c); min_lr after total_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def wsd_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int,
           decay_fraction: float = 0.2) -> float:
    """Warmup-stable-decay (Hu et al. 2024, MiniCPM): linear warmup, constant max_lr, then a linear decay
    to min_lr over the last decay_fraction of the steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    decay_steps = int(round(decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return max_lr
    if step >= total_steps:
        return min_lr
    progress = (step - decay_start) / max(1, decay_steps)
    return max_lr + progress * (min_lr - max_lr)


def constant_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup, then max_lr forever."""
    return max_lr * (step + 1) / warmup_steps if step < warmup_steps else max_lr


def lr_at(step: int, cfg: Any, total_steps: int, max_lr: float | None = None, min_lr: float | None = None,
          warmup_steps: int | None = None) -> float:
    """The configured schedule (LR_SCHEDULE) at `step`; overrides let Muon groups use their own range."""
    t = cfg.training
    max_lr = t.max_lr if max_lr is None else max_lr
    min_lr = t.min_lr if min_lr is None else min_lr
    warmup = t.warmup_steps if warmup_steps is None else warmup_steps
    if t.lr_schedule == "wsd":
        return wsd_lr(step, max_lr, min_lr, warmup, total_steps, t.wsd_decay_fraction)
    return SCHEDULES[t.lr_schedule](step, max_lr, min_lr, warmup, total_steps)


SCHEDULES = {"cosine": cosine_lr, "wsd": wsd_lr, "constant": constant_lr}


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: Any, total_steps: int) -> float:
    """Write each group's lr for `step` (groups carry their own max/min/warmup); returns the AdamW lr."""
    main_lr = lr_at(step, cfg, total_steps)
    for g in optimizer.param_groups:
        g["lr"] = lr_at(step, cfg, total_steps, g.get("max_lr"), g.get("min_lr"), g.get("warmup_steps"))
    return main_lr


# ---- Muon ----------------------------------------------------------------------------------------------


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate U V^T of g = U S V^T (g 2-D) with the quintic iteration X <- aX + (bA + cA^2)X,
    A = X X^T, coefficients (3.4445, -4.7750, 2.0315) chosen so singular values land in ~[0.7, 1.2]
    after 5 steps (Jordan et al. 2024). Runs in bf16 like the reference; returns g's dtype."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    transposed = x.size(0) > x.size(1)
    if transposed:  # iterate on the wide orientation: A is the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    if transposed:
        x = x.T
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    """One optimizer, two families (like the reference MuonWithAuxAdam): groups with kind="muon" (2-D hidden
    matrices) get Nesterov momentum, orthogonalized per matrix and scaled by sqrt(max(1, rows/cols)) so
    every matrix gets a similar RMS update; groups with kind="adamw" (embeddings, head, gains) get AdamW.
    One object keeps `state_dict()` in the standard format, so checkpointing treats it like any optimizer.

    FSDP2 (DTensor) parameters: the orthogonalization needs the whole matrix, so the update is gathered
    (full_tensor), orthogonalized redundantly on every rank and the local shard is sliced back out."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, betas=betas,
                                      eps=eps, ns_steps=ns_steps, kind="muon"))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                if g["weight_decay"]:
                    p.mul_(1 - g["lr"] * g["weight_decay"])
                if g["kind"] == "muon":
                    self._muon_update(p, g)
                else:
                    self._adamw_update(p, g)
        return loss

    def _muon_update(self, p: torch.Tensor, g: dict) -> None:
        if p.ndim != 2:
            raise ValueError(f"Muon got a {p.ndim}-D parameter; give it 2-D matrices only")
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - g["momentum"])  # buf = m*buf + (1-m)*grad
        update = p.grad.lerp(buf, g["momentum"])  # Nesterov: look ahead along the momentum
        rows, cols = p.shape
        p.add_(_orthogonalize(update, g["ns_steps"]), alpha=-g["lr"] * max(1.0, rows / cols) ** 0.5)

    def _adamw_update(self, p: torch.Tensor, g: dict) -> None:
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        b1, b2 = g["betas"]
        state["step"] += 1
        t = float(state["step"])
        state["exp_avg"].lerp_(p.grad, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(g["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-g["lr"] / (1 - b1**t))


def _orthogonalize(update: torch.Tensor, steps: int) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(update, DTensor):
        full = newton_schulz(update.full_tensor(), steps)
        # every rank holds the same `full`: slice the local shard without communication
        return distribute_tensor(full, update.device_mesh, update.placements, src_data_rank=None)
    return newton_schulz(update, steps)


# ---- building --------------------------------------------------------------------------------------------


def _is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """Muon's domain: 2-D weights inside the transformer blocks (not embeddings, output head or gains)."""
    return p.ndim == 2 and ".layers." in f".{name}"


def param_groups(model: nn.Module, cfg: Any) -> list[dict]:
    """Trainable parameters split by policy (a table, not an if-ladder per optimizer):
    decay (>= 2-D), no_decay (1-D), and for Muon a third family of hidden matrices."""
    t = cfg.training
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # LoRA: adapters only
    muon = t.optimizer == "muon"
    hidden = [p for n, p in named if muon and _is_hidden_matrix(n, p)]
    hidden_ids = {id(p) for p in hidden}
    decay = [p for n, p in named if p.ndim >= 2 and id(p) not in hidden_ids]
    no_decay = [p for n, p in named if p.ndim < 2]
    groups = [dict(params=decay, weight_decay=t.weight_decay, kind="adamw"),
              dict(params=no_decay, weight_decay=0.0, kind="adamw")]
    if muon:
        warm = t.muon_warmup_steps if t.muon_warmup_steps >= 0 else t.warmup_steps
        groups.append(dict(params=hidden, weight_decay=t.muon_weight_decay, kind="muon", max_lr=t.muon_max_lr,
                           min_lr=t.muon_min_lr, warmup_steps=warm))
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: Any, device: torch.device) -> torch.optim.Optimizer:
    """OPTIMIZER=adamw | sgd | muon over the model's trainable parameters (call after wrapping, so FSDP2
    DTensor parameters are the ones optimized). Muon returns one object stepping both families."""
    t = cfg.training
    groups = param_groups(model, cfg)
    if t.optimizer == "sgd":
        return torch.optim.SGD([{k: v for k, v in g.items() if k != "kind"} for g in groups], lr=t.max_lr,
                               momentum=t.sgd_momentum)
    if t.optimizer == "muon":
        return Muon(groups, lr=t.muon_max_lr, momentum=t.muon_momentum, betas=tuple(t.adamw_betas),
                    eps=t.adamw_eps)
    # fused AdamW exists for CUDA and CPU in torch >= 2.4; it is numerically the same algorithm
    fused = bool(t.adamw_use_fused) and device.type in ("cuda", "cpu")
    return torch.optim.AdamW([{k: v for k, v in g.items() if k != "kind"} for g in groups], lr=t.max_lr,
                             betas=tuple(t.adamw_betas), eps=t.adamw_eps, fused=fused or None)
