"""Loss functions and objectives against formulas written out independently here (float64, per element)."""

from __future__ import annotations

import math

import helpers
import pytest
import torch
import torch.nn.functional as F

import config
import lora
import objectives as obj
from errors import UserError
from model import ModelArgs, Transformer
from objective_caches import concat_pairs

# ---- independent references (plain Python math, one element at a time) -------------------------------


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def ref_dpo(pc, pr, rc, rr, beta, eps, loss_type):
    out = []
    for a, b, c, d in zip(pc, pr, rc, rr, strict=True):
        h = (a - b) - (c - d)
        if loss_type == "sigmoid":  # Rafailov et al. eq. 7; cDPO mixes in the flipped label with weight eps
            out.append(-(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h))
        elif loss_type == "hinge":
            out.append(max(0.0, 1 - beta * h))
        else:  # IPO eq. 17
            out.append((h - 1 / (2 * beta)) ** 2)
    return out


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _tempered_pairs(student, teacher, mask, T):
    """(student probs, teacher probs) at temperature T for every masked (b, t), as Python lists."""
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if mask[b, t]:
                yield (_softmax([x / T for x in student[b, t].tolist()]),
                       _softmax([x / T for x in teacher[b, t].tolist()]))


def ref_kl_sum(student, teacher, mask, T):
    """T^2 * sum over masked (b, t) of sum_v p_t log(p_t / p_s), softmax at temperature T."""
    total = sum(sum(q * math.log(q / p) for q, p in zip(pt, ps, strict=True))
                for ps, pt in _tempered_pairs(student, teacher, mask, T))
    return T * T * total


def tiny_model(seed: int = 0, vocab: int = 32) -> Transformer:
    return helpers.tiny_model(seed, std=0.2, global_seed=True, dim=32, multiple_of=16, vocab_size=vocab,
                              max_seq_len=16, rope_theta=10000.0)


def dpo_batch(B: int = 3, T: int = 10, vocab: int = 32, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for side in ("chosen", "rejected"):
        ids = torch.randint(0, vocab, (B, T), generator=g)
        labels = torch.full((B, T), -100)
        for b in range(B):  # prompt of 3 tokens, response of a row-dependent length, then padding
            end = 5 + b + (side == "rejected")
            labels[b, 2:end - 1] = ids[b, 3:end]  # shifted: position t predicts token t + 1
            ids[b, end:] = 0
        batch[f"{side}_input_ids"], batch[f"{side}_labels"] = ids, labels
    return batch


def cfg_for(**kv) -> config.Config:
    return config.load_config(None, {k: str(v) for k, v in kv.items()})


# ---- dpo_loss ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.3), ("hinge", 0.0),
                                           ("ipo", 0.0)])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_matches_formulas(loss_type, eps, beta):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16, generator=g, dtype=torch.float64) * 8 - 40 for _ in range(4))
    losses, cr, rj = obj.dpo_loss(pc, pr, rc, rr, beta, label_smoothing=eps, loss_type=loss_type)
    want = ref_dpo(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), beta, eps, loss_type)
    assert losses.shape == (16,)
    torch.testing.assert_close(losses, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cr, beta * (pc - rc))
    torch.testing.assert_close(rj, beta * (pr - rr))
    assert not cr.requires_grad and not rj.requires_grad


def test_dpo_loss_at_reference_is_log2_with_zero_rewards():
    lp = torch.tensor([-12.5, -3.0, -40.0], requires_grad=True)
    lr = torch.tensor([-11.0, -9.0, -1.0], requires_grad=True)
    losses, cr, rj = obj.dpo_loss(lp, lr, lp.detach(), lr.detach(), beta=0.1)
    torch.testing.assert_close(losses, torch.full((3,), math.log(2)))
    assert cr.abs().max() == 0 and rj.abs().max() == 0
    # the gradient pushes chosen up and rejected down, each by beta * sigmoid(0) = beta / 2
    losses.sum().backward()
    torch.testing.assert_close(lp.grad, torch.full((3,), -0.05))
    torch.testing.assert_close(lr.grad, torch.full((3,), 0.05))


def test_dpo_loss_rejects_unknown_type():
    x = torch.zeros(2)
    with pytest.raises(UserError, match="DPO_LOSS_TYPE"):
        obj.dpo_loss(x, x, x, x, 0.1, loss_type="kto")


# ---- sequence_logps ------------------------------------------------------------------------------------


def test_sequence_logps_sums_response_tokens_only_in_fp32():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.tensor([[-100, -100, 3, 7, -100, -100], [-100, 1, 2, 3, 4, -100]])
    got = obj.sequence_logps(logits, labels)
    want = []
    for b in range(2):
        s = 0.0
        for t in range(6):
            if labels[b, t] != -100:
                p = _softmax(logits[b, t].double().tolist())
                s += math.log(p[labels[b, t]])
        want.append(s)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=1e-6, atol=1e-5)
    # prompt and padding positions cannot matter
    noisy = logits.clone()
    noisy[labels == -100] += 100 * torch.randn_like(noisy[labels == -100])
    torch.testing.assert_close(obj.sequence_logps(noisy, labels), got)
    # bf16 logits are upcast: the result is fp32
    assert obj.sequence_logps(logits.bfloat16(), labels).dtype == torch.float32


# ---- distillation --------------------------------------------------------------------------------------


def test_distillation_matches_formula_and_reduction():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g) * 3, torch.randn(2, 5, 7, generator=g) * 3
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    for T in (1.0, 2.0, 0.5):
        want = ref_kl_sum(s, t, mask, T)
        got_sum = obj.distillation_loss_sum(s, t, mask, T)
        assert got_sum.item() == pytest.approx(want, rel=1e-5)
        # the public loss is the mean over masked positions
        assert obj.distillation_loss(s, t, mask, T).item() == pytest.approx(want / 7, rel=1e-5)


def test_distillation_zero_when_student_equals_teacher():
    x = torch.randn(3, 4, 50) * 5
    mask = torch.ones(3, 4, dtype=torch.bool)
    assert obj.distillation_loss(x, x.clone(), mask, 2.0).abs().item() < 1e-6
    vals, ids = F.log_softmax(x / 2.0, -1).topk(8, -1)  # the tempered teacher's top 8
    assert obj.topk_distillation_loss_sum(x, vals, ids, mask, 2.0).abs().item() < 1e-5


def test_distillation_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda x: obj.distillation_loss(x, t, mask, 2.0), (s,))
    ids = t.topk(3, -1).indices
    lt = F.log_softmax(t / 1.5, -1)
    tl, tail = lt.gather(-1, ids), torch.logsumexp(lt.scatter(-1, ids, float("-inf")), -1)
    assert torch.autograd.gradcheck(lambda x: obj.topk_distillation_loss_sum(x, tl, ids, mask, 1.5), (s,))
    assert torch.autograd.gradcheck(lambda x: obj.topk_distillation_loss_sum(x, tl, ids, mask, 1.5, tail), (s,))
    ids6 = t.topk(6, -1).indices  # k = V: no tail bucket, still a clean gradient
    assert torch.autograd.gradcheck(
        lambda x: obj.topk_distillation_loss_sum(x, lt.gather(-1, ids6), ids6, mask, 1.5), (s,))
    # masked-out positions get exactly zero gradient
    obj.distillation_loss(s, t, mask, 2.0).backward()
    assert s.grad[~mask].abs().max() == 0 and s.grad[mask].abs().max() > 0


def ref_topk_tail_kl_sum(student, teacher, mask, T, k):
    """T^2 * sum over masked positions of the KL between teacher and student coarsened to the teacher's top-k
    tokens plus one bucket for everything else (plain Python, from the full tempered softmaxes)."""
    total = 0.0
    for ps, pt in _tempered_pairs(student, teacher, mask, T):
        top = sorted(range(len(pt)), key=lambda i: -pt[i])[:k]
        total += sum(pt[i] * math.log(pt[i] / ps[i]) for i in top)
        rest_t = sum(v for i, v in enumerate(pt) if i not in top)
        rest_s = sum(v for i, v in enumerate(ps) if i not in top)
        if rest_t > 0:
            total += rest_t * math.log(rest_t / rest_s)
    return T * T * total


def _tempered_topk(t: torch.Tensor, k: int, T: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lt = F.log_softmax(t.double() / T, -1)
    vals, ids = lt.topk(k, -1)
    return vals, ids, torch.logsumexp(lt.scatter(-1, ids, float("-inf")), -1)


@pytest.mark.parametrize("T", [1.0, 2.0, 0.7])
def test_topk_tail_distillation_exact_at_k_equal_vocab_and_a_lower_bound_below(T):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 9, generator=g, dtype=torch.float64) * 2, torch.randn(2, 3, 9, generator=g,
                                                                                  dtype=torch.float64) * 2
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    exact = ref_kl_sum(s, t, mask, T)
    vals, ids, _ = _tempered_topk(t, 9, T)
    assert obj.topk_distillation_loss_sum(s, vals, ids, mask, T).item() == pytest.approx(exact, rel=1e-10)
    for k in (1, 3, 6):
        vals, ids, tail = _tempered_topk(t, k, T)
        want = ref_topk_tail_kl_sum(s, t, mask, T, k)
        got = obj.topk_distillation_loss_sum(s, vals, ids, mask, T, tail).item()
        assert got == pytest.approx(want, rel=1e-9) and got <= exact + 1e-12
        # without the stored tail it is recovered as 1 - sum p_i (same value up to rounding)
        assert obj.topk_distillation_loss_sum(s, vals, ids, mask, T).item() == pytest.approx(want, rel=1e-8)


def test_topk_tail_distillation_is_close_for_a_peaked_teacher_unlike_renormalizing():
    g = torch.Generator().manual_seed(1)
    V, k = 200, 8
    s = torch.randn(4, 6, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(4, 6, V, generator=g, dtype=torch.float64)
    t[..., :4] += 9.0  # a peaked teacher: ~95% of its mass on four tokens, the rest spread thin
    mask = torch.ones(4, 6, dtype=torch.bool)
    exact = ref_kl_sum(s, t, mask, 1.0)
    vals, ids, tail = _tempered_topk(t, k, 1.0)
    got = obj.topk_distillation_loss_sum(s, vals, ids, mask, 1.0, tail).item()
    assert got <= exact and got > 0.97 * exact
    # renormalizing both over the top-k (the former approximation) drops the student's tail mass entirely
    renorm = ref_kl_sum(s.gather(-1, ids), t.gather(-1, ids), mask, 1.0)
    assert abs(renorm - exact) > 5 * abs(got - exact)


# ---- DPO objective --------------------------------------------------------------------------------------


def test_dpo_objective_starts_at_log2_with_frozen_copy_reference():
    model, batch = tiny_model(), dpo_batch()
    o = obj.build_objective(cfg_for(TRAINING_STAGE="dpo", DPO_BETA=0.2))
    assert isinstance(o, obj.DirectPreferenceOptimization) and o.batch_format == "dpo"
    info = o.setup(model, None, torch.device("cpu"))
    assert info["reference_memory_mb"] > 0
    assert o.reference is not model and not any(p.requires_grad for p in o.reference.parameters())
    assert not o.reference.training and o.units(batch) == 3
    loss, m = o.loss(model, batch)
    assert loss.item() == pytest.approx(3 * math.log(2), rel=1e-6)
    assert m["rewards_chosen"].abs().item() < 1e-6 and m["reward_margin"].abs().item() < 1e-6
    # policy log-probs come from ONE concatenated forward and equal separate forwards
    want_c = obj.sequence_logps(model(batch["chosen_input_ids"]), batch["chosen_labels"]).sum()
    assert m["logps_chosen"].item() == pytest.approx(want_c.item(), rel=1e-5)
    # an optimizer step moves the policy, never the reference
    ref_before = [p.clone() for p in o.reference.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss.backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ref_before, o.reference.parameters(), strict=True))
    loss2, m2 = o.loss(model, batch)
    assert loss2.item() < loss.item() and m2["reward_margin"].item() > 0
    ev, n = o.eval_loss(model, batch)
    assert n == 3 and ev.item() == pytest.approx(loss2.item(), rel=1e-5) and not ev.requires_grad


def test_dpo_objective_matches_dpo_loss_on_explicit_logps():
    policy, ref, batch = tiny_model(0), tiny_model(1), dpo_batch()
    o = obj.build_objective(cfg_for(TRAINING_STAGE="dpo", DPO_BETA=0.3, DPO_LOSS_TYPE="sigmoid",
                                    DPO_LABEL_SMOOTHING=0.1))
    o.setup(ref, None, torch.device("cpu"))  # the reference is a copy of `ref`
    loss, m = o.loss(policy, batch)
    lp = [obj.sequence_logps(mm(batch[f"{s}_input_ids"]), batch[f"{s}_labels"]).tolist()
          for mm in (policy, ref) for s in ("chosen", "rejected")]
    want = ref_dpo(*lp, 0.3, 0.1, "sigmoid")
    assert loss.item() == pytest.approx(sum(want), rel=1e-5)
    acc = sum(0.3 * (a - c) > 0.3 * (b - d) for a, b, c, d in zip(*lp, strict=True))
    assert m["reward_accuracy"].item() == acc


def test_dpo_lora_reference_is_the_base_with_adapters_off():
    model, batch = tiny_model(), dpo_batch()
    base_logps = obj.sequence_logps(model(batch["chosen_input_ids"]), batch["chosen_labels"]).detach()
    o = obj.build_objective(cfg_for(TRAINING_STAGE="dpo", LORA_ENABLED="true"))
    info = o.setup(model, None, torch.device("cpu"))  # the loop applies LoRA after setup(), in place
    with pytest.raises(RuntimeError, match="no adapters"):
        o.loss(model, batch)
    lora.apply_lora(model, ["wq", "wv", "w1"], rank=4, alpha=8.0)
    assert o.reference is None and info["reference_memory_mb"] == 0.0  # no second copy
    with torch.no_grad():
        for _, m in lora.lora_modules(model):
            m.lora_b.normal_()
    ids, labels = concat_pairs(batch)
    ref = o.reference_logps(batch, ids, labels)
    torch.testing.assert_close(ref[:3], base_logps)
    assert all(not m.disabled for _, m in lora.lora_modules(model))  # switched back on
    loss, _ = o.loss(model, batch)
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora" not in n)
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in lora.lora_parameters(model))


def test_setup_refuses_a_wrapped_model():
    class Compiled(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    o = obj.build_objective(cfg_for(TRAINING_STAGE="dpo"))
    with pytest.raises(RuntimeError, match="unwrapped"):
        o.setup(Compiled(tiny_model()), None, torch.device("cpu"))


# ---- distillation objective ---------------------------------------------------------------------------


def lm_batch(B=2, T=8, vocab=32, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = torch.randint(0, vocab, (B, T), generator=g)
    labels[0, :3] = -100
    return {"input_ids": ids, "labels": labels}


def distill_objective(stage="pretrain", **kv):
    cfg = cfg_for(**{"TRAINING_STAGE": stage, "IS_MODEL_DISTILLATION": "true", "TEACHER_MODEL_CHECKPOINT": "in-memory",
                     "DISTILLATION_ALPHA": 0.3, "DISTILLATION_TEMPERATURE": 2.0, **kv})
    return obj.build_objective(cfg)


@pytest.mark.parametrize("tied", [True, False])
def test_language_modeling_fused_head_equals_plain_cross_entropy(tied):
    # LanguageModeling.loss fuses the LM head with the loss for our bare Transformer; the loss and every
    # gradient must equal torch's cross-entropy over the full logits (IGNORE_INDEX positions excluded)
    torch.manual_seed(0)
    model = helpers.tiny_model(3, std=0.3, dim=32, multiple_of=16, vocab_size=32, max_seq_len=16,
                               tie_embeddings=tied)
    assert obj.is_ours(model)
    batch = lm_batch()
    loss, _ = obj.Pretrain().loss(model, batch)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = F.cross_entropy(model(batch["input_ids"]).flatten(0, 1), batch["labels"].flatten(), reduction="sum",
                          ignore_index=-100)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, atol=2e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    # a LoRA-wrapped head computes its logits (adapters start at zero: the same loss)
    lora.apply_lora(model, targets=["output"], rank=2, alpha=4.0)
    assert obj.Pretrain().loss(model, batch)[0].item() == pytest.approx(ref.item(), rel=1e-6)


def test_fused_loss_only_where_it_saves_memory_and_never_under_fp16(monkeypatch):
    import fused_ce

    calls = []
    real = fused_ce.fused_linear_cross_entropy_sum
    monkeypatch.setattr(fused_ce, "fused_linear_cross_entropy_sum", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=32, multiple_of=16, max_seq_len=16))

    def fused(n_tokens: int) -> bool:
        calls.clear()
        model(torch.zeros(1, n_tokens, dtype=torch.long), labels=torch.ones(1, n_tokens, dtype=torch.long))
        return bool(calls)

    assert fused(26)  # 5 * 26 >= 2 * 64: the (V, dim) gradient is cheaper
    assert not fused(25)  # fewer tokens: the logits are cheaper to hold
    with torch.autocast("cpu", dtype=torch.float16):  # GradScaler's scale must reach the per-logit gradient
        assert not fused(64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused(64)
    model.half()
    assert not fused(64)
    # without grad mode the fused function computes the loss only (and still the same loss)
    h, y = torch.randn(40, 64, dtype=torch.float32), torch.randint(0, 32, (40,))
    model.float()
    with torch.no_grad():
        a = real(h, model.output.weight, y)
    b = F.cross_entropy(h @ model.output.weight.detach().T, y, reduction="sum")
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_build_objective_wraps_lm_stages_with_distillation():
    o = distill_objective("instruct")
    assert isinstance(o, obj.Distillation) and isinstance(o.base, obj.SupervisedFineTuning)
    assert o.batch_format == "sft"
    assert type(obj.build_objective(cfg_for(TRAINING_STAGE="pretrain"))) is obj.Pretrain
    with pytest.raises(UserError, match="TRAINING_STAGE"):
        obj.build_objective(cfg_for(TRAINING_STAGE="dpo").replace(IS_MODEL_DISTILLATION=True))


def test_distillation_objective_combines_ce_and_kd():
    student, teacher, batch = tiny_model(0), tiny_model(1), lm_batch()
    o = distill_objective()
    o.teacher = teacher
    info = o.setup(student, None, torch.device("cpu"))
    n_bytes = sum(t.numel() * 4 for t in [*teacher.parameters(), *teacher.buffers()])  # inv_freq too
    assert info["teacher_memory_mb"] == round(n_bytes / 2**20, 1) and o.teacher_memory_bytes == n_bytes
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    loss, m = o.loss(student, batch)
    s_logits, t_logits = student(batch["input_ids"]), teacher(batch["input_ids"])
    ce = F.cross_entropy(s_logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum", ignore_index=-100)
    kd = ref_kl_sum(s_logits.detach(), t_logits.detach(), batch["labels"] != -100, 2.0)
    assert m["kd"].item() == pytest.approx(kd, rel=1e-4)
    assert loss.item() == pytest.approx(0.7 * ce.item() + 0.3 * kd, rel=1e-5)
    assert o.units(batch) == 13
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    ev, n = o.eval_loss(student, batch)  # validation stays plain CE
    assert ev.item() == pytest.approx(ce.item(), rel=1e-5) and n == 13


def test_distillation_student_equal_teacher_has_zero_kd():
    student = tiny_model(0)
    o = distill_objective()
    o.teacher = tiny_model(0)
    o.setup(student, None, torch.device("cpu"))
    _, m = o.loss(student, lm_batch())
    assert abs(m["kd"].item()) < 1e-5


def test_distillation_vocabulary_mismatch_names_both_sizes():
    o = distill_objective()
    o.teacher = tiny_model(0, vocab=40)
    with pytest.raises(UserError, match=r"40 tokens.*32"):
        o.setup(tiny_model(0, vocab=32), None, torch.device("cpu"))


def test_distillation_teacher_precision_bf16():
    o = distill_objective(TEACHER_PRECISION="bf16")
    o.teacher = tiny_model(1)
    info = o.setup(tiny_model(0), None, torch.device("cpu"))
    assert next(o.teacher.parameters()).dtype == torch.bfloat16 and info["teacher_precision"] == "bf16"
    loss, m = o.loss(tiny_model(0), lm_batch())
    assert torch.isfinite(loss) and m["kd"].item() > 0
