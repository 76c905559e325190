"""Mixture-of-Experts SwiGLU feed-forward with Mixtral's top-k routing, and its router losses.

Routing (Mixtral, arXiv:2401.04088): router logits = gate(x); probabilities = softmax over ALL experts (fp32);
each token goes to its top-k experts with those k probabilities renormalized to sum to 1; the output is the
weighted sum of the k experts' SwiGLU outputs (plus an always-on shared expert when configured, as in
DeepSeekMoE). Parameter names follow Mixtral's reference: `feed_forward.gate` is the router, the experts'
weights are stacked per expert: `feed_forward.experts.w1` / `w3` (E, hidden, dim) and `w2` (E, dim, hidden).

Capacity: with capacity_factor c > 0 each expert takes at most ceil(c * tokens * k / E) assignments per
training forward (in train mode; eval and generation never drop, like Mixtral at inference); first choices are served before second choices (slot-major priority), and within a slot earlier
tokens first. A dropped assignment contributes nothing (the residual stream carries the token); in the grouped
path it still goes through its expert's GEMM with routing weight 0, so no shape depends on the routing and
nothing waits for the device. c = 0 is no-drop (Mixtral).

Two numerically equivalent paths:
- "grouped" (training): the (token, slot) assignments are sorted by expert and each projection is ONE grouped
  GEMM over the expert groups (torch._grouped_mm where the device/dtype supports it, else one batched matmul
  over the groups padded to the largest).
- "dense": every expert runs on every token and a (tokens, E) combine matrix zeroes the unselected ones: slow,
  obviously correct, the reference the tests hold the grouped path to.

Router losses are computed from the router logits each MoE layer keeps from its last forward with gradients
enabled (not under torch.no_grad, so a frozen reference or an eval pass never replaces them):
- load balancing (Switch Transformer eq. 4-6, as transformers' Mixtral computes it): statistics pooled over
  every MoE layer's tokens, E * sum_e f_e * P_e with f_e the fraction of top-k assignments and P_e the mean
  router probability of expert e; it is nonlinear in the batch, so it is defined per forward (micro-batch);
- router z-loss (ST-MoE, arXiv:2202.08906 eq. 5): mean over tokens and layers of logsumexp(logits)^2.
Expert parallelism is not implemented: every rank holds every expert.
"""

from __future__ import annotations

import math
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from losses import at_least_fp32


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits (N, E) -> (weights (N, k) in at least fp32, renormalized over the k; experts (N, k) long)."""
    probs = torch.softmax(at_least_fp32(logits), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), experts


def capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int | None:
    """Assignments one expert may take in a forward of n_tokens tokens; None = no limit (no-drop)."""
    if capacity_factor <= 0:
        return None
    return math.ceil(capacity_factor * n_tokens * top_k / n_experts)


def expert_counts(expert: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Assignments per expert (E,) long of expert ids (M,): torch.bincount's counts with a fixed output size
    (bincount reads the largest id on the host first, a device sync)."""
    return torch.zeros(n_experts, dtype=torch.long, device=expert.device).index_add_(
        0, expert, torch.ones_like(expert))


def _as_compute(x: torch.Tensor, *ws: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, cast to its dtype (torch._grouped_mm has no autocast rule); else unchanged."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return tuple(t.to(dt) for t in (x, *ws))
    return (x, *ws)


@cache
def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs forward and backward for this device type and dtype (probed once)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a = torch.ones(4, 8, device=device_type, dtype=dtype, requires_grad=True)
        b = torch.ones(2, 8, 8, device=device_type, dtype=dtype, requires_grad=True)
        offs = torch.tensor([2, 4], device=device_type, dtype=torch.int32)
        out = torch._grouped_mm(a, b, offs=offs)
        torch.autograd.grad(out, (a, b), torch.ones_like(out))
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, use_grouped_mm: bool) -> torch.Tensor:
    """x (M, K) holding the rows of expert 0, then expert 1, ... (counts (E,) rows each); w (E, K, N) ->
    (M, N) where each row is multiplied by its expert's matrix. One kernel, no per-expert loop."""
    if use_grouped_mm:
        offs = torch.cumsum(counts, 0).to(torch.int32)
        return torch._grouped_mm(x, w, offs=offs)
    # batched fallback: scatter the groups into (E, C, K) padded to the largest group, one bmm, gather back.
    # The largest group's size is read on the host: a device sync, on devices without torch._grouped_mm only.
    E, C = w.shape[0], int(counts.max()) if counts.numel() else 0
    starts = torch.cumsum(counts, 0) - counts
    expert_of_row = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=x.shape[0])  # (M,)
    slot = torch.arange(x.shape[0], device=x.device) - starts[expert_of_row]  # (M,) position in its group
    padded = x.new_zeros(E, C, x.shape[1])
    padded[expert_of_row, slot] = x
    return torch.bmm(padded, w)[expert_of_row, slot]  # (M, N)


class GroupedExperts(nn.Module):
    """E SwiGLU experts with their weights stacked: w1, w3 (E, hidden, dim), w2 (E, dim, hidden)."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))  # gate
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))  # down
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))  # up
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert as nn.Linear initializes its weight: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), so the model is
        usable as built, like its other layers (Transformer.init_weights replaces it for training). On the meta
        device this draws nothing."""
        for w in (self.w1, self.w2, self.w3):
            bound = 1 / math.sqrt(w.shape[-1])  # (E, out, in): fan_in is the last dim
            nn.init.uniform_(w, -bound, bound)

    def grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, dim) sorted by expert, counts (E,) -> (M, dim): three grouped GEMMs."""
        x, w1, w2, w3 = _as_compute(x, self.w1, self.w2, self.w3)
        use = grouped_mm_supported(x.device.type, x.dtype)
        gate = grouped_matmul(x, w1.transpose(1, 2), counts, use)  # (M, hidden)
        up = grouped_matmul(x, w3.transpose(1, 2), counts, use)
        return grouped_matmul(F.silu(gate) * up, w2.transpose(1, 2), counts, use)  # (M, dim)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, dim) -> (N, E, dim): every expert on every token (the reference path)."""
        h = F.silu(torch.einsum("nd,ehd->neh", x, self.w1)) * torch.einsum("nd,ehd->neh", x, self.w3)
        return torch.einsum("neh,edh->ned", h, self.w2)


class MoEFeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, n_experts: int, top_k: int, capacity_factor: float = 0.0,
                 shared_expert: nn.Module | None = None, impl: str = "auto"):
        super().__init__()
        _compile_dispatch_eagerly()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"experts per token {top_k} must be between 1 and the number of experts {n_experts}")
        if impl not in ("auto", "grouped", "dense"):
            raise ValueError(f"moe impl {impl!r}; expected auto, grouped or dense")
        self.n_experts, self.top_k, self.capacity_factor, self.impl = n_experts, top_k, capacity_factor, impl
        self.gate = nn.Linear(dim, n_experts, bias=False)  # the router
        self.experts = GroupedExperts(n_experts, dim, hidden_dim)
        self.shared_expert = shared_expert
        # from the last forward with gradients enabled (see router_losses / expert_load)
        self.router_logits: torch.Tensor | None = None  # (N, E), in the graph
        self.assignments: torch.Tensor | None = None  # (N, k) expert ids, detached
        self.dropped: torch.Tensor | None = None  # () dropped assignments, detached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)  # (N, D)
        logits = self.gate(flat)  # (N, E)
        weights, experts = route(logits, self.top_k)  # (N, k) each
        # capacity is a training-time rule: inference (eval, generation, exports) never drops a token
        cap = capacity(B * T, self.top_k, self.n_experts, self.capacity_factor) if self.training else None
        if self.impl == "dense":
            y, kept = self._dense(flat, weights, experts, cap)
        else:
            y, kept = self._grouped(flat, weights, experts, cap)
        if torch.is_grad_enabled():
            self.router_logits, self.assignments = logits, experts.detach()
            self.dropped = (experts.numel() - kept).detach()
        y = y.view(B, T, D)
        if self.shared_expert is not None:
            y = y + self.shared_expert(x)
        return y

    # Eager under torch.compile (_compile_dispatch_eagerly): the sort, the capacity cut and the group sizes are
    # data-dependent shapes, and dynamo's meta kernel of torch._grouped_mm accepts bf16 only (torch 2.13); the
    # block's other ops compile.
    def _grouped(self, flat, weights, experts, cap):
        """Sort the N*k assignments (slot-major) by expert, grouped GEMMs, scatter-add. Every shape is fixed by
        N and k (nothing waits for the device): an assignment past its expert's capacity stays in its group
        with routing weight 0, so it adds nothing and receives no gradient."""
        N, k = experts.shape
        expert = experts.t().reshape(-1)  # (k*N,) slot-major: every first choice, then every second ...
        token = torch.arange(N, device=flat.device).repeat(k)  # (k*N,)
        weight = weights.t().reshape(-1)
        order = torch.argsort(expert, stable=True)  # grouped by expert, priority order kept inside a group
        counts = expert_counts(expert, self.n_experts)  # (E,)
        w = weight[order, None]  # (k*N, 1) fp32 routing weight, as Mixtral
        kept = counts.sum()
        if cap is not None:
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(order.numel(), device=flat.device) - starts[expert[order]]
            w = torch.where((rank < cap)[:, None], w, 0.0)
            kept = counts.clamp(max=cap).sum()
        out = self.experts.grouped(flat[token[order]], counts) * w  # (k*N, D)
        y = torch.zeros_like(flat).index_add_(0, token[order], out.to(flat.dtype))
        return y, kept

    def _dense(self, flat, weights, experts, cap):
        """Reference: the (N, E) combine matrix from a cumulative count of assignments per expert."""
        N, k = experts.shape
        onehot = F.one_hot(experts.t().reshape(-1), self.n_experts)  # (k*N, E) slot-major
        if cap is not None:
            rank_in_expert = (onehot.cumsum(0) * onehot).sum(-1) - 1  # (k*N,)
            onehot = onehot * (rank_in_expert < cap)[:, None]
        combine = (onehot.view(k, N, -1) * weights.t()[:, :, None]).sum(0)  # (N, E) fp32
        y = torch.einsum("ne,ned->nd", combine, self.experts.dense(flat).to(combine.dtype))
        return y.to(flat.dtype), onehot.sum()


def _compile_dispatch_eagerly() -> None:
    """Mark MoEFeedForward's token dispatch (_grouped, _dense) to run eagerly under torch.compile. Done when the
    first MoE layer is built rather than at import: torch.compiler.disable loads torch._dynamo, about 1 s of
    every process's start, which dense models never need."""
    if not getattr(MoEFeedForward, "_dispatch_eager", False):
        MoEFeedForward._grouped = torch.compiler.disable(MoEFeedForward._grouped)
        MoEFeedForward._dense = torch.compiler.disable(MoEFeedForward._dense)
        MoEFeedForward._dispatch_eager = True


# ---- router losses and statistics over a model's MoE layers -----------------------------------------


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """E * sum_e f_e * P_e over the tokens of all layers pooled (Switch eq. 4-6, transformers' Mixtral):
    f_e = fraction of the top-k assignments that went to e (a count: no gradient), P_e = mean softmax
    probability of e (the gradient path). Equals k (experts per token) when perfectly balanced."""
    logits = at_least_fp32(torch.cat(router_logits))  # (L*N, E)
    E = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)
    _, selected = torch.topk(probs, top_k, dim=-1)
    f = torch.zeros(E, device=logits.device, dtype=logits.dtype).index_add_(
        0, selected.reshape(-1), logits.new_ones(selected.numel())) / logits.shape[0]
    return E * (f * probs.mean(0)).sum()


def router_z_loss(router_logits: list[torch.Tensor]) -> torch.Tensor:
    """ST-MoE's z-loss: mean over tokens (all layers) of logsumexp(router logits)^2."""
    return at_least_fp32(torch.cat(router_logits)).logsumexp(-1).square().mean()


def router_losses(model: nn.Module, top_k: int) -> dict[str, torch.Tensor]:
    """{"lb": load balancing, "z": z-loss} from the last forward with gradients of every MoE layer."""
    logits = [m.router_logits for m in moe_layers(model)]
    if not logits or any(t is None for t in logits):
        raise RuntimeError("router_losses: no MoE layer kept router logits; call it after a forward with "
                           "gradients enabled on a model with MOE_NUM_EXPERTS > 0")
    return {"lb": load_balancing_loss(logits, top_k), "z": router_z_loss(logits)}


def set_routing(model: nn.Module, capacity_factor: float, impl: str) -> None:
    """Apply the run's routing settings (not part of the weights) to every MoE layer of a loaded model."""
    for m in moe_layers(model):
        m.capacity_factor, m.impl = capacity_factor, impl


def forget_routing(model: nn.Module) -> None:
    """Drop every MoE layer's kept router state (and with it the graph it references)."""
    for m in moe_layers(model):
        m.router_logits = m.assignments = m.dropped = None


def expert_load(model: nn.Module) -> dict[str, torch.Tensor]:
    """Utilization from the last forward with gradients: max_load = the busiest expert's share of its layer's
    assignments times E (1 = perfectly even, E = one expert takes everything), worst layer; min_load the same
    for the idlest expert (0 = an expert received nothing); dropped = fraction of assignments over capacity."""
    layers = [m for m in moe_layers(model) if m.assignments is not None]
    if not layers:
        return {}
    shares = torch.stack([expert_counts(m.assignments.reshape(-1), m.n_experts).float()
                          / m.assignments.numel() * m.n_experts for m in layers])  # (L, E)
    dropped = sum(m.dropped.float() for m in layers) / sum(m.assignments.numel() for m in layers)
    return {"max_load": shares.max(), "min_load": shares.min(), "dropped": dropped}
