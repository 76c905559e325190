"""LoRA: the module swap is exact where it must be (zero B, disabled, merged), dropout stays off the base
path, only adapters train, and PEFT loads our adapter on top of our HF export with the same logits."""

from __future__ import annotations

import json
import math

import helpers
import pytest
import torch
from torch import nn

import lora
from errors import UserError
from model import Transformer

TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


# head_dim 8 (dim 32, 4 query heads over 2 KV heads) so the RoPE permutation of q/k rows is non-trivial
SHAPE = {"dim": 32, "multiple_of": 16, "max_seq_len": 64}


def tiny_model(seed: int = 0, **kw) -> Transformer:
    return helpers.tiny_model(seed, std=0.1, global_seed=True, **(SHAPE | kw))


def randomize_b(model: nn.Module, seed: int = 1, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.lora_modules(model):
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * std)


def tokens(B: int = 2, T: int = 12, V: int = 97, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_swap_keeps_base_keys_and_peft_init():
    model = tiny_model()
    base_keys = set(model.state_dict())
    lora.apply_lora(model, TARGETS + ["output"], rank=4, alpha=8, dropout=0.0)
    keys = set(model.state_dict())
    assert base_keys <= keys, "base weights must keep their state-dict names"
    added = keys - base_keys
    assert added == {f"{n}.{k}" for n, _ in lora.lora_modules(model) for k in ("lora_a", "lora_b")}
    assert len(list(lora.lora_modules(model))) == 2 * 7 + 1
    m = model.layers[0].attention.wq
    assert isinstance(m, lora.LoRALinear) and m.scaling == 2.0
    assert m.lora_a.shape == (4, 32) and m.lora_b.shape == (32, 4)
    assert model.layers[0].attention.wk.lora_b.shape == (16, 4)
    assert torch.count_nonzero(m.lora_b) == 0
    # kaiming_uniform(a=sqrt(5)) on (rank, in) = U(-1/sqrt(in), 1/sqrt(in)), as nn.Linear and PEFT use.
    bound = 1 / math.sqrt(32)
    assert m.lora_a.abs().max() <= bound and m.lora_a.abs().max() > 0.5 * bound


def test_zero_b_changes_nothing_and_disable_gives_base():
    model = tiny_model()
    x = tokens()
    with torch.no_grad():
        ref = model(x)
        lora.apply_lora(model, TARGETS, rank=4, alpha=8)
        assert torch.equal(model(x), ref)  # B = 0: exactly the base model
        randomize_b(model)
        adapted = model(x)
        assert (adapted - ref).abs().max() > 1e-2
        with lora.disable_lora(model):
            torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
        assert torch.equal(model(x), adapted)  # switch restored


def test_disable_restores_on_exception():
    model = lora.apply_lora(tiny_model(), ["wq"], rank=2, alpha=2)
    with pytest.raises(RuntimeError, match="boom"):
        with lora.disable_lora(model):
            assert model.layers[0].attention.wq.disabled
            raise RuntimeError("boom")
    assert not any(m.disabled for _, m in lora.lora_modules(model))


def test_merged_equals_unmerged_and_merge_is_idempotent():
    model = lora.apply_lora(tiny_model(), TARGETS, rank=4, alpha=16)
    randomize_b(model)
    x = tokens()
    base_w = model.layers[1].feed_forward.w2.weight.detach().clone()
    with torch.no_grad():
        with lora.disable_lora(model):
            base = model(x)
        unmerged = model(x)
        lora.merge_lora(model)
        merged = model(x)
        lora.merge_lora(model)  # second merge is a no-op
        torch.testing.assert_close(model(x), merged, rtol=0, atol=0)
        torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
        # the weight really changed, by scaling * B A (independent computation)
        m = model.layers[1].feed_forward.w2
        torch.testing.assert_close(m.weight, base_w + 4.0 * m.lora_b @ m.lora_a, rtol=0, atol=1e-6)
        with lora.disable_lora(model):  # merged + disabled still gives the base model
            torch.testing.assert_close(model(x), base, rtol=0, atol=1e-5)
        lora.unmerge_lora(model)
        torch.testing.assert_close(model.layers[1].feed_forward.w2.weight, base_w, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-5)


def test_merge_refuses_tied_output():
    model = lora.apply_lora(tiny_model(tie_embeddings=True), ["output"], rank=2, alpha=4)
    assert model.output.weight is model.tok_embeddings.weight  # tying survives the swap
    with pytest.raises(UserError, match="shared"):
        lora.merge_lora(model)


def test_only_adapters_require_grad_and_get_grads():
    model = lora.apply_lora(tiny_model(), TARGETS, rank=4, alpha=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora.lora_state_dict(model))
    assert {id(p) for p in lora.lora_parameters(model)} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    randomize_b(model)
    model(tokens()).logsumexp(-1).mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_dropout_only_on_adapter_path():
    model = tiny_model()
    x = tokens()
    with torch.no_grad():
        ref = model(x)
    lora.apply_lora(model, TARGETS, rank=4, alpha=8, dropout=0.9)
    model.train()
    with torch.no_grad():
        # B = 0: whatever dropout does to the adapter input, the output is the base output exactly.
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
        randomize_b(model)
        # with B != 0, training-mode outputs are random (dropout acts) but eval-mode is deterministic
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(1)
        b = model(x)
        assert (a - b).abs().max() > 1e-3
        model.eval()
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    # one layer by hand: y = x W^T + scaling * dropout(x) A^T B^T with the same dropout mask
    layer = model.layers[0].attention.wq
    layer.train()
    h = torch.randn(3, 32)
    torch.manual_seed(5)
    y = layer(h)
    torch.manual_seed(5)
    h_drop = nn.functional.dropout(h, 0.9, training=True)
    expect = h @ layer.weight.T + layer.scaling * (h_drop @ layer.lora_a.T @ layer.lora_b.T)
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-6)


def test_state_dict_roundtrip_and_errors():
    src = lora.apply_lora(tiny_model(), ["wq", "wv"], rank=4, alpha=8)
    randomize_b(src)
    sd = lora.lora_state_dict(src)
    assert set(sd) == {
        f"layers.{i}.attention.{w}.{k}" for i in range(2) for w in ("wq", "wv") for k in ("lora_a", "lora_b")
    }
    dst = lora.apply_lora(tiny_model(), ["wq", "wv"], rank=4, alpha=8)
    lora.load_lora_state_dict(dst, sd)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    with pytest.raises(UserError, match="does not match"):
        lora.load_lora_state_dict(lora.apply_lora(tiny_model(), ["wq"], rank=4, alpha=8), sd)
    with pytest.raises(UserError, match="shape"):
        lora.load_lora_state_dict(lora.apply_lora(tiny_model(), ["wq", "wv"], rank=2, alpha=8), sd)
    with pytest.raises(UserError, match="match no nn.Linear"):
        lora.apply_lora(tiny_model(), ["wq", "q_proj"], rank=4, alpha=8)
    with pytest.raises(UserError, match="rank"):
        lora.apply_lora(tiny_model(), ["wq"], rank=0, alpha=8)
    with pytest.raises(UserError, match="already"):
        lora.apply_lora(src, ["wk"], rank=4, alpha=8)


def test_peft_loads_our_adapter_on_our_hf_export(tmp_path):
    """Independent reference: transformers' Llama + peft's LoRA layers, from the files we wrote."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import model_utils

    args = helpers.tiny_args(**SHAPE)
    model = tiny_model(seed=7)
    model_utils.export_hf(model, args, tmp_path / "base")
    lora.apply_lora(model, TARGETS + ["output"], rank=4, alpha=8, dropout=0.05)
    randomize_b(model, seed=11, std=0.2)
    lora.save_peft_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))

    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 8, 0.05)
    assert set(cfg["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "lm_head",
    }

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    # every adapter tensor was picked up (none left at PEFT's zero-B init)
    n_lora_b = sum(1 for n, _ in peft_model.named_parameters() if "lora_B" in n)
    assert n_lora_b == 2 * 7 + 1
    model.eval()
    x = tokens(seed=5)
    with torch.no_grad():
        ours = model(x)
        theirs = peft_model(input_ids=x).logits
        with lora.disable_lora(model):
            base = model(x)
    assert (ours - base).abs().max() > 1e-2  # the adapter matters, so equality below is informative
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)

    # and back: our loader reads PEFT's layout into a fresh model with the same result
    fresh = tiny_model(seed=7)
    lora.load_peft_adapter(fresh, tmp_path / "adapter")
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ours, rtol=0, atol=1e-6)

    # merge-and-unload gives a plain model (base keys only) whose HF export is the adapted model
    base_keys = set(tiny_model(seed=7).state_dict())
    lora.unload_lora(fresh, merge=True)
    assert set(fresh.state_dict()) == base_keys
    assert not any(isinstance(m, lora.LoRALinear) for m in fresh.modules())
    model_utils.export_hf(fresh, args, tmp_path / "merged")
    merged_hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged_hf(input_ids=x).logits, ours, rtol=0, atol=1e-4)
