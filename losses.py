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
    rows: tuple[torch.Tensor, ...] = (teacher_topk_logps, teacher_topk_ids, mask)
    if teacher_tail_logps is not None:
        rows = (*rows, teacher_tail_logps)
    fn = _topk_kl_rows(temperature, teacher_tail_logps is not None)
    return temperature**2 * row_chunked_sum(fn, student_logits, *rows)


# ---- GRPO: group-relative advantages and the clipped-ratio policy loss ------------------------------------------
# Shapes: per-token log-probs of the sampled completion tokens (B, L), right-padded; mask (B, L) True / 1 on
# completion tokens; advantages (B,), one per completion. A generation batch holds P prompts x G completions,
# the G completions of a prompt next to each other.
#
# TRL 1.16's GRPOConfig defaults, for comparison: loss_type="dapo", beta=0.0 (no reference model),
# epsilon=0.2, epsilon_high=None (= epsilon), scale_rewards="group", use_bias_correction_kl=True,
# num_generations=8, num_iterations=1. The functions below compute what its GRPOTrainer computes for these
# settings (token-level importance sampling, sum-then-normalize reward aggregation, no vLLM correction, no
# entropy masking or bonus, no two-sided `delta` clip).

GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
GRPO_SCALE_REWARDS = ("group", "batch", "none")
GRPO_STD_EPS = 1e-4  # added to the std before dividing, as TRL does


def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected std over the non-NaN entries (NaN where fewer than two)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True) if dim is not None else torch.nanmean(x)
    count = (~torch.isnan(x)).sum(dim=dim) if dim is not None else (~torch.isnan(x)).sum()
    sq = torch.nanmean((x - mean) ** 2, dim=dim) if dim is not None else torch.nanmean((x - mean) ** 2)
    var = torch.where(count > 1, sq * count / (count - 1).clamp(min=1), torch.full_like(sq, float("nan")))
    return var.sqrt()


def group_advantages(rewards: torch.Tensor, num_generations: int, scale: str = "group",
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-relative advantages of a generation batch (Shao et al. 2024, GRPO outcome supervision):

        A_i = (r_i - mean(r of i's group)) / (std + 1e-4)

    rewards (N,) with N = prompts x num_generations, groups contiguous; the WHOLE generation batch (gathered
    over ranks: the group statistics and the batch std are exact only over all of it). std is Bessel-corrected
    (n - 1); scale: "group" = std of the sample's group, "batch" = std of all N rewards (Hu et al. 2025,
    REINFORCE++ / "PPO Lite"), "none" = no division (Liu et al. 2025, Dr. GRPO). A NaN reward (no reward
    function judged that sample) is left out of the mean and std, and its advantage is 0; a group with a single
    judged sample has NaN std and advantages 0 (TRL's `nanstd` and `nan_to_num`).

    -> (advantages (N,), std (N,): the std each sample was scaled by, the group's for "none" (logging),
        zero_std (N,) bool: that std is 0, i.e. every judged sample of the group had the same reward)."""
    if scale not in GRPO_SCALE_REWARDS:
        raise ValueError(f"scale={scale!r}: expected one of {', '.join(GRPO_SCALE_REWARDS)}")
    n = rewards.numel()
    if num_generations < 1 or n % num_generations:
        raise ValueError(f"{n} rewards do not split into groups of {num_generations}")
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale == "batch":
        std = _nanstd(rewards).expand_as(rewards) if n > 1 else torch.zeros_like(rewards)
    elif num_generations > 1:
        std = _nanstd(grouped, dim=1).repeat_interleave(num_generations)
    else:
        std = torch.zeros_like(rewards)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + GRPO_STD_EPS)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(advantages, nan=0.0), std, zero_std


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              loss_type: str, epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
              ref_logps: torch.Tensor | None = None, use_bias_correction_kl: bool = True,
              max_completion_length: int | None = None, num_sequences: int | torch.Tensor | None = None,
              num_tokens: int | torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO policy loss of a batch of completions -> (loss [], token sums for the metrics).

    Per completion token t of completion i, with the ratio rho = exp(logp - old_logp):

        l_it = -min(rho A_i, clip(rho, 1 - epsilon, 1 + epsilon_high) A_i) + beta KL_it
        KL_it = exp(ref - logp) - (ref - logp) - 1      (k3 estimator of KL(pi || ref), Schulman 2020)
        KL_it *= rho                                      when use_bias_correction_kl (TRL's option,
                                                          DeepSeek-V3.2: the unbiased reverse-KL gradient)

    epsilon_high None = epsilon (DAPO's "clip-higher" sets it above epsilon). The token losses are aggregated
    by `loss_type` (|o_i| = completion i's tokens, N = num_sequences, T = num_tokens):
      grpo:    1/N sum_i 1/|o_i| sum_t l_it    (Shao et al. 2024: each completion's token mean, then their mean)
      dapo:    1/T sum_i sum_t l_it            (Yu et al. 2025, DAPO: token-level, T = the completion tokens
                                                of the whole generation batch)
      dr_grpo: 1/(N L_max) sum_i sum_t l_it    (Liu et al. 2025, Dr. GRPO: a constant, L_max =
                                                max_completion_length)
    N defaults to this batch's rows B and T to this batch's completion tokens: then the result is TRL's loss
    for the batch in one process without accumulation. A caller that splits a generation batch into
    micro-batches or over ranks passes the totals (T summed over ranks before the first backward) and sums
    the returned losses (TRL instead divides each micro-batch's grpo / dr_grpo loss by the accumulation steps:
    the same when every micro-batch holds equally many completions). Under DDP / FSDP2, which average
    gradients over ranks, the sum over ranks is the whole batch's loss only once each rank's loss is scaled by
    the world size, as the loop does for its other summed losses. old_logps are constants (detached here); with old_logps == logps.detach() the ratio
    is exactly 1 and the loss is the plain policy gradient -A_i logp_it (the clip is inactive).

    The metrics are sums over this batch's completion tokens ("tokens" is their count): "clip_low" (rho <
    1 - epsilon with A < 0), "clip_high" (rho > 1 + epsilon_high with A > 0), "clip_region" (either), and
    "kl" (the KL term above, rho-weighted if corrected) when beta != 0; divide by the tokens for means.

    TRL 1.16's GRPOConfig defaults: loss_type "dapo", beta 0.0, epsilon 0.2, epsilon_high = epsilon,
    use_bias_correction_kl True (loss_type has no default here: the caller's setting chooses it)."""
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {', '.join(GRPO_LOSS_TYPES)}")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta != 0 needs ref_logps")
    eps_low, eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    keep = mask.bool()
    fmask = keep.to(logps.dtype)
    # Padding positions may hold anything (even non-finite values): zero them before any arithmetic so that
    # neither the loss nor its gradient sees them.
    logps = torch.where(keep, logps, 0.0)
    old = torch.where(keep, old_logps.detach().to(logps.dtype), 0.0)
    adv = advantages.detach().to(logps.dtype).unsqueeze(1)  # (B, 1)
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    metrics: dict[str, torch.Tensor] = {}
    if beta != 0.0:
        assert ref_logps is not None  # refused above
        ref = torch.where(keep, ref_logps.detach().to(logps.dtype), 0.0)
        kl = torch.exp(ref - logps) - (ref - logps) - 1
        if use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + beta * kl
        metrics["kl"] = (kl.detach() * fmask).sum()
    per_token = per_token * fmask
    rows = logps.shape[0] if num_sequences is None else num_sequences
    if loss_type == "grpo":
        loss = (per_token.sum(-1) / fmask.sum(-1).clamp(min=1.0)).sum() / rows
    elif loss_type == "dr_grpo":
        assert max_completion_length is not None  # refused above
        loss = per_token.sum() / (rows * max_completion_length)
    else:
        tokens = fmask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=logps.dtype)
        loss = per_token.sum() / tokens.clamp(min=1.0)
    r = ratio.detach()
    low = (r < 1 - eps_low) & (adv < 0) & keep
    high = (r > 1 + eps_high) & (adv > 0) & keep
    metrics.update(tokens=fmask.sum().detach(), clip_low=low.sum().to(logps.dtype),
                   clip_high=high.sum().to(logps.dtype), clip_region=(low | high).sum().to(logps.dtype))
    return loss, metrics
