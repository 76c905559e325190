"""Optimizers and schedules against their published definitions and torch's own implementations."""

from __future__ import annotations

import math

import pytest
import torch

import config
import optim
from model import ModelArgs, Transformer


def _cfg(**kw) -> config.Config:
    return config.load_config(None, {k: str(v) for k, v in kw.items()}, use_environ=False)


def test_cosine_schedule_hand_values():
    lr = lambda s: optim.cosine_lr(s, 1.0, 0.1, 10, 110)
    assert [lr(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # linear warmup (step+1)/warmup
    assert lr(10) == pytest.approx(1.0)  # decay starts at max
    assert lr(60) == pytest.approx(0.55)  # halfway: (max + min) / 2
    assert lr(35) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr(110) == lr(500) == pytest.approx(0.1)


def test_wsd_schedule_hand_values():
    lr = lambda s: optim.wsd_lr(s, 1.0, 0.0, 5, 100, decay_fraction=0.2)
    assert lr(0) == pytest.approx(0.2) and lr(4) == pytest.approx(1.0)
    assert lr(5) == lr(50) == lr(79) == 1.0  # stable phase until 80% of the steps
    assert lr(80) == pytest.approx(1.0) and lr(90) == pytest.approx(0.5) and lr(100) == 0.0


def test_set_lr_uses_the_configured_schedule_per_group():
    cfg = _cfg(OPTIMIZER="muon", LR_SCHEDULE="wsd", MAX_LR=1e-3, MIN_LR=0, WARMUP_STEPS=0, MUON_MAX_LR=0.02,
               MUON_MIN_LR=0.0, DIM=64, N_HEADS=4, N_KV_HEADS=2, N_LAYERS=2)
    model = Transformer(cfg.model_args(100))
    opt = optim.build_optimizer(model, cfg, torch.device("cpu"))
    main = optim.set_lr(opt, 50, cfg, 100)
    lrs = {g["kind"]: g["lr"] for g in opt.param_groups}
    assert main == lrs["adamw"] == pytest.approx(1e-3) and lrs["muon"] == pytest.approx(0.02)
    optim.set_lr(opt, 90, cfg, 100)
    assert {g["kind"]: g["lr"] for g in opt.param_groups}["muon"] == pytest.approx(0.01)


def test_weight_decay_policy_matrices_and_embeddings_not_gains():
    cfg = _cfg(WEIGHT_DECAY=0.1)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=50, tie_embeddings=True))
    groups = optim.param_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "tok_embeddings.weight" in decayed and "layers.0.attention.wq.weight" in decayed
    assert all(n.endswith("norm.weight") for n in plain) and "norm.weight" in plain
    assert len(decayed) + len(plain) == len(list(model.parameters()))  # tied weight appears once


def test_lora_only_adapters_are_optimized():
    import lora

    cfg = _cfg()
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=50))
    lora.apply_lora(model, ["wq", "wv"], rank=2, alpha=4.0)
    params = {id(p) for g in optim.param_groups(model, cfg) for p in g["params"]}
    adapters = {id(p) for n, p in model.named_parameters() if n.endswith((".lora_a", ".lora_b"))}
    assert len(adapters) == 4 and params == adapters


def test_adamw_matches_torch_reference_with_decay_groups():
    torch.manual_seed(0)
    cfg = _cfg(MAX_LR=1e-2, WEIGHT_DECAY=0.1, ADAMW_USE_FUSED="true")
    a = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=50))
    b = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=50))
    b.load_state_dict(a.state_dict())
    opt_a = optim.build_optimizer(a, cfg, torch.device("cpu"))
    decay = [p for n, p in b.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in b.named_parameters() if p.ndim < 2]
    opt_b = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    x = torch.randint(0, 50, (2, 8))
    for _ in range(3):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            m(x).logsumexp(-1).mean().backward()
            o.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5, msg=n)


def test_newton_schulz_approximates_polar_factor():
    torch.manual_seed(0)
    for shape in [(64, 32), (32, 96)]:
        g = torch.randn(*shape)
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        polar = u @ vh  # the exact orthogonalization U V^T
        out = optim.newton_schulz(g)
        sv = torch.linalg.svdvals(out.float())
        assert sv.min() > 0.5 and sv.max() < 1.3  # Jordan et al.: singular values in ~[0.7, 1.2]
        cos = float((out.float() * polar).sum() / (out.float().norm() * polar.norm()))
        assert cos > 0.95


def test_muon_first_step_is_scaled_orthogonalized_gradient():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(48, 16))
    w0 = w.detach().clone()
    g = torch.randn(48, 16)
    w.grad = g.clone()
    opt = optim.Muon([{"params": [w], "kind": "muon", "lr": 0.1, "weight_decay": 0.0}], momentum=0.95)
    opt.step()
    # first step: buf = (1-m) g, Nesterov update = g + m (buf - g)... = lerp(g, buf, m); orthogonalization
    # removes the scale, so the update is NS(g) times lr * sqrt(rows/cols)
    expected = w0 - 0.1 * math.sqrt(48 / 16) * optim.newton_schulz(g)
    torch.testing.assert_close(w.detach(), expected, atol=1e-2, rtol=0)  # bf16 iteration
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    delta = (w0 - w.detach()) / (0.1 * math.sqrt(3))
    assert float((delta * (u @ vh)).sum() / (delta.norm() * (u @ vh).norm())) > 0.95


def test_muon_aux_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(10))
    p2 = torch.nn.Parameter(p1.detach().clone())
    ours = optim.Muon([{"params": [p1], "kind": "adamw", "lr": 1e-2, "weight_decay": 0.1}], betas=(0.9, 0.95))
    ref = torch.optim.AdamW([p2], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(5):
        g = torch.randn(10)
        p1.grad, p2.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-6)


def test_muon_groups_hidden_matrices_only():
    cfg = _cfg(OPTIMIZER="muon")
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=50))
    names = {id(p): n for n, p in model.named_parameters()}
    by_kind = {}
    for g in optim.param_groups(model, cfg):
        by_kind.setdefault(g["kind"], set()).update(names[id(p)] for p in g["params"])
    assert all(n.startswith("layers.") and not n.endswith("norm.weight") for n in by_kind["muon"])
    assert len(by_kind["muon"]) == 2 * 7
    assert {"tok_embeddings.weight", "output.weight", "norm.weight"} <= by_kind["adamw"]
