"""The GRPO building blocks of losses.py against TRL 1.16's GRPOTrainer, whose own code computes the reference
numbers: `_compute_loss` runs on a trainer made with `object.__new__` (only the attributes it reads are set,
and its per-token log-prob method returns the hand-made tensors), and the advantage block of
`_generate_and_score_completions` is executed from TRL's source on the same rewards. All in fp64, on batches
with uneven completion lengths, padding and zero-std groups; plus the published formulas on one hand-computed
case."""

from __future__ import annotations

import inspect
import math
import os
import textwrap
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from losses import GRPO_LOSS_TYPES, group_advantages, grpo_loss

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

F64 = torch.float64


# ---- TRL's code as the reference --------------------------------------------------------------------------


def _trl_trainer(loss_type: str, *, beta: float, epsilon: float, epsilon_high: float | None,
                 use_bias_correction_kl: bool, max_completion_length: int, logps: torch.Tensor):
    from trl.trainer.grpo_trainer import GRPOTrainer

    t = object.__new__(GRPOTrainer)
    t.loss_type, t.beta = loss_type, beta
    t.epsilon_low, t.epsilon_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    t.args = SimpleNamespace(use_bias_correction_kl=use_bias_correction_kl, delta=None, steps_per_generation=1)
    t.max_completion_length = max_completion_length
    t.importance_sampling_level, t.top_entropy_quantile, t.off_policy_mask_threshold = "token", 1.0, None
    t.use_vllm, t.aux_loss_enabled, t._entropy_bonus_enabled = False, False, False
    t.current_gradient_accumulation_steps = 1
    t.model = SimpleNamespace(training=True)
    t.accelerator = SimpleNamespace(num_processes=1, reduce=lambda x, reduction: x, gather=lambda x: x)
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    return t


def trl_loss(loss_type, logps, old, ref, mask, adv, *, beta, epsilon=0.2, epsilon_high=None,
             use_bias_correction_kl=True, max_completion_length=None):
    B, L = logps.shape
    t = _trl_trainer(loss_type, beta=beta, epsilon=epsilon, epsilon_high=epsilon_high,
                     use_bias_correction_kl=use_bias_correction_kl,
                     max_completion_length=max_completion_length or L, logps=logps)
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, L, dtype=torch.long), "completion_mask": mask.to(F64),
              "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": mask.to(F64).sum()}
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    loss = t._compute_loss(None, inputs)
    return loss, {k: v[-1] for k, v in t._metrics["train"].items()}


def _trl_advantage_block() -> str:
    """The lines of GRPOTrainer._generate_and_score_completions from the unscorable mask to nan_to_num."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    src = inspect.getsource(GRPOTrainer._generate_and_score_completions).splitlines()
    start = next(i for i, s in enumerate(src) if s.strip().startswith("unscorable_mask = torch.isnan(rewards_per_func)"))
    end = next(i for i, s in enumerate(src) if s.strip() == "advantages = torch.nan_to_num(advantages, nan=0.0)")
    return textwrap.dedent("\n".join(src[start:end + 1]))


def trl_advantages(rewards_per_func: torch.Tensor, weights: torch.Tensor, num_generations: int, scale: str):
    import trl.trainer.grpo_trainer as g

    self = SimpleNamespace(multi_objective_aggregation="sum_then_normalize", reward_weights=weights,
                           scale_rewards=scale)
    scope = {"self": self, "rewards_per_func": rewards_per_func, "device": rewards_per_func.device,
             "num_generations": num_generations}
    # TRL's nanstd divides integer counts (count / (count - 1)): that quotient takes the default dtype,
    # so fp64 here keeps the whole reference in fp64
    default = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        exec(compile(_trl_advantage_block(), "trl_grpo_advantages", "exec"), vars(g).copy(), scope)
    finally:
        torch.set_default_dtype(default)
    return scope["advantages"], scope["std_rewards"], scope["is_std_zero"]


# ---- hand-made batches --------------------------------------------------------------------------------------


def batch(seed: int = 0, lengths=(5, 1, 3, 6, 2, 4), L: int = 6, spread: float = 0.4):
    """Uneven completion lengths, right padding holding arbitrary (finite) values, log-probs around old ones
    so some ratios leave the clip range on both sides."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    old = -torch.rand(B, L, generator=g, dtype=F64) * 3
    logps = old + (torch.rand(B, L, generator=g, dtype=F64) - 0.5) * 2 * spread
    ref = old + (torch.rand(B, L, generator=g, dtype=F64) - 0.5) * 2 * spread
    adv = torch.randn(B, generator=g, dtype=F64)
    adv[2] = 0.0
    return logps, old, ref, mask, adv


CASES = [  # loss type, beta, epsilon, epsilon_high, bias-corrected KL
    *((lt, 0.0, 0.2, None, True) for lt in GRPO_LOSS_TYPES),
    *((lt, 0.04, 0.2, 0.28, True) for lt in GRPO_LOSS_TYPES),
    *((lt, 0.04, 0.1, None, False) for lt in GRPO_LOSS_TYPES),
]


@pytest.mark.parametrize("loss_type,beta,eps,eps_high,corrected", CASES)
def test_loss_and_gradient_equal_trl(loss_type, beta, eps, eps_high, corrected):
    logps, old, ref, mask, adv = batch()
    kw = dict(beta=beta, epsilon=eps, epsilon_high=eps_high, use_bias_correction_kl=corrected)
    theirs_in = logps.clone().requires_grad_()
    want, metrics = trl_loss(loss_type, theirs_in, old, ref, mask, adv, max_completion_length=8, **kw)
    want.backward()
    ours_in = logps.clone().requires_grad_()
    got, m = grpo_loss(ours_in, old, adv, mask, loss_type=loss_type, ref_logps=ref, max_completion_length=8, **kw)
    got.backward()
    assert got.dtype == F64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-12, atol=1e-14)
    n = m["tokens"]
    for ours, theirs in (("clip_low", "clip_ratio/low_mean"), ("clip_high", "clip_ratio/high_mean"),
                         ("clip_region", "clip_ratio/region_mean")):
        assert (m[ours] / n).item() == pytest.approx(metrics[theirs], rel=1e-12, abs=1e-15), ours
    if beta:
        assert (m["kl"] / n).item() == pytest.approx(metrics["kl"], rel=1e-12)
    else:
        assert "kl" not in m and "kl" not in metrics


def test_the_batches_exercise_both_clips():
    logps, old, ref, mask, adv = batch()
    _, m = grpo_loss(logps, old, adv, mask, loss_type="dapo")
    assert m["clip_low"] > 0 and m["clip_high"] > 0 and m["clip_region"] < m["tokens"]


def test_padding_values_do_not_matter_even_non_finite():
    logps, old, ref, mask, adv = batch(seed=3)
    for lt in GRPO_LOSS_TYPES:
        a = logps.clone().requires_grad_()
        la, _ = grpo_loss(a, old, adv, mask, loss_type=lt, beta=0.1, ref_logps=ref, max_completion_length=6)
        la.backward()
        junk = lambda x: torch.where(mask, x, torch.tensor([float("nan"), -float("inf"), 50.0] * 2, dtype=F64)[:, None])  # noqa: E731
        b = junk(logps).requires_grad_()
        lb, _ = grpo_loss(b, junk(old), adv, mask, loss_type=lt, beta=0.1, ref_logps=junk(ref),
                          max_completion_length=6)
        lb.backward()
        torch.testing.assert_close(lb, la, rtol=0, atol=0)
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0)


def test_split_batch_with_global_counts_sums_to_the_whole_batch_loss():
    """Micro-batches (or ranks) given the generation batch's totals add up to the one-batch loss."""
    logps, old, ref, mask, adv = batch(seed=5)
    for lt in GRPO_LOSS_TYPES:
        kw = dict(loss_type=lt, beta=0.05, ref_logps=None, max_completion_length=6)
        whole, _ = grpo_loss(logps, old, adv, mask, **{**kw, "ref_logps": ref})
        parts = sum(grpo_loss(logps[s], old[s], adv[s], mask[s], **{**kw, "ref_logps": ref[s]},
                              num_sequences=logps.shape[0], num_tokens=mask.sum())[0]
                    for s in (slice(0, 2), slice(2, 3), slice(3, 6)))
        torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-14)


def test_ratio_is_one_and_clip_inactive_when_logps_equal_old():
    logps, _, _, mask, adv = batch(seed=7)
    adv = adv * 100  # far outside any clip range if the ratio moved
    x = logps.clone().requires_grad_()
    loss, m = grpo_loss(x, x.detach(), adv, mask, loss_type="dapo", epsilon=0.2)
    loss.backward()
    assert m["clip_region"] == 0
    # ratio exactly 1: the loss is -mean A over tokens and the gradient is the plain policy gradient -A_i / T
    fmask = mask.to(F64)
    torch.testing.assert_close(loss, -(adv[:, None] * fmask).sum() / fmask.sum(), rtol=1e-15, atol=0)
    torch.testing.assert_close(x.grad, -adv[:, None] * fmask / fmask.sum(), rtol=1e-15, atol=0)


# ---- the published formulas, by hand -------------------------------------------------------------------------


def test_hand_computed_case():
    """Two completions: o_1 has 2 tokens, o_2 has 1 (+1 pad); eps 0.2, eps_high 0.3, beta 0.5, k3 without
    correction. Ratios: o_1 tokens e^0.5 = 1.648721 (clipped to 1.3, A = +1: min(1.648721, 1.3) = 1.3) and
    e^-0.1 = 0.904837 (inside: 0.904837); o_2 token e^-0.5 = 0.606531 with A = -2: min(-1.213061, -0.8 * 2 =
    -1.6) = -1.6, so loss +1.6.
    k3 with d = ref - logp: o_1 d = -0.5 -> e^-0.5 + 0.5 - 1 = 0.106531; d = 0.1 -> e^0.1 - 0.1 - 1 =
    0.005171; o_2 d = 0.2 -> e^0.2 - 0.2 - 1 = 0.021403.
    Token losses: -1.3 + 0.5 * 0.106531 = -1.246735; -0.904837 + 0.5 * 0.005171 = -0.902252;
    1.6 + 0.5 * 0.021403 = 1.610701."""
    logps = torch.tensor([[-1.0, -2.0], [-1.5, 7.0]], dtype=F64)
    old = torch.tensor([[-1.5, -1.9], [-1.0, 0.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.9], [-1.3, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([1.0, -2.0], dtype=F64)
    t = [-1.3 + 0.5 * (math.exp(-0.5) + 0.5 - 1), -math.exp(-0.1) + 0.5 * (math.exp(0.1) - 0.1 - 1),
         1.6 + 0.5 * (math.exp(0.2) - 0.2 - 1)]
    assert t == pytest.approx([-1.246735, -0.902252, 1.610701], abs=1e-6)
    want = {"grpo": ((t[0] + t[1]) / 2 + t[2]) / 2, "dapo": sum(t) / 3, "dr_grpo": sum(t) / (2 * 4)}
    for lt, w in want.items():
        loss, m = grpo_loss(logps, old, adv, mask, loss_type=lt, epsilon=0.2, epsilon_high=0.3, beta=0.5,
                            ref_logps=ref, use_bias_correction_kl=False, max_completion_length=4)
        assert loss.item() == pytest.approx(w, rel=1e-12), lt
        assert (m["clip_high"].item(), m["clip_low"].item(), m["tokens"].item()) == (1, 1, 3)


def test_hand_computed_advantages():
    # group (1, 0, 0, 1): mean 0.5, Bessel std sqrt(4 * 0.25 / 3) = 0.577350; group (2, 2, 2, 2): std 0 -> A = 0
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=F64)
    adv, std, zero = group_advantages(r, 4)
    s = math.sqrt(1 / 3)
    want = [0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.5 / (s + 1e-4), 0, 0, 0, 0]
    assert adv.tolist() == pytest.approx(want, rel=1e-12)
    assert zero.tolist() == [False] * 4 + [True] * 4
    adv, _, _ = group_advantages(r, 4, "none")
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]


# ---- advantages against TRL ----------------------------------------------------------------------------------


def _rewards(seed: int) -> torch.Tensor:
    """(prompts x G, 2 functions): a zero-std group, a group with one judged sample, an unscorable sample."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(0, 3, (16, 2), generator=g).to(F64)
    r[0:4] = torch.tensor([1.0, 0.5], dtype=F64)  # zero std
    r[4:8, 0] = torch.nan  # the first function skips a whole group
    r[8:12, :] = torch.nan
    r[9, 1] = 2.0  # one judged sample: NaN std
    r[13, :] = torch.nan  # an unscorable sample in a normal group
    return r


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("seed", [0, 1])
def test_advantages_equal_trl(scale, seed):
    from rewards import combine

    per_func = _rewards(seed)
    weights = torch.tensor([1.0, 0.5], dtype=F64)
    want, want_std, want_zero = trl_advantages(per_func, weights, 4, scale)
    total = combine(per_func, weights)
    got, std, zero = group_advantages(total, 4, scale)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(std, want_std, rtol=1e-12, atol=0, equal_nan=True)
    assert zero.tolist() == want_zero.tolist()
    assert (got[:4] == 0).all() and (got[8:12] == 0).all() and got[13] == 0  # zero std, one judged, unscorable
    assert zero[:4].all() == (scale != "batch")


def test_advantages_refuse_bad_groups_and_modes():
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(8), 3)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(8), 4, "global")
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), loss_type="bnpo")
