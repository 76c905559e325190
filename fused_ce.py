"""Chunked, fused output projection + cross-entropy for large vocabularies.

The plain path materializes the logits (N, V) in the compute dtype, an fp32 copy for the softmax, the
fp32 log-softmax for backward and the gradient of the logits: for N = 1024 tokens and V = 49152 that is
four tensors of 100-200 MB. Here the rows are processed in chunks and, because the loss is a scalar,
the gradients w.r.t. the hidden states and the output weight are computed during the forward pass
(softmax - one_hot is all backward needs); backward only scales them by the incoming gradient. No
matmul is recomputed; what is held from forward to backward is the (V, d) fp32 weight gradient and the
(N, d) hidden gradient instead of the logits, so it saves memory once N (tokens) exceeds about 0.4 d
(objectives.fused_loss_weight applies that rule). Under fp16 the per-logit gradient is rounded to fp16
before a loss scale could reach it: use the full logits with fp16 + GradScaler. Without grad mode only
the loss is computed.

    loss_sum = fused_linear_cross_entropy_sum(hidden, model.output.weight, labels)

with hidden = model(tokens, return_hidden=True) (B, T, dim) and labels (B, T) already shifted
(IGNORE_INDEX = -100 contributes nothing). Equals objectives.cross_entropy_sum(model(tokens), labels):
same summed fp32 loss and the same gradients (tests/test_perf_paths.py). Under autocast the matmuls
run in the autocast dtype, like nn.Linear would; the log-sum-exp is always fp32.
"""

from __future__ import annotations

import torch

from losses import IGNORE_INDEX


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


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
            hc, yc = h[s:s + chunk_size], y[s:s + chunk_size]
            logits = (hc @ w.t()).float()  # (n, V) fp32
            valid = yc != ignore_index
            safe = torch.where(valid, yc, torch.zeros_like(yc))
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            target = logits.gather(1, safe[:, None]).squeeze(1)
            total += ((lse - target) * valid).sum()
            if need_grad:
                # d(sum CE)/d logits = softmax - one_hot on valid rows, 0 on ignored rows (in place: no copy)
                g = logits.sub_(lse[:, None]).exp_()
                g.scatter_add_(1, safe[:, None], -torch.ones_like(target)[:, None])
                g.mul_(valid[:, None])
                g = g.to(dt)
                grad_h[s:s + chunk_size] = g @ w
                if grad_w is not None:
                    grad_w.add_(g.t() @ hc)  # (V, d), accumulated in fp32 across chunks
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
    # only positions with a target go through the head (SFT prompts, DPO prompts and padding skip it)
    valid = labels.reshape(-1) != ignore_index  # (N,)
    h = hidden.reshape(-1, hidden.shape[-1])[valid]  # (n, d)
    return _FusedLinearCE.apply(h, weight, labels.reshape(-1)[valid], ignore_index, chunk_size,
                                torch.is_grad_enabled())


def fused_sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """losses.sequence_logps without the (R, T, V) logits: log p(response | prompt) per row, (R,) fp32, from
    hidden (R, T, d), the head weight (V, d) and shifted labels (R, T) (ignore_index off the response). One
    fused CE per row (a scalar each, so its gradient stays exact for a loss that is nonlinear in the rows)."""
    return -torch.stack([fused_linear_cross_entropy_sum(hidden[r], weight, labels[r], ignore_index)
                         for r in range(hidden.shape[0])])
