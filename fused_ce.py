"""The LM head and the next-token loss in row chunks, for large vocabularies: no (N, V) logits.

The plain path materializes the logits (N, V) in the compute dtype, an fp32 copy for the softmax, the
fp32 log-softmax for backward and the gradient of the logits: for N = 8192 tokens and V = 128,256 that is
four tensors of 2-4 GB. Here the rows go through the head in chunks of `chunk_size`, each chunk's logits
living only while it is processed. Every position is processed (ignored ones are masked out, not selected),
so no shape depends on the labels' values and nothing waits for the device.

- `fused_linear_cross_entropy_sum`: the summed loss is a scalar, so the gradients w.r.t. the hidden states
  and the weight are computed during the forward (softmax - one_hot is all backward needs) and backward
  only scales them: no matmul is recomputed. What is held from forward to backward is the (V, d) fp32
  weight gradient and the (N, d) hidden gradient instead of the logits, so it saves memory once N exceeds
  about 0.4 d (`fusing_pays`). Under fp16 the per-logit gradient would be rounded to fp16 before a
  GradScaler's scale reaches it: `head_loss` keeps the full logits there.
- `fused_sequence_logps`: per-row sums (DPO, ORPO, SimPO), whose loss is nonlinear in the rows, so the
  per-row weights of the gradient are known only in backward. Forward keeps the hidden states and one
  log-sum-exp per position; backward recomputes each chunk's logits once (one more head matmul) and
  accumulates the weight gradient into ONE fp32 (V, d) buffer, whatever the number of rows. Exact under
  fp16 too (the loss scale reaches the per-logit gradient before its rounding).

`head_loss(hidden, head, labels)` is what `Transformer.forward(tokens, labels=...)` calls: the fused paths
where they apply, else the head's logits and losses.py. Labels are already shifted (IGNORE_INDEX = -100
contributes nothing). Under autocast the matmuls run in the autocast dtype, like nn.Linear would; the
log-sum-exp is always fp32. Equal to the plain path's loss and gradients: tests/test_perf_paths.py.
"""

from __future__ import annotations

import torch
from torch import nn

from losses import IGNORE_INDEX, cross_entropy_sum, sequence_logps


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def _targets(y: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The valid mask of a chunk's targets, and the targets with ignored positions mapped to class 0 (so gather
    / scatter stay in range): masks, not a selection, so nothing waits for the device."""
    valid = y != ignore_index
    return valid, torch.where(valid, y, torch.zeros_like(y))


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, ignore_index: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk: fp32 logits (n, V), log-sum-exp (n,), the target's logit (n,), the valid mask (n,) and the
    targets with ignored positions mapped to class 0 (so gather / scatter stay in range)."""
    logits = (h @ w.t()).float()  # (n, V) fp32
    valid, safe = _targets(y, ignore_index)
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    target = logits.gather(1, safe[:, None]).squeeze(1)
    return logits, lse, target, valid, safe


def _softmax_minus_one_hot_(logits: torch.Tensor, lse: torch.Tensor, safe: torch.Tensor,
                            scale: torch.Tensor) -> torch.Tensor:
    """d(CE)/d(logits) = softmax - one_hot, times a per-row `scale` (0 on ignored rows), in place."""
    g = logits.sub_(lse[:, None]).exp_()
    g.scatter_add_(1, safe[:, None], -torch.ones_like(lse)[:, None])
    return g.mul_(scale[:, None])


def _accumulate(grad_w: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """grad_w (V, d) fp32 += g.T @ h across chunks: in place when g is fp32 (no (V, d) temporary), else through
    one compute-dtype product."""
    if g.dtype == grad_w.dtype:
        grad_w.addmm_(g.t(), h)
    else:
        grad_w.add_(g.t() @ h)


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                chunk_size: int, grad_enabled: bool) -> torch.Tensor:
        dt = _compute_dtype(hidden)
        h = hidden.reshape(-1, hidden.shape[-1]).to(dt)  # (N, d)
        w = weight.to(dt)  # (V, d)
        y = labels.reshape(-1)  # (N,)
        N = h.shape[0]
        # forward runs with grad mode off, so the caller's mode comes in as an argument: no gradient work
        # under torch.no_grad()
        need_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = (torch.zeros(w.shape, dtype=torch.float32, device=w.device)
                  if need_grad and ctx.needs_input_grad[1] else None)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, N, chunk_size):
            hc = h[s:s + chunk_size]
            logits, lse, target, valid, safe = _chunk_logits(hc, w, y[s:s + chunk_size], ignore_index)
            total += torch.where(valid, lse - target, 0.0).sum()
            if need_grad:
                g = _softmax_minus_one_hot_(logits, lse, safe, valid.float()).to(dt)
                grad_h[s:s + chunk_size] = g @ w
                if grad_w is not None:
                    _accumulate(grad_w, g, hc)
            logits = g = None  # freed before the next chunk's logits exist
        ctx.save_for_backward(grad_h if need_grad else None, grad_w)
        ctx.shapes = (hidden.shape, hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        h_shape, h_dtype, w_dtype = ctx.shapes
        gh = gw = None
        if ctx.needs_input_grad[0]:
            gh = (grad_h * grad_out).to(h_dtype).reshape(h_shape)
        if ctx.needs_input_grad[1]:
            gw = (grad_w * grad_out).to(w_dtype)
        return gh, gw, None, None, None, None


def fused_linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   ignore_index: int = IGNORE_INDEX, chunk_size: int = 1024) -> torch.Tensor:
    """Summed next-token CE of logits = hidden @ weight.T without materializing them.

    hidden (B, T, d) or (N, d); weight (V, d) (the output projection, tied or not); labels (B, T) or (N,),
    already shifted. Returns an fp32 scalar; differentiable w.r.t. hidden and weight.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    return _FusedLinearCE.apply(hidden, weight, labels, ignore_index, chunk_size, torch.is_grad_enabled())


class _FusedLinearRowNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                chunk_size: int) -> torch.Tensor:
        R, T, d = hidden.shape
        dt = _compute_dtype(hidden)
        h, w, y = hidden.reshape(-1, d).to(dt), weight.to(dt), labels.reshape(-1)
        nll = torch.empty(R * T, dtype=torch.float32, device=h.device)
        lse_all = torch.empty_like(nll)
        for s in range(0, R * T, chunk_size):
            _, lse, target, valid, _ = _chunk_logits(h[s:s + chunk_size], w, y[s:s + chunk_size], ignore_index)
            nll[s:s + chunk_size] = torch.where(valid, lse - target, 0.0)
            lse_all[s:s + chunk_size] = lse
        # the inputs themselves (no compute-dtype copies) and one fp32 number per position
        ctx.save_for_backward(hidden, weight, labels, lse_all)
        ctx.dt, ctx.ignore_index, ctx.chunk_size = dt, ignore_index, chunk_size
        return nll.view(R, T).sum(-1)  # (R,)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        hidden, weight, labels, lse_all = ctx.saved_tensors
        R, T, d = hidden.shape
        dt, chunk = ctx.dt, ctx.chunk_size
        h, w, y = hidden.reshape(-1, d).to(dt), weight.to(dt), labels.reshape(-1)
        per_position = grad_rows.float()[:, None].expand(R, T).reshape(-1)  # (R*T,) each row's weight
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None  # one buffer
        for s in range(0, R * T, chunk):
            hc, yc = h[s:s + chunk], y[s:s + chunk]
            logits = (hc @ w.t()).float()  # (n, V) recomputed, as in forward
            valid, safe = _targets(yc, ctx.ignore_index)
            g = _softmax_minus_one_hot_(logits, lse_all[s:s + chunk], safe, per_position[s:s + chunk] * valid)
            g = g.to(dt)
            if need_h:
                grad_h[s:s + chunk] = g @ w
            if need_w:
                _accumulate(grad_w, g, hc)
            logits = g = None  # freed before the next chunk's logits exist
        gh = grad_h.to(hidden.dtype).view(R, T, d) if need_h else None
        gw = grad_w.to(weight.dtype) if need_w else None
        return gh, gw, None, None, None


def fused_sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, chunk_size: int = 1024) -> torch.Tensor:
    """losses.sequence_logps without the (R, T, V) logits: log p(response | prompt) per row, (R,) fp32, from
    hidden (R, T, d), the head weight (V, d) and shifted labels (R, T) (ignore_index off the response). The
    gradient is exact for any loss of the rows (backward recomputes the head, see the module docstring)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    return -_FusedLinearRowNLL.apply(hidden, weight, labels, ignore_index, chunk_size)


def fusing_pays(n_tokens: int, dim: int) -> bool:
    """Whether the summed-loss path holds less than the logits would: it keeps the (V, dim) fp32 head gradient
    from forward to backward instead of ~10 bytes per logit (compute-dtype logits, their fp32 copy, the saved
    log-softmax), so it wins from n_tokens >= 0.4 * dim (SmolLM2: 230 tokens; Llama 3 8B: 1639)."""
    return 5 * n_tokens >= 2 * dim


CHUNK_ROWS = 1024  # positions per chunk in head_loss: (1024, V) fp32 logits at a time (0.5 GB at V = 128,256)


def head_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """The LM head and the next-token loss from the final hidden states (B, T, d) and shifted labels (B, T):
    the summed fp32 cross-entropy (a scalar), or with per_row the summed log-probs of each row's targets (B,).

    A plain nn.Linear head goes through the fused paths above; the summed loss keeps the logits when they are
    the smaller thing to hold (fusing_pays) and under fp16 (autocast or fp16 weights: a GradScaler's scale must
    reach the per-logit gradient). Any other head (LoRA) computes its logits and losses.py takes them."""
    if type(head) is nn.Linear:
        w = head.weight
        if per_row:
            return fused_sequence_logps(hidden, w, labels, chunk_size=CHUNK_ROWS)
        dev = hidden.device.type
        fp16 = (torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.float16
                or w.dtype == torch.float16)
        if not fp16 and fusing_pays(labels.numel(), w.shape[1]):
            return fused_linear_cross_entropy_sum(hidden, w, labels, chunk_size=CHUNK_ROWS)
    logits = head(hidden)  # (B, T, V)
    return sequence_logps(logits, labels) if per_row else cross_entropy_sum(logits, labels)
