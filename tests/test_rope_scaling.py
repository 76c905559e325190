"""Llama 3 RoPE scaling as the published Hugging Face configs state it: logits equal transformers'
LlamaForCausalLM with each published rope_scaling, at positions far enough out that the factor matters; a
Meta params.json with `use_scaled_rope` and no factor gets 32 for the Llama 3.2 1B/3B shapes and 8 otherwise,
says where the factor came from, and ROPE_SCALING_FACTOR overrides it."""

from __future__ import annotations

import json

import pytest
import torch
from test_model import hf_config, random_hf_model

import config
from model_formats import meta_rope_scaling
from model_utils import export_meta, load_model
from settings_table import PRESETS

# rope_scaling of the config.json files published on the hub (meta-llama/Llama-3.2-1B, -3B, Llama-3.1-8B)
PUBLISHED = {
    "llama3.2-1b": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                    "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "llama3.2-3b": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                    "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "llama3.1-8b": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                    "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}
# Meta's params.json of the same models: use_scaled_rope, no factor
META_PARAMS = {
    "llama3.2-1b": {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                    "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0,
                    "use_scaled_rope": True},
    "llama3.2-3b": {"dim": 3072, "n_layers": 28, "n_heads": 24, "n_kv_heads": 8, "vocab_size": 128256,
                    "ffn_dim_multiplier": 1.0, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0,
                    "use_scaled_rope": True},
    "llama3.1-8b": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                    "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "norm_eps": 1e-05, "rope_theta": 500000.0,
                    "use_scaled_rope": True},
}
# RoPE is relative: what the factor changes is the angle between tokens far apart. 24 tokens placed 360
# positions apart span 0..8280 (past the 8192-token original context) and stay small enough for fp32
# angles to agree between the two implementations.
POSITIONS = (torch.arange(24) * 360).expand(2, 24)


def _hf_tiny(name: str):
    # head_dim 16 and theta 5e5: three of the eight frequencies have wavelengths beyond 8192 (scaled by the
    # factor), one lies in the interpolated band
    return random_hf_model(hf_config(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                     rope_theta=500000.0, max_position_embeddings=131072,
                                     rope_scaling=dict(PUBLISHED[name])))


def _logits(model, hf: bool) -> torch.Tensor:
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(tokens, position_ids=POSITIONS).logits if hf else model(tokens, positions=POSITIONS)


def _as_meta_without_factor(model, args, out):
    export_meta(model, args, out)
    (out / "model_args.json").unlink()  # a plain Meta download: params.json and the weights only
    params = json.loads((out / "params.json").read_text())
    params.pop("rope_scaling_factor")
    (out / "params.json").write_text(json.dumps(params))
    return out


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_rope_scaling_logits_equal_transformers_far_out(name, tmp_path, capsys):
    hf = _hf_tiny(name)
    hf.save_pretrained(tmp_path / "hf")
    ours, args = load_model(tmp_path / "hf")
    # the frequencies transformers derives from the config's rope_scaling are ours
    torch.testing.assert_close(ours.inv_freq, hf.model.rotary_emb.inv_freq.float(), rtol=1e-6, atol=0)
    ref = _logits(hf, hf=True)
    assert (_logits(ours, hf=False) - ref).abs().max().item() < 1e-4
    # the factor matters at these positions: the other published factor gives clearly different logits
    other = 8.0 if PUBLISHED[name]["factor"] == 32.0 else 32.0
    meta = _as_meta_without_factor(ours, args, tmp_path / "meta")
    wrong, _ = load_model(meta, rope_scaling_factor=other)
    assert (_logits(wrong, hf=False) - ref).abs().max().item() > 0.1
    # a Meta dir without a factor, with the factor given by the setting, is the published model again
    right, rargs = load_model(meta, rope_scaling_factor=PUBLISHED[name]["factor"])
    assert rargs.rope_scaling == {k: v for k, v in PUBLISHED[name].items() if k != "rope_type"}
    assert (_logits(right, hf=False) - ref).abs().max().item() < 1e-4
    assert f"factor {PUBLISHED[name]['factor']:g} (from ROPE_SCALING_FACTOR" in capsys.readouterr().err


@pytest.mark.parametrize("name", META_PARAMS)
def test_meta_params_without_factor_take_the_published_configs_factor(name):
    scaling, source = meta_rope_scaling(META_PARAMS[name])
    assert scaling == {k: v for k, v in PUBLISHED[name].items() if k != "rope_type"}
    assert scaling == PRESETS[name]["ROPE_SCALING"]  # the presets of the same models agree
    assert ("shape (dim" in source) == name.startswith("llama3.2")
    assert meta_rope_scaling({**META_PARAMS[name], "rope_scaling_factor": 16})[0]["factor"] == 16.0
    assert meta_rope_scaling(META_PARAMS[name], 4.0) == ({**scaling, "factor": 4.0}, "ROPE_SCALING_FACTOR")
    assert meta_rope_scaling({**META_PARAMS[name], "use_scaled_rope": False}) == (None, "")


def test_meta_dir_load_prints_the_factor_and_where_it_came_from(tmp_path, capsys):
    hf = _hf_tiny("llama3.1-8b")
    hf.save_pretrained(tmp_path / "hf")
    ours, args = load_model(tmp_path / "hf")
    meta = _as_meta_without_factor(ours, args, tmp_path / "meta")
    capsys.readouterr()
    _, largs = load_model(meta)
    err = capsys.readouterr().err
    assert largs.rope_scaling["factor"] == 8.0
    assert f"{meta}: Llama 3 RoPE scaling factor 8 (from no factor in params.json" in err
    assert "ROPE_SCALING_FACTOR overrides it" in err


def test_rope_scaling_factor_setting_reaches_the_loader():
    cfg = config.load_config(None, {"ROPE_SCALING_FACTOR": "32"}, use_environ=False)
    assert cfg.model.rope_scaling_factor == 32.0
    with pytest.raises(config.UserError, match="ROPE_SCALING_FACTOR"):
        config.load_config(None, {"ROPE_SCALING_FACTOR": "-1"}, use_environ=False)
