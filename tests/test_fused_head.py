"""The LM head fused with the loss under every wrapping: a training step of pretraining, SFT and DPO never
allocates a (rows, T, V) logits tensor, bare, with compiled blocks, under DDP and under FSDP2 (2 gloo ranks),
and its losses equal the unfused path's (full logits + losses.py). The watch is tests/fused_head_worker.py's
LogitsWatch (a TorchDispatchMode over every op of train.optimizer_step); the unfused run shows it sees logits."""

from __future__ import annotations

import json
from pathlib import Path

import fused_head_worker as worker
import pytest
from helpers import ROOT, TOKENIZER, make_parent, settings, torchrun

COMMON = dict(SAVE_CHECKPOINTS="false", VALIDATE_EVERY_X_STEPS=0, MAX_STEPS=2)
T = 64


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    import data_preparation_utils as dpu
    import demo_data
    import tokenizer
    from load_instruct_dataset import SFTEncoder

    tok = tokenizer.load_tokenizer(TOKENIZER)
    out = tmp_path_factory.mktemp("sft") / "sft"
    dpu.prepare("sft", demo_data.demo_instruct_set(300, modules=False)[:40], out, SFTEncoder(tok, "", 0, T),
                tokenizer_identity=tok.identity(), source="demo chats", seed=0, val_fraction=0.0, shard_size=1 << 20,
                workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory, pretrain_data, sft_data, dpo_data) -> dict[str, Path]:
    return {"pretrain": pretrain_data, "instruct": sft_data, "dpo": dpo_data,
            "parent": make_parent(tmp_path_factory.mktemp("parent") / "parent")}


def stage_settings(stage: str, data: dict[str, Path]) -> dict:
    """The stage's settings; post-training stages start from a parent checkpoint."""
    if stage == "instruct":
        return dict(TRAINING_STAGE="instruct", INSTRUCT_DATALOADER_ROOT_PATH=data["instruct"], INIT_FROM=data["parent"])
    if stage == "dpo":
        return dict(TRAINING_STAGE="dpo", DPO_DATALOADER_ROOT_PATH=data["dpo"], DPO_BETA=0.1, INIT_FROM=data["parent"])
    return {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> dict[str, dict]:
    """The unfused path in one process, per stage: its losses, and the logits the watch saw."""
    out = {}
    for stage in ("pretrain", "instruct", "dpo"):
        tmp = tmp_path_factory.mktemp(f"unfused_{stage}")
        kw = {**COMMON, **stage_settings(stage, data)}
        out[stage] = worker.run_steps(settings(tmp, data["pretrain"], **kw), unfused=True)
    return out


@pytest.mark.parametrize("stage", ["pretrain", "instruct", "dpo"])
@pytest.mark.parametrize("compiled", [False, True])
def test_one_process_step_has_no_full_logits_and_the_unfused_losses(tmp_path, data, reference, stage, compiled):
    ref = reference[stage]
    assert ref["logits"], "the watch must see the unfused path's logits"
    kw = {**COMMON, **stage_settings(stage, data), "USE_TORCH_COMPILE": str(compiled).lower()}
    got = worker.run_steps(settings(tmp_path, data["pretrain"], **kw), unfused=False)
    assert got["logits"] == []
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "dpo"])
@pytest.mark.parametrize("fsdp", [False, True])
def test_two_ranks_step_has_no_full_logits_and_the_unfused_losses(tmp_path, data, reference, stage, fsdp):
    """DDP and FSDP2 over 2 gloo ranks, each rank a micro-batch of the same global batch: the same losses as
    the unfused single process (the loss is the step's mean over all ranks' units)."""
    kw = {**COMMON, **stage_settings(stage, data), "USE_FSDP": str(fsdp).lower()}
    torchrun(tmp_path, data["pretrain"], 2, script=ROOT / "tests" / "fused_head_worker.py", **kw)
    for rank in (0, 1):
        got = json.loads((tmp_path / "run" / f"fused_rank{rank}.json").read_text())
        assert got["logits"] == [], rank
        assert got["losses"] == pytest.approx(reference[stage]["losses"], rel=1e-5), rank
