"""A run started from other weights records them resolved (a step directory, not a moving `latest`
pointer) with a fingerprint of their values; loading a LoRA checkpoint or resuming a run onto weights that
changed since is refused in one line, unless the base is passed explicitly."""

from __future__ import annotations

import pytest
import torch
from helpers import run_inprocess, shift_model_weights

import checkpoint as ckpt
import model_utils
from errors import UserError

BASE = dict(VALIDATE_EVERY_X_STEPS=0, SAVE_EVERY_X_STEPS=2, MAX_NUMBER_CHECKPOINTS=5)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(1, 17)[None])


def test_lora_checkpoint_keeps_its_base_when_latest_moves_and_refuses_a_changed_base(tmp_path, pretrain_data):
    base_dir = tmp_path / "base"
    run_inprocess(base_dir, pretrain_data, MAX_STEPS=2, **BASE)
    base_step = base_dir / "ck" / "pretrain" / ckpt.step_name(2)
    lora_dir = tmp_path / "lora"
    lora_kw = dict(INIT_FROM=str(base_dir / "ck" / "pretrain" / "latest"), LORA_ENABLED="true", **BASE)
    run_inprocess(lora_dir, pretrain_data, MAX_STEPS=2, **lora_kw)
    adapters = lora_dir / "ck" / "pretrain" / ckpt.step_name(2)
    recorded = ckpt.read_json(adapters / ckpt.CONFIG_FILE)["base_model"]
    assert recorded["source"] == str(base_step) and len(recorded["fingerprint"]) == 64
    before = _logits(model_utils.load_model(adapters)[0])

    run_inprocess(base_dir, pretrain_data, MAX_STEPS=4, **BASE)  # the base run continues: `latest` moves on
    assert ckpt.latest_name(base_dir / "ck" / "pretrain") == ckpt.step_name(4)
    torch.testing.assert_close(_logits(model_utils.load_model(adapters)[0]), before, rtol=0, atol=0)

    shift_model_weights(base_step, 0.01)  # the recorded base itself is overwritten with other values
    with pytest.raises(UserError, match=r"was started from .*step_0000002 .* now holds other weights"):
        model_utils.load_model(adapters)
    for init_from in (lora_kw["INIT_FROM"], ""):  # the same command again (a `latest` now elsewhere), or none
        with pytest.raises(UserError, match="now holds other weights"):
            run_inprocess(lora_dir, pretrain_data, MAX_STEPS=4, **{**lora_kw, "INIT_FROM": init_from})
    changed = _logits(model_utils.load_model(adapters, lora_base=str(base_step))[0])  # explicit: accepted
    assert (changed - before).abs().max() > 1e-3
    m = run_inprocess(lora_dir, pretrain_data, MAX_STEPS=3, **{**lora_kw, "INIT_FROM": str(base_step)})
    assert max(e["step"] for e in m if "loss" in e) == 3


def test_a_relative_init_from_is_recorded_absolute(tmp_path, pretrain_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_inprocess(tmp_path / "base", pretrain_data, MAX_STEPS=2, **BASE)
    lora_dir = tmp_path / "lora"
    run_inprocess(lora_dir, pretrain_data, MAX_STEPS=2, INIT_FROM="base/ck/pretrain/latest", LORA_ENABLED="true",
                  **BASE)
    adapters = lora_dir / "ck" / "pretrain" / ckpt.step_name(2)
    recorded = ckpt.read_json(adapters / ckpt.CONFIG_FILE)["base_model"]["source"]
    assert recorded == str(tmp_path / "base" / "ck" / "pretrain" / ckpt.step_name(2))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert model_utils.load_model(adapters)[0] is not None  # the base is found from any directory
