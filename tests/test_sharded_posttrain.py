"""LoRA and DPO (a frozen copy of the starting model as reference) under FSDP2 on 2 gloo ranks: built on the
meta device (no rank builds the whole model) with no DTensor gathered, each rank holding half of the policy's and of the reference's
parameters, and the losses of one process that builds the whole model. The frozen LoRA base held in bf16
under bf16 autocast gives the fp32 base's forward to the bit."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ROOT, make_parent, read_metrics, run_inprocess, torchrun, train_losses

import config
import lora
import precision
import train
from model import Transformer

NO_GATHER_BUILD = ROOT / "tests" / "build_without_gathers.py"


def _two_ranks_equal_one(tmp_path, data, **kw) -> list[dict]:
    ref = train_losses(run_inprocess(tmp_path / "one", data, **kw))
    (tmp_path / "two").mkdir()
    torchrun(tmp_path / "two", data, 2, USE_FSDP="true", script=NO_GATHER_BUILD, **kw)
    got = train_losses(read_metrics(tmp_path / "two" / "run"))
    assert sorted(got) == sorted(ref) == [1, 2, 3]
    for s in ref:
        assert got[s] == pytest.approx(ref[s], abs=1e-4), (s, got, ref)
    return [json.loads((tmp_path / "two" / "run" / f"build_rank{r}.json").read_text()) for r in range(2)]


def _holds_half(module: dict) -> None:
    assert module["local_numel"] * 2 == module["total_numel"], module  # debug dims split evenly over 2 ranks


@pytest.mark.slow
def test_fsdp2_lora_builds_sharded_and_equals_one_process(tmp_path, pretrain_data):
    parent = make_parent(tmp_path / "parent")
    records = _two_ranks_equal_one(tmp_path, pretrain_data, MAX_STEPS=3, VALIDATE_EVERY_X_STEPS=0,
                                   SAVE_CHECKPOINTS="false", INIT_FROM=parent, LORA_ENABLED="true",
                                   LORA_DROPOUT=0, MAX_LR=1e-2)  # dropout masks depend on the world size
    for r in records:
        _holds_half(r["policy"])
        assert r["policy"]["trained_dtypes"] == ["torch.float32"]  # the adapters, drawn on every rank alike


@pytest.mark.slow
def test_fsdp2_dpo_reference_is_sharded_and_equals_one_process(tmp_path, dpo_data):
    parent = make_parent(tmp_path / "parent")
    records = _two_ranks_equal_one(tmp_path, dpo_data, TRAINING_STAGE="dpo", DPO_DATALOADER_ROOT_PATH=dpo_data,
                                   DPO_SAVE_CHECKPOINTS_PATH=tmp_path / "ck", MAX_STEPS=3,
                                   VALIDATE_EVERY_X_STEPS=0, SAVE_CHECKPOINTS="false", INIT_FROM=parent,
                                   MAX_LR=1e-2)
    for r in records:
        _holds_half(r["policy"])
        _holds_half(r["reference"])
        assert r["reference"]["trained_dtypes"] == []


@pytest.mark.slow
def test_fsdp2_bf16_dpo_reference_computes_as_the_policy(tmp_path, dpo_data):
    """Under bf16 FSDP2 gathers the policy's parameters in bf16; the sharded reference must gather and compute
    the same way, so at step 1 (policy = reference) every log-ratio is 0 and the DPO loss is exactly ln 2."""
    import math

    parent = make_parent(tmp_path / "parent")
    torchrun(tmp_path, dpo_data, 2, USE_FSDP="true", TRAINING_PRECISION="bf16", TRAINING_STAGE="dpo",
             DPO_DATALOADER_ROOT_PATH=dpo_data, DPO_SAVE_CHECKPOINTS_PATH=tmp_path / "ck", MAX_STEPS=1,
             VALIDATE_EVERY_X_STEPS=0, SAVE_CHECKPOINTS="false", INIT_FROM=parent)
    first = [e for e in read_metrics(tmp_path / "run") if "loss" in e][0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-6), first


def test_lora_adapters_are_drawn_by_name_as_the_sharded_build_draws_them():
    """apply_lora on a built model and materialize_model on a meta model give the same adapters (and base)."""
    cfg = config.load_config(str(ROOT / "configs" / "debug.env"), {"LORA_ENABLED": "true"}, use_environ=False)
    margs = cfg.model_args(8448)
    built = Transformer(margs)
    built.init_weights(generator=torch.Generator().manual_seed(5))
    train.apply_lora(cfg, built, 5)
    with torch.device("meta"):
        meta = Transformer(margs)
    train.apply_lora(cfg, meta, 5)
    train.materialize_model(meta, None, 5, torch.device("cpu"), "")
    got = dict(meta.named_parameters())
    names = [n for n, _ in built.named_parameters() if lora.is_adapter(n)]
    assert names and any(got[n].abs().sum() > 0 for n in names)  # the A matrices are drawn, not zero
    for n, p in built.named_parameters():
        assert torch.equal(got[n], p), n


def test_frozen_lora_base_in_bf16_gives_the_fp32_forward_under_autocast():
    cfg = config.load_config(str(ROOT / "configs" / "debug.env"), {"LORA_ENABLED": "true"}, use_environ=False)
    model = Transformer(cfg.model_args(8448))
    model.init_weights(generator=torch.Generator().manual_seed(1))
    train.apply_lora(cfg, model, 1)
    model.eval()  # no adapter dropout
    with torch.no_grad():
        for _, m in lora.lora_modules(model):
            m.lora_b.normal_(0, 0.02)  # adapters that do something
    ids = torch.randint(0, 8448, (2, 16), generator=torch.Generator().manual_seed(0))
    bf16 = precision.resolve("bf16", torch.device("cpu"))
    with precision.autocast("cpu", torch.bfloat16):
        want = model(ids)
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    train.hold_frozen_base_in(model, bf16)
    with precision.autocast("cpu", torch.bfloat16):
        got = model(ids)
    assert torch.equal(got, want)
    after = sum(p.numel() * p.element_size() for p in model.parameters())
    halved = sum(p.numel() for p in model.parameters() if p.dtype == torch.bfloat16)
    assert halved > 0 and after == before - 2 * halved  # 4 -> 2 bytes per frozen Linear weight
    assert model.tok_embeddings.weight.dtype == torch.float32 and model.norm.weight.dtype == torch.float32
    assert model.layers[0].attention.wq.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in lora.lora_parameters(model))
    fp32 = Transformer(cfg.model_args(8448))
    train.apply_lora(cfg, fp32, 1)
    train.hold_frozen_base_in(fp32, precision.resolve("fp32", torch.device("cpu")))
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}  # only bf16 runs hold the base in bf16


@pytest.mark.slow
def test_lora_with_a_bf16_base_validates_evaluates_and_samples(tmp_path, pretrain_data, capsys):
    """The evaluation hooks run on the bf16-held base too (sampling under the run's autocast, its KV cache in the
    autocast dtype)."""
    hs = ROOT / "tests" / "fixtures" / "hellaswag_golden.jsonl"
    m = run_inprocess(tmp_path, pretrain_data, MAX_STEPS=2, VALIDATE_EVERY_X_STEPS=2, SAVE_CHECKPOINTS="false",
                      LORA_ENABLED="true", TRAINING_PRECISION="bf16", GENERATE_EVERY_X_STEPS=2, MAX_TEST_GEN_LEN=4,
                      HELLASWAG_EVERY_X_STEPS=2, HELLASWAG_PATH=hs, HELLASWAG_NUMBER_OF_EXAMPLES=4)
    assert any("val_loss" in e for e in m) and any("hellaswag_acc_norm" in e for e in m)
    assert "sample |" in capsys.readouterr().out
