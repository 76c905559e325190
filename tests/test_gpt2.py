"""GPT-2 (gpt2.py) against transformers' GPT2LMHeadModel on random weights: an HF directory loads through
model_utils.load_model (Conv1D (in, out) weights, fused c_attn, files with or without the `transformer.` prefix
and with the attn.bias / attn.masked_bias buffers) with equal logits and loss, and exports back to a directory
transformers loads with equal logits. Also: the settings (MODEL_FAMILY, DROPOUT, the gpt2-* presets), the init,
the length limit, dropout, and KV-cache decoding against a full forward."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import config
import families
from errors import UserError
from gpt2 import GPT2, GPT2Args
from losses import IGNORE_INDEX
from model_utils import count_parameters, export_hf, load_model

SHAPES = [  # (n_embd, n_layer, n_head, vocab, n_positions, n_inner)
    (64, 2, 4, 97, 32, None),
    (48, 3, 3, 130, 40, 80),
    (32, 1, 8, 50, 16, None),
]


def hf_gpt2(shape, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    n_embd, n_layer, n_head, vocab, n_pos, n_inner = shape
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, vocab_size=vocab, n_positions=n_pos,
                     n_inner=n_inner, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # HF zero-initialises biases and sets LayerNorms to 1/0: make every tensor matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.normal_(0.0, 0.1)
    return model


def save_hub_style(model, out: Path) -> Path:
    """What an older hub upload holds (openai-community/gpt2): no `transformer.` prefix, the causal-mask buffers
    attn.bias (1, 1, n, n) and attn.masked_bias, no lm_head."""
    model.save_pretrained(out)
    sd = {k.removeprefix("transformer."): v for k, v in load_file(out / "model.safetensors").items()
          if k != "lm_head.weight"}
    n = model.config.n_positions
    for i in range(model.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("hub_style", [False, True])
def test_hf_gpt2_loads_with_equal_logits_and_loss(tmp_path, shape, hub_style):
    hf = hf_gpt2(shape)
    if hub_style:
        save_hub_style(hf, tmp_path / "hf")
    else:
        hf.save_pretrained(tmp_path / "hf")
    model, args = load_model(tmp_path / "hf")
    assert isinstance(model, GPT2) and isinstance(args, GPT2Args)
    assert (args.dim, args.n_layers, args.n_heads, args.vocab_size, args.max_seq_len) == shape[:5]
    assert args.hidden_dim == (shape[5] or 4 * shape[0]) and args.dropout == 0.1
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, shape[3], (3, shape[4]), generator=g)
    with torch.no_grad():
        ref = hf(tokens)
        got = model(tokens)
    assert (got - ref.logits).abs().max().item() < 1e-4

    labels = tokens.clone()
    labels[0, :5] = -100  # HF's ignore index, ours too
    with torch.no_grad():
        ref_loss = hf(tokens, labels=labels).loss  # mean over the shifted targets
        shifted = torch.cat([labels[:, 1:], torch.full((3, 1), IGNORE_INDEX)], dim=1)
        summed = model(tokens, labels=shifted)
        rows = model(tokens, labels=shifted, per_row=True)
    n = (shifted != IGNORE_INDEX).sum()
    assert abs(summed.item() / n.item() - ref_loss.item()) < 1e-5
    assert torch.allclose(-rows.sum() / n, ref_loss, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_export_to_hf_gpt2_loads_in_transformers_with_equal_logits(tmp_path, shape):
    from transformers import GPT2LMHeadModel

    args = GPT2Args(dim=shape[0], n_layers=shape[1], n_heads=shape[2], vocab_size=shape[3], max_seq_len=shape[4],
                    ffn_hidden_dim=shape[5], dropout=0.1)
    model = GPT2(args)
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_f"):
                p.normal_(0.0, 0.1)
    model.eval()
    out = export_hf(model, args, tmp_path / "out")
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.config.resid_pdrop == 0.1 and hf.config.n_positions == shape[4]
    tokens = torch.randint(0, shape[3], (2, shape[4]), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max().item() < 1e-4
    again, again_args = load_model(out)  # and back: the same tensors
    assert again_args.to_dict() | {"extra": {}} == args.to_dict() | {"extra": {}}
    assert again.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


def test_unsupported_gpt2_configs_are_refused_in_one_line(tmp_path):
    hf = hf_gpt2(SHAPES[0])
    hf.config.activation_function = "relu"
    hf.save_pretrained(tmp_path / "relu")
    with pytest.raises(UserError, match="activation_function='relu'.*gelu_new"):
        load_model(tmp_path / "relu")
    hf.config.activation_function = "gelu_new"
    hf.config.scale_attn_by_inverse_layer_idx = True
    hf.save_pretrained(tmp_path / "scaled")
    with pytest.raises(UserError, match="scale_attn_by_inverse_layer_idx"):
        load_model(tmp_path / "scaled")


def test_sequences_longer_than_n_positions_are_refused():
    model = GPT2(GPT2Args(dim=32, n_layers=1, n_heads=4, vocab_size=50, max_seq_len=16))
    model(torch.zeros(1, 16, dtype=torch.long))  # exactly n_positions is fine
    with pytest.raises(UserError, match="17 positions is longer than this GPT-2 model's 16") as e:
        model(torch.zeros(1, 17, dtype=torch.long))
    assert "\n" not in str(e.value)


def test_init_follows_gpt2():
    args = GPT2Args(dim=256, n_layers=8, n_heads=4, vocab_size=1000, max_seq_len=64)
    model = GPT2(args)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    sd = model.state_dict()
    resid = 0.02 / math.sqrt(2 * args.n_layers)
    for name, t in sd.items():
        if name.endswith(".bias"):
            assert not t.any(), name
        elif t.ndim == 1:
            assert torch.equal(t, torch.ones_like(t)), name
        elif name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
            assert abs(t.std().item() / resid - 1) < 0.05, name
        else:
            assert abs(t.std().item() / 0.02 - 1) < 0.05, name
    assert model.lm_head.weight is model.wte.weight


def test_dropout_is_active_in_training_only():
    model = GPT2(GPT2Args(dim=32, n_layers=2, n_heads=4, vocab_size=50, max_seq_len=16, dropout=0.1))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    model.train()
    assert not torch.equal(model(tokens), model(tokens))
    model.eval()
    assert torch.equal(model(tokens), model(tokens))
    no_dropout = GPT2(GPT2Args(dim=32, n_layers=2, n_heads=4, vocab_size=50, max_seq_len=16))
    no_dropout.load_state_dict(model.state_dict())
    no_dropout.train()
    assert torch.equal(no_dropout(tokens), model(tokens))


def test_kv_cache_prefill_and_decode_steps_equal_a_full_forward():
    model = GPT2(GPT2Args(dim=32, n_layers=2, n_heads=4, vocab_size=50, max_seq_len=24)).eval()
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(2, 16)
        prefill = model(tokens[:, :8])
        steps = []
        key_mask = torch.ones(2, 16, dtype=torch.bool)
        for t in range(8, 12):
            slots = torch.tensor([t])
            steps.append(model.decode_step(tokens[:, t:t + 1], slots, slots.expand(2, 1), key_mask))
        model.clear_caches()
    assert torch.allclose(prefill, full[:, :8], atol=1e-5)
    assert torch.allclose(torch.cat(steps, dim=1), full[:, 8:], atol=1e-5)


# ---- settings and the family registry -------------------------------------------------------------------
def test_gpt2_presets_build_gpt2_of_the_published_sizes():
    from transformers import GPT2Config, GPT2LMHeadModel

    # OpenAI's released sizes (n_embd, n_layer, n_head), as transformers' configs of the hub checkpoints give them
    released = {"gpt2-124m": (768, 12, 12), "gpt2-350m": (1024, 24, 16), "gpt2-774m": (1280, 36, 20),
                "gpt2-1.5b": (1600, 48, 25)}
    for preset, (n_embd, n_layer, n_head) in released.items():
        cfg = config.load_config(None, {"MODEL_PRESET": preset}, use_environ=False)
        args = cfg.model_args(vocab_size=1)
        assert isinstance(args, GPT2Args) and args.vocab_size == 50257 and args.dropout == 0.1
        assert (args.dim, args.n_layers, args.n_heads, args.max_seq_len) == (n_embd, n_layer, n_head, 1024)
        with torch.device("meta"):
            ours = count_parameters(families.build(args))
            hf = GPT2LMHeadModel(GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head)).num_parameters()
        assert ours == hf, preset
    debug = config.load_config(None, {"MODEL_PRESET": "gpt2-debug"}, use_environ=False).model_args(vocab_size=300)
    assert isinstance(debug, GPT2Args) and (debug.dim, debug.n_layers, debug.vocab_size) == (64, 2, 300)


def test_model_family_setting():
    llama = config.load_config(None, {}, use_environ=False)
    assert llama.model.model_family == "llama" and type(llama.model_args(100)).__name__ == "ModelArgs"
    cfg = config.load_config(None, {"MODEL_FAMILY": "gpt2", "N_KV_HEADS": "3", "DROPOUT": "0.2"}, use_environ=False)
    args = cfg.model_args(100)  # GPT-2 has no grouped-query attention: N_KV_HEADS is not read
    assert isinstance(args, GPT2Args) and args.dropout == 0.2 and args.n_kv_heads == args.n_heads
    with pytest.raises(UserError, match="DROPOUT=0.1 .*MODEL_FAMILY=llama: the Llama architecture has no dropout"):
        config.load_config(None, {"DROPOUT": "0.1"}, use_environ=False)
    with pytest.raises(UserError, match="MOE_NUM_EXPERTS=4 .*Mixture of Experts is part of the llama family only"):
        config.load_config(None, {"MODEL_FAMILY": "gpt2", "MOE_NUM_EXPERTS": "4"}, use_environ=False)
    with pytest.raises(UserError, match="MODEL_FAMILY='bert'"):
        config.load_config(None, {"MODEL_FAMILY": "bert"}, use_environ=False)
    # LoRA targets are named per family
    lora_on = {"MODEL_FAMILY": "gpt2", "LORA_ENABLED": "true"}
    with pytest.raises(UserError, match=r"LORA_TARGET_MODULES has \['wq'.*expected names from c_attn c_fc c_proj"):
        config.load_config(None, lora_on, use_environ=False)
    ok = config.load_config(None, {**lora_on, "LORA_TARGET_MODULES": "c_attn,c_proj,c_fc"}, use_environ=False)
    assert ok.lora.lora_target_modules == ["c_attn", "c_proj", "c_fc"]
    with pytest.raises(UserError, match=r"LORA_TARGET_MODULES has \['c_attn'\].*MODEL_FAMILY=llama"):
        config.load_config(None, {"LORA_TARGET_MODULES": "c_attn"}, use_environ=False)


def test_family_registry_round_trips_model_args():
    g = GPT2Args(dim=32, n_layers=1, n_heads=4, vocab_size=50, max_seq_len=16, dropout=0.1)
    assert families.args_from_dict(g.to_dict()) == g and families.of_args(g).name == "gpt2"
    from model import ModelArgs

    m = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=50)
    assert families.args_from_dict(m.to_dict()) == m and families.of_args(m).name == "llama"
    assert families.for_hf_model_type("gpt2") is families.FAMILIES["gpt2"]
    assert families.for_hf_model_type("mixtral") is families.FAMILIES["llama"]


# ---- the loop ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pretrain_resume_and_export_with_model_family_gpt2(tmp_path):
    """MODEL_PRESET=gpt2-debug (dropout 0.1) through train.py: the loss falls, a run resumed from its step-2
    checkpoint equals the uninterrupted one (dropout draws included), and the final checkpoint exports (one
    tensor at a time) to a directory transformers' GPT2LMHeadModel loads with the checkpoint's logits."""
    from helpers import make_pretrain_data, run_inprocess, train_losses
    from transformers import GPT2LMHeadModel

    import checkpoint as ckpt
    from model_utils import export_hf_from_checkpoint

    data = make_pretrain_data(tmp_path / "data", n_docs=120)
    common = dict(MODEL_PRESET="gpt2-debug", MAX_STEPS=4, SAVE_EVERY_X_STEPS=2, VALIDATE_EVERY_X_STEPS=2)
    straight = train_losses(run_inprocess(tmp_path / "a", data, **common))
    assert straight[4] < straight[1]
    step2 = tmp_path / "a" / "ck" / "pretrain" / "step_0000002"
    resumed = train_losses(run_inprocess(tmp_path / "b", data, "--pretrain_checkpoint", str(step2), **common))
    assert sorted(resumed) == [3, 4]
    for s in resumed:
        assert resumed[s] == pytest.approx(straight[s], abs=1e-6), s
    final = tmp_path / "a" / "ck" / "pretrain" / "step_0000004"
    wa, wb = ckpt.read_model_tensors(final), ckpt.read_model_tensors(tmp_path / "b" / "ck" / "pretrain" / "step_0000004")
    assert "lm_head.weight" not in wa  # the tied head is stored once, as wte
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)

    model, args = load_model(final)
    assert isinstance(model, GPT2) and args.dropout == 0.1 and args.max_seq_len == 64
    out = export_hf_from_checkpoint(final, tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    tokens = torch.randint(0, args.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max().item() < 1e-4


@pytest.mark.parametrize("compile", [False, True])
def test_greedy_generation_equals_transformers_generate(tmp_path, compile):
    """generate.generate (prefill + decode_step over the KV cache, eager and compiled) on an HF GPT-2 loaded through
    load_model gives the tokens GPT2LMHeadModel.generate gives greedily; a prompt + new tokens longer than
    n_positions is refused."""
    from generate import generate

    hf = hf_gpt2(SHAPES[0], seed=5)
    hf.save_pretrained(tmp_path / "hf")
    model, _ = load_model(tmp_path / "hf")
    prompt = torch.randint(1, 97, (1, 7), generator=torch.Generator().manual_seed(2))
    ours = generate(model, [prompt[0].tolist()], max_new_tokens=12, compile=compile)
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == [ref[0, 7:].tolist()]
    with pytest.raises(UserError, match="longer than this GPT-2 model's 32 learned positions"):
        generate(model, [prompt[0].tolist()], max_new_tokens=26)
    with pytest.raises(UserError, match="int8=True .* bias-free linear layers"):
        generate(model, [prompt[0].tolist()], max_new_tokens=2, int8=True)


def test_the_objectives_call_gpt2_with_labels_for_the_fused_loss():
    """The training objectives hand a GPT-2 model its labels (the fused head and loss of fused_ce), as they do
    the Transformer, instead of asking it for (B, T, V) logits."""
    import objectives

    model = GPT2(GPT2Args(dim=32, n_layers=1, n_heads=4, vocab_size=50, max_seq_len=16))
    assert objectives.is_ours(model)
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
    rows = objectives.response_logps(model, ids, labels)
    logp = torch.log_softmax(model(ids).float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).sum(1)
    assert torch.allclose(rows, logp, atol=1e-5)


def test_lora_on_gpt2_loads_in_peft_with_fan_in_fan_out(tmp_path):
    """LoRA on GPT-2's c_attn / c_proj / c_fc: the adapter in PEFT's format (fan_in_fan_out for HF's Conv1D) on the
    HF export of the base gives, in peft, the logits of our unmerged model, and our merged model equals both; the
    adapter loads back into a fresh GPT-2."""
    import json

    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    import lora

    args = GPT2Args(dim=32, n_layers=2, n_heads=4, vocab_size=50, max_seq_len=16)
    model = GPT2(args)
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match=r"valid names are \['c_attn', 'c_fc', 'c_proj'\]"):
        lora.apply_lora(model, ["wq"], rank=4, alpha=8.0)
    lora.apply_lora(model, list(lora.GPT2_TARGETS), rank=4, alpha=8.0)
    assert len(list(lora.lora_modules(model))) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".lora_b"):
                p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    model.eval()
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
    lora.save_peft_adapter(model, tmp_path / "adapter")
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert conf["fan_in_fan_out"] is True and conf["target_modules"] == ["c_attn", "c_fc", "c_proj"]

    fresh = GPT2(args)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if not lora.is_adapter(k)}, strict=False)
    lora.load_peft_adapter(fresh, tmp_path / "adapter")
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(tokens), ours)

    lora.unload_lora(model, merge=False)
    export_hf(model, args, tmp_path / "base")
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        theirs = peft_model.eval()(tokens).logits
        assert (theirs - ours).abs().max().item() < 1e-4
        lora.unload_lora(fresh, merge=True)
        assert (fresh(tokens) - ours).abs().max().item() < 1e-4


def test_hellaswag_scores_gpt2_with_shared_context_rows(monkeypatch):
    """HellaSwag's tree rows (each context once for its 4 endings, attn_mask + positions, the head on the scored
    positions only) serve GPT-2 as they serve the Transformer, with the numbers of the 4 full rows."""
    from test_hellaswag import GOLDEN, ByteTokenizer

    import hellaswag_utils as hs

    model = GPT2(GPT2Args(dim=32, n_layers=2, n_heads=4, vocab_size=264, max_seq_len=512))
    model.init_weights(std=0.3, generator=torch.Generator().manual_seed(0))
    model.eval()
    tok, exs = ByteTokenizer(), hs.load_examples(GOLDEN)
    full = hs.evaluate(model, tok, exs, batch_size=2, progress=False, shared_context=False)

    def refuse(*a, **k):
        raise AssertionError("full rows scored")

    monkeypatch.setattr(hs, "score_batch", refuse)
    tree = hs.evaluate(model, tok, exs, batch_size=2, progress=False)
    assert tree == full and full["n"] == len(exs)


def test_what_gpt2_does_not_support_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    import sys

    import model_utils
    from model_formats import export_meta

    args = GPT2Args(dim=32, n_layers=1, n_heads=4, vocab_size=50, max_seq_len=16)
    with pytest.raises(UserError, match="GPT-2 model in Meta's Llama format: use --format hf"):
        export_meta(GPT2(args), args, tmp_path / "meta")
    assert not (tmp_path / "meta").exists()
    monkeypatch.setattr(sys, "argv", ["model_utils.py", "plan", "--preset", "gpt2-124m", "--gpus", "8"])
    with pytest.raises(UserError, match="gpt2-124m is a gpt2 model; the memory plan models the llama family"):
        model_utils.main()


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_gpt2_two_processes_match_one(tmp_path, fsdp):
    """MODEL_FAMILY=gpt2 under DDP and FSDP2 (the meta-device build filled shard by shard from init_parameter)
    over 2 gloo processes: the single process's losses and grad norms (dropout off: the ranks draw their own)."""
    from helpers import make_pretrain_data, read_metrics, run_inprocess, torchrun

    data = make_pretrain_data(tmp_path / "data", n_docs=120)
    common = dict(MODEL_PRESET="gpt2-debug", DROPOUT=0.0, MAX_STEPS=3, GRAD_CLIP=0.5, VALIDATE_EVERY_X_STEPS=0,
                  SAVE_EVERY_X_STEPS=0)
    one = {e["step"]: e for e in run_inprocess(tmp_path / "one", data, **common) if "loss" in e}
    (tmp_path / "two").mkdir()
    torchrun(tmp_path / "two", data, 2, USE_FSDP=str(fsdp).lower(), **common)
    two = {e["step"]: e for e in read_metrics(tmp_path / "two" / "run") if "loss" in e}
    assert sorted(two) == [1, 2, 3]
    for s in two:
        assert two[s]["loss"] == pytest.approx(one[s]["loss"], abs=1e-4), s
        assert two[s]["grad_norm"] == pytest.approx(one[s]["grad_norm"], rel=1e-4), s


def test_init_from_an_hf_gpt2_builds_it_and_refuses_a_longer_context(tmp_path):
    """INIT_FROM an HF GPT-2 directory: train.py's builds (whole and FSDP2's meta build) make the GPT-2 it holds
    whatever MODEL_FAMILY says; a MAX_SEQ_LEN beyond its learned positions is refused in one line."""
    import types

    import train

    hf_gpt2(SHAPES[0]).save_pretrained(tmp_path / "hf")
    tok = types.SimpleNamespace(vocab_size=97)
    cfg = config.load_config(None, {"MODEL_PRESET": "debug", "MAX_SEQ_LEN": "32"}, use_environ=False)
    model, margs = train.build_model(cfg, tok, str(tmp_path / "hf"), torch.device("cpu"))
    assert isinstance(model, GPT2) and model.training and margs.max_seq_len == 32
    meta, margs, weights = train.build_meta_model(cfg, tok, str(tmp_path / "hf"))
    assert isinstance(meta, GPT2) and set(weights) == set(meta.state_dict()) - {"lm_head.weight"}
    longer = config.load_config(None, {"MODEL_PRESET": "debug", "MAX_SEQ_LEN": "64"}, use_environ=False)
    for build in (lambda: train.build_model(longer, tok, str(tmp_path / "hf"), torch.device("cpu")),
                  lambda: train.build_meta_model(longer, tok, str(tmp_path / "hf"))):
        with pytest.raises(UserError, match="MAX_SEQ_LEN=64 but INIT_FROM=.* has 32 learned positions: set MAX_SEQ_LEN <= 32"):
            build()
