"""Mixture-of-Experts FFN numerics: logits equal transformers' MixtralForCausalLM on the same weights, loaded
both ways (HF -> ours, ours -> HF); the load-balancing loss equals transformers' Mixtral aux loss and both
router losses their published formulas on hand-computed cases; the grouped path equals the dense reference
(forward and gradients, with and without torch._grouped_mm, capacity and a shared expert); router gradients
equal finite differences in float64; capacity drops in the stated order and only in training; a compiled
block equals eager; KV-cache decoding equals a full forward; active-parameter FLOPs; user errors for what has no export."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import config
import model_formats
import model_utils
import moe
from errors import UserError
from fileio import read_json
from model import ModelArgs, Transformer

HF_CFG = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, rope_theta=10000.0,
              max_position_embeddings=64, sliding_window=None, tie_word_embeddings=False,
              initializer_range=0.2)  # wide init: router probabilities far from uniform, routing matters


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    hf = MixtralForCausalLM(MixtralConfig(**HF_CFG)).eval()
    out = tmp_path_factory.mktemp("mixtral") / "hf"
    hf.save_pretrained(out)
    return out, hf


def _tokens(n: int = 13, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(1))


def test_mixtral_import_logits_and_aux_loss_equal_transformers(hf_dir):
    path, hf = hf_dir
    ours, args = model_utils.load_model(str(path))
    assert (args.moe_num_experts, args.moe_top_k, args.n_kv_heads) == (4, 2, 2)
    tok = _tokens()
    ref = hf(tok, output_router_logits=True)
    logits = ours(tok)  # gradients enabled: the MoE layers keep their router logits
    assert (logits - ref.logits).abs().max().item() < 1e-4
    # the routing is not trivially uniform: top-2 of 4 decided by a margin
    probs = torch.softmax(ours.layers[0].feed_forward.router_logits, -1).sort(-1, descending=True).values
    assert (probs[:, 1] - probs[:, 2]).max() > 0.05
    lb = moe.router_losses(ours, args.moe_top_k)["lb"]
    torch.testing.assert_close(lb, ref.aux_loss.float(), atol=1e-6, rtol=1e-6)


def test_mixtral_export_reloads_in_transformers_with_equal_logits(tmp_path):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, ffn_hidden_dim=80,
                     rope_theta=10000.0, max_seq_len=64, moe_num_experts=4, moe_top_k=2)
    torch.manual_seed(3)
    ours = Transformer(args)
    ours.init_weights(std=0.2)
    ours.eval()
    out = model_utils.export_hf(ours, args, tmp_path / "hf")
    hf = MixtralForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    tok = _tokens()
    with torch.no_grad():
        assert (ours(tok) - hf(tok).logits).abs().max().item() < 1e-4
    back, back_args = model_utils.load_model(str(out))
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, atol=0, rtol=0)
    assert back_args.moe_num_experts == 4


def test_fused_expert_layout_of_transformers_5_imports_like_the_checkpoint_layout(hf_dir):
    """In memory transformers >= 5 holds mlp.experts.gate_up_proj / down_proj; both layouts give our tensors."""
    path, hf = hf_dir
    _, from_file = model_formats.load_hf(path)
    args = model_formats._args_from_hf_config(read_json(path / "config.json"), path)
    fused = {k: v for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in fused)
    from_memory = model_formats.hf_to_ours(fused, args)
    assert from_memory.keys() == from_file.keys()
    for k in from_file:
        torch.testing.assert_close(from_memory[k], from_file[k], atol=0, rtol=0)


# ---- router losses against their formulas ---------------------------------------------------------------


def test_router_losses_on_hand_computed_cases():
    # 2 experts, top-1, two tokens both preferring expert 0 with logits (1, 0): f = (1, 0), P_0 = e / (1 + e)
    logits = [torch.tensor([[1.0, 0.0], [1.0, 0.0]])]
    assert moe.load_balancing_loss(logits, 1).item() == pytest.approx(2 * math.e / (1 + math.e), rel=1e-6)
    # z-loss: logsumexp of (0, 0) is ln 2, of (ln 3, 0) is ln 4; the mean over the two tokens of the squares
    z = moe.router_z_loss([torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3), 0.0]])])
    assert z.item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2, rel=1e-6)


def test_load_balancing_loss_equals_transformers_over_layers():
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(20, 6, generator=g) * 2 for _ in range(3)]
    for k in (1, 2, 3):
        ref = load_balancing_loss_func(tuple(layers), num_experts=6, top_k=k)
        torch.testing.assert_close(moe.load_balancing_loss(layers, k), ref.float(), atol=1e-6, rtol=1e-6)
    balanced = [torch.tensor([[2.0, 1, 0, 0], [0, 0, 2, 1], [1, 2, 0, 0], [0, 0, 1, 2]]) * 1e-4]
    assert moe.load_balancing_loss(balanced, 2).item() == pytest.approx(2.0, abs=1e-3)  # = k when even


# ---- grouped path == dense reference path ------------------------------------------------------------------


def _moe(capacity_factor: float = 0.0, shared: bool = False, seed: int = 0, dtype=torch.float32):
    from model import FeedForward

    torch.manual_seed(seed)
    m = moe.MoEFeedForward(16, 24, 5, 2, capacity_factor, FeedForward(16, 24) if shared else None)
    for p in m.parameters():
        torch.nn.init.normal_(p, 0.0, 0.4)
    return m.to(dtype).train()


def _run(m: moe.MoEFeedForward, x: torch.Tensor, impl: str, g: torch.Tensor):
    m.impl = impl
    m.zero_grad()
    x = x.clone().requires_grad_()
    y = m(x)
    aux = moe.load_balancing_loss([m.router_logits], m.top_k) + moe.router_z_loss([m.router_logits])
    ((y * g).sum() + aux).backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in m.named_parameters()}, m.dropped


@pytest.mark.parametrize("grouped_mm", [True, False], ids=["grouped_mm", "padded_bmm"])
@pytest.mark.parametrize("capacity_factor,shared", [(0.0, False), (0.8, False), (0.0, True)],
                         ids=["no_drop", "capacity", "shared_expert"])
def test_grouped_path_equals_dense_reference(monkeypatch, grouped_mm, capacity_factor, shared):
    if not grouped_mm:
        monkeypatch.setattr(moe, "grouped_mm_supported", lambda *a: False)
    else:
        assert moe.grouped_mm_supported("cpu", torch.float32)  # torch 2.13 CPU has it, forward and backward
    m = _moe(capacity_factor, shared)
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(2))
    g = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(3))
    yg, xg, pg, dropped_g = _run(m, x, "grouped", g)
    yd, xd, pd, dropped_d = _run(m, x, "dense", g)
    torch.testing.assert_close(yg, yd, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xg, xd, atol=1e-5, rtol=1e-5)
    for n in pd:
        torch.testing.assert_close(pg[n], pd[n], atol=1e-5, rtol=1e-5, msg=n)
    assert int(dropped_g) == int(dropped_d)
    assert (int(dropped_g) > 0) == (capacity_factor > 0)  # the capacity case really drops


def test_router_gradient_equals_finite_differences_float64(monkeypatch):
    monkeypatch.setattr(moe, "grouped_mm_supported", lambda *a: False)  # _grouped_mm has no float64 kernel
    m = _moe(capacity_factor=0.0, dtype=torch.float64)
    x = torch.randn(2, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    g = torch.randn(2, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for impl in ("grouped", "dense"):
        m.impl = impl

        def f(gate_weight: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():  # gradcheck perturbs under no_grad, where the layer keeps no router logits
                y = torch.func.functional_call(m, {"gate.weight": gate_weight}, (x,))
            return (y * g).sum() + 0.3 * moe.load_balancing_loss([m.router_logits], 2) \
                + 0.7 * moe.router_z_loss([m.router_logits])

        w = m.gate.weight.detach().clone().requires_grad_()
        assert torch.autograd.gradcheck(f, (w,), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)
        # and the gradient is not trivially zero: the routing weights carry it
        assert f(w).requires_grad and torch.autograd.grad(f(w), w)[0].abs().max() > 1e-3


def test_capacity_drops_later_tokens_and_second_choices_first_and_only_in_training():
    m = moe.MoEFeedForward(4, 8, 2, 1, capacity_factor=1.0)  # capacity ceil(1 * 4 * 1 / 2) = 2 per expert
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(0.1)
        m.gate.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]))  # every token prefers expert 0
    x = torch.ones(1, 4, 4)
    y = m.train()(x)[0]
    assert (y[:2].abs() > 0).all() and (y[2:] == 0).all()  # tokens 0, 1 served; 2, 3 dropped
    assert int(m.dropped) == 2
    load = moe.expert_load(m)  # the router sent everything to expert 0: share x E = 2 and 0
    assert (load["max_load"].item(), load["min_load"].item(), load["dropped"].item()) == (2.0, 0.0, 0.5)
    assert (m.eval()(x)[0].abs() > 0).all()  # inference never drops
    # slot-major priority: token 0 prefers expert 0, token 1 expert 1, capacity ceil(0.5 * 2 * 2 / 2) = 1 each.
    # Every first choice is served before any second choice, so each token keeps its first choice; in token
    # order token 0's second choice would take expert 1's place and token 1 would get nothing
    m2 = moe.MoEFeedForward(4, 8, 2, 2, capacity_factor=0.5)
    with torch.no_grad():
        for p in m2.parameters():
            p.fill_(0.1)
        m2.gate.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    y2 = m2.train()(torch.eye(4)[None, :2])[0]
    assert int(m2.dropped) == 2 and (y2.abs().sum(-1) > 0).all()


def test_compiled_block_equals_eager_and_keeps_router_logits():
    """USE_TORCH_COMPILE compiles each block: the routed experts run eagerly inside it, the router logits the
    losses need are still kept, forward and gradients equal eager's."""
    from torch._dynamo.utils import counters

    from model import TransformerBlock, rope_frequencies, rope_rotations

    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=50, ffn_hidden_dim=48,
                     moe_num_experts=4, moe_top_k=2, moe_capacity_factor=1.0)
    torch.manual_seed(0)
    block = TransformerBlock(0, args).train()
    for p in block.parameters():
        torch.nn.init.normal_(p, 0.0, 0.2)
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
    rot = rope_rotations(rope_frequencies(args), torch.arange(8).expand(2, 8))
    results = []
    for compiled in (False, True):
        if compiled:
            counters.clear()
            block.compile(backend="aot_eager")  # dynamo + autograd tracing, as inductor sees it, minus codegen
        block.zero_grad()
        y = block(x, rot, None)
        lb = moe.router_losses(block, 2)["lb"]
        (y.square().sum() + lb).backward()
        results.append((y.detach(), lb.detach(), [p.grad.clone() for p in block.parameters()]))
    assert counters["stats"]["unique_graphs"] >= 1
    (ye, lbe, ge), (yc, lbc, gc) = results
    torch.testing.assert_close(yc, ye, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lbc, lbe, atol=1e-6, rtol=1e-6)
    for a, b in zip(gc, ge, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_kv_cache_decoding_equals_full_forward():
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, ffn_hidden_dim=48,
                     moe_num_experts=4, moe_top_k=2, moe_shared_expert=True, max_seq_len=32)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights(std=0.2)
    model.eval()
    tok = _tokens(10, 50)
    with torch.no_grad():
        full = model(tok)
        model.setup_caches(2, 32, fuse_projections=True)
        steps = [model(tok[:, :4], start_pos=0)] + [model(tok[:, i:i + 1], start_pos=i) for i in range(4, 10)]
        model.clear_caches()
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_flops_count_the_active_experts_only():
    dense = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, ffn_hidden_dim=80)
    sparse = ModelArgs(**{**dense.to_dict(), "moe_num_experts": 8, "moe_top_k": 2})
    shared = ModelArgs(**{**sparse.to_dict(), "moe_shared_expert": True})
    ffn = 3 * 64 * 80
    diff = model_utils.flops_per_token(sparse, 16) - model_utils.flops_per_token(dense, 16)
    assert diff == 6 * 2 * (64 * 8 + ffn)  # router + one more expert per layer
    assert model_utils.flops_per_token(shared, 16) - model_utils.flops_per_token(sparse, 16) == 6 * 2 * ffn
    # the model really holds 8 experts' worth of FFN weights
    assert model_utils.count_parameters(Transformer(sparse)) - model_utils.count_parameters(Transformer(dense)) \
        == 2 * (64 * 8 + 7 * ffn)


# ---- settings, presets, refusals ------------------------------------------------------------------------


def test_presets_and_settings_build_the_moe_model():
    a = config.load_config(None, {"MODEL_PRESET": "moe-small"}).model_args(1000)
    assert (a.dim, a.n_layers, a.moe_num_experts, a.moe_top_k, a.hidden_dim) == (512, 8, 8, 2, 768)
    d = config.load_config(None, {"MODEL_PRESET": "moe-debug", "MOE_CAPACITY_FACTOR": "1.25",
                                  "MOE_SHARED_EXPERT": "true", "MOE_IMPL": "dense"}).model_args(1000)
    block = Transformer(d).layers[0].feed_forward
    assert isinstance(block, moe.MoEFeedForward) and block.shared_expert is not None
    assert (block.capacity_factor, block.impl, block.n_experts) == (1.25, "dense", 4)
    with pytest.raises(UserError, match=r"MOE_TOP_K=5 .*MOE_NUM_EXPERTS=4"):
        config.load_config(None, {"MODEL_PRESET": "moe-debug", "MOE_TOP_K": "5"})


def test_exports_without_a_target_format_refuse_and_leave_nothing(tmp_path):
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=50, ffn_hidden_dim=48,
                     moe_num_experts=4, moe_top_k=2, moe_shared_expert=True)
    model = Transformer(args)
    with pytest.raises(UserError, match="no shared expert"):
        model_utils.export_hf(model, args, tmp_path / "hf")
    with pytest.raises(UserError, match="--format hf"):
        model_utils.export_meta(model, args, tmp_path / "meta")
    assert not any(tmp_path.iterdir())
