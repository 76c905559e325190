"""Pure loss functions of logits / log-probs (no model, no settings): next-token cross-entropy, sequence
log-probs, DPO and its variants, the reference-free preference losses (ORPO, SimPO), knowledge distillation (exact and top-k cached). All reduce in fp32 (fp64 stays).
Labels are already shifted (logits[:, t] predicts labels[:, t]); IGNORE_INDEX marks positions that do not count.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half precisions to fp32 for softmax/log-sum-exp; keep fp64 (gradcheck) as it is."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Summed next-token cross-entropy in fp32. logits (B, T, V), labels (B, T) already shifted."""
    return F.cross_entropy(at_least_fp32(logits.flatten(0, 1)), labels.flatten(), ignore_index=ignore_index,
                           reduction="sum")


def count_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    return int((labels != ignore_index).sum())


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """log p(response | prompt) per row: (B,). logits (B, T, V); labels (B, T) already shifted (logits[:, t]
    predicts labels[:, t]) and `ignore_index` everywhere but response tokens, so prompt and padding add
    exactly 0 (padding never counts). Computed in fp32 even under bf16 autocast."""
    B, T, _ = logits.shape
    nll = F.cross_entropy(at_least_fp32(logits.flatten(0, 1)), labels.flatten(), ignore_index=ignore_index,
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
        raise ValueError(f"DPO_LOSS_TYPE={loss_type!r}: expected one of {', '.join(DPO_LOSS_TYPES)}")
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


def response_lengths(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Target tokens per row (B,) of shifted labels: |y| of each response."""
    return (labels != ignore_index).sum(-1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0 without cancellation (Maechler 2012: expm1 near 0, log1p below -ln 2)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, lam: float,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair ORPO losses (B,), their NLL term (B,) and the log odds ratio (B,) (detached); Hong et al.
    2024, eqs. 2-7. Inputs are LENGTH-NORMALIZED log-probs, mean log p per response token, so that
    P(y|x) = exp(chosen_logps) is the per-token geometric mean the paper's odds use:

        odds(y|x) = P / (1 - P),   log OR = log odds(y_w|x) - log odds(y_l|x)
        loss = -log P(y_w|x) + lam * -log sigmoid(log OR)

    The first term is the SFT loss on the chosen response (mean NLL per response token of that pair). A
    response the model already predicts with P = 1 in floating point (mean log-prob exactly 0) has infinite
    odds and a NaN gradient through log(1 - P): log-probs enter the odds at most at -1e-6 (P < 1 - 1e-6).
    """
    c, r = chosen_logps.clamp(max=-1e-6), rejected_logps.clamp(max=-1e-6)
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))  # (B,)
    nll = -chosen_logps
    losses = nll - lam * F.logsigmoid(log_odds)
    return losses, nll.detach(), log_odds.detach()


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float, gamma: float,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair SimPO losses (B,) and the rewards beta * mean log p (B,) (detached); Meng et al. 2024, eq. 6:

        loss = -log sigmoid(beta / |y_w| log pi(y_w|x) - beta / |y_l| log pi(y_l|x) - gamma)

    Inputs are LENGTH-NORMALIZED log-probs (log pi(y|x) / |y|); no reference model, gamma is the target
    reward margin."""
    chosen_rewards, rejected_rewards = beta * chosen_logps, beta * rejected_logps
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


# ---- distillation: row-chunked, masked (no boolean indexing, no full-size fp32 copies) ------------------------
# The KD terms read every position and zero the ones the mask excludes (a boolean selection would have a
# data-dependent shape: a host sync on CUDA). The rows go through in chunks of about CHUNK_ELEMENTS logits:
# the fp32 upcast, the softmaxes and their products exist for one chunk at a time, and backward recomputes a
# chunk's terms to write its gradient into the one (N, V) gradient autograd would hand back anyway.

CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MB in fp32 (130 rows at V = 128,256)


class _RowChunkedSum(torch.autograd.Function):
    """sum over rows of fn(logit rows (n, V), *row tensors (n, ...)) -> fp32 scalar; differentiable w.r.t.
    the logits only. Keeps the inputs, nothing else, from forward to backward."""

    @staticmethod
    def forward(ctx, fn, rows_per_chunk: int, logits: torch.Tensor, *rows: torch.Tensor) -> torch.Tensor:
        x = logits.reshape(-1, logits.shape[-1])  # (N, V)
        rs = [r.reshape(x.shape[0], *r.shape[logits.ndim - 1:]) for r in rows]  # (N, ...) each
        total = torch.zeros((), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
        for s in range(0, x.shape[0], rows_per_chunk):
            total += fn(x[s:s + rows_per_chunk], *(r[s:s + rows_per_chunk] for r in rs))
        ctx.save_for_backward(logits, *rows)
        ctx.fn, ctx.rows_per_chunk = fn, rows_per_chunk
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, *rows = ctx.saved_tensors
        x = logits.reshape(-1, logits.shape[-1])
        rs = [r.reshape(x.shape[0], *r.shape[logits.ndim - 1:]) for r in rows]
        grad = torch.empty_like(x)
        n = ctx.rows_per_chunk
        for s in range(0, x.shape[0], n):
            xc = x[s:s + n].detach().requires_grad_()
            with torch.enable_grad():
                out = ctx.fn(xc, *(r[s:s + n] for r in rs))
            grad[s:s + n] = torch.autograd.grad(out, xc, grad_out)[0]
        return None, None, grad.view_as(logits), *(None for _ in rows)


def row_chunked_sum(fn, logits: torch.Tensor, *rows: torch.Tensor) -> torch.Tensor:
    """fn summed over the rows of logits (..., V), computed a chunk of rows at a time (see _RowChunkedSum);
    rows are tensors whose leading dims match the logits' (e.g. a (B, T) mask for (B, T, V) logits)."""
    return _RowChunkedSum.apply(fn, max(1, CHUNK_ELEMENTS // logits.shape[-1]), logits, *rows)


def _ce_rows(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    return F.cross_entropy(at_least_fp32(logits), labels, ignore_index=ignore_index, reduction="sum")


def chunked_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """cross_entropy_sum without an fp32 copy or log-softmax of the whole (B, T, V) logits (row chunks)."""
    return row_chunked_sum(_ce_rows, logits, labels)


def _kl_rows(temperature: float):
    def kl(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        s = at_least_fp32(s) / temperature  # (n, V)
        t = at_least_fp32(t).to(s.dtype) / temperature
        rows = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
        return torch.where(mask, rows, 0.0).sum()
    return kl


def distillation_loss_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                          temperature: float) -> torch.Tensor:
    """T^2 * sum over masked positions of KL(softmax(teacher/T) || softmax(student/T)) (Hinton et al. 2015;
    T^2 keeps the gradient scale independent of T). logits (B, T, V); mask (B, T) bool. fp32 math."""
    return temperature**2 * row_chunked_sum(_kl_rows(temperature), student_logits, teacher_logits, mask)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) AVERAGED over masked positions (mean per target token; 0 if none)."""
    n = mask.sum().clamp(min=1)
    return distillation_loss_sum(student_logits, teacher_logits, mask, temperature) / n


def _topk_kl_rows(temperature: float, has_tail: bool):
    def kl_rows(s: torch.Tensor, log_p: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                log_p_tail: torch.Tensor | None = None) -> torch.Tensor:
        s = at_least_fp32(s) / temperature  # (n, V)
        ids = ids.long()
        lse = torch.logsumexp(s, -1)  # (n,)
        log_q = s.gather(-1, ids) - lse[:, None]  # (n, K)
        log_p = log_p.to(s.dtype)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (n,)
        if ids.shape[-1] < s.shape[-1]:  # a non-empty complement: add the tail bucket
            log_q_tail = torch.logsumexp(s.scatter(-1, ids, float("-inf")), -1) - lse  # (n,)
            if log_p_tail is None:
                p_tail = (1.0 - log_p.exp().sum(-1)).clamp(min=0.0)  # (n,)
                log_p_tail = torch.log(p_tail)
            else:
                log_p_tail = log_p_tail.to(s.dtype)
                p_tail = log_p_tail.exp()
            # 0 * log 0 = 0: a teacher with no tail mass adds nothing (and no NaN through the -inf)
            kl = kl + torch.where(p_tail > 0, p_tail * (log_p_tail.clamp(min=-1e30) - log_q_tail), 0.0)
        return torch.where(mask, kl, 0.0).sum()

    if has_tail:
        return kl_rows
    return lambda s, log_p, ids, mask: kl_rows(s, log_p, ids, mask)


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
    rows = (teacher_topk_logps, teacher_topk_ids, mask)
    if teacher_tail_logps is not None:
        rows = (*rows, teacher_tail_logps)
    fn = _topk_kl_rows(temperature, teacher_tail_logps is not None)
    return temperature**2 * row_chunked_sum(fn, student_logits, *rows)
