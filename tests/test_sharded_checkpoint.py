"""Sharded checkpoints (torch.distributed.checkpoint, safetensors storage): every rank writes its own shard and
nothing is gathered (DTensor.full_tensor and .redistribute refused during saves; bytes per rank ~1/N); a checkpoint written by N
ranks resumes on M (2 -> 1, 4 -> 2, 1 -> 2, FSDP2) with the losses of the uninterrupted run; loading never
unpickles; kill -9 inside a sharded save leaves `latest` on a complete checkpoint; an async save is published
only once written; the HF export of a sharded checkpoint is written one tensor at a time and gives
transformers the same logits."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import pytest
import torch
from helpers import (
    ROOT,
    model_shards,
    read_metrics,
    run_inprocess,
    settings,
    subprocess_env,
    torchrun,
    train_losses,
)

import checkpoint as ckpt
import model_utils
from errors import UserError
from model import ModelArgs, Transformer

# 8 sequences per step as micro-batches of 2: the same steps on 1, 2 or 4 ranks; clipping active (norm ~1)
COMMON = dict(MAX_STEPS=5, GRAD_CLIP=0.5, VALIDATE_EVERY_X_STEPS=0, SAVE_EVERY_X_STEPS=3, MAX_NUMBER_CHECKPOINTS=3,
              MAX_BATCH_SIZE=2)
NO_GATHER = ROOT / "tests" / "train_without_gathers.py"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pretrain_data) -> tuple[dict[int, float], Path]:
    """One process, uninterrupted: its losses and its checkpoint dir (steps 3 and 5)."""
    tmp = tmp_path_factory.mktemp("ref")
    losses = train_losses(run_inprocess(tmp, pretrain_data, **COMMON))
    return losses, tmp / "ck" / "pretrain"


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory, pretrain_data) -> tuple[Path, str]:
    """2 ranks, FSDP2, every save with DTensor gathers refused."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    p = torchrun(tmp, pretrain_data, 2, USE_FSDP="true", script=NO_GATHER, **COMMON)
    return tmp, p.stdout


def _assert_losses(got: dict[int, float], ref: dict[int, float], steps) -> None:
    assert sorted(got) == list(steps), got
    for s in steps:
        assert got[s] == pytest.approx(ref[s], abs=1e-4), (s, got[s], ref[s])  # other world size: 1e-4


def _assert_split(step: Path, n: int) -> None:
    """n shard files in model/ and optimizer/, each ~1/n of the bytes: every rank wrote its own part."""
    for sub in ("model", "optimizer"):
        sizes = [f.stat().st_size for f in sorted((step / sub).glob("*.safetensors"))]
        assert len(sizes) == n, (sub, sizes)
        for s in sizes:
            assert abs(s / sum(sizes) - 1 / n) < 0.1 / n, (sub, sizes)
    assert not list(step.rglob(".metadata")) and not list(step.rglob("*.pt"))


@pytest.mark.slow
def test_fsdp2_ranks_write_their_own_shards_without_a_gather(fsdp2_run, reference):
    tmp, out = fsdp2_run
    assert out.count("saved step 3 with DTensor gathers refused") == 2  # both ranks, both saves
    assert out.count("saved step 5 with DTensor gathers refused") == 2
    _assert_losses(train_losses(read_metrics(tmp / "run")), reference[0], range(1, 6))
    step = tmp / "ck" / "pretrain" / "step_0000005"
    _assert_split(step, 2)
    # the two shards together hold each tensor exactly once: the parameter count of the model
    n = sum(t.numel() for _, t in ckpt.iter_model_tensors(step))
    assert n == model_utils.count_parameters(model_utils.load_model(step)[0])


def _no_pickles(monkeypatch) -> None:
    def refuse(*_a, **_kw):
        raise AssertionError("pickle used while loading a checkpoint")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, name, refuse)


@pytest.mark.slow
def test_fsdp2_checkpoint_resumes_in_one_process_without_unpickling(tmp_path, fsdp2_run, reference, pretrain_data,
                                                                   monkeypatch):
    """2 -> 1: the steps after the checkpoint equal the uninterrupted run; the checkpoint's tensors are read
    while pickle and torch.load refuse to run."""
    import train

    loads = []
    for name in ("load_model_weights", "load_optimizer"):
        real = getattr(ckpt, name)

        def guarded(*a, _real=real, **kw):
            with pytest.MonkeyPatch.context() as m:
                _no_pickles(m)
                loads.append(_real.__name__)
                return _real(*a, **kw)

        monkeypatch.setattr(ckpt, name, guarded)
    step3 = fsdp2_run[0] / "ck" / "pretrain" / "step_0000003"
    assert train.main(settings(tmp_path, pretrain_data, **COMMON) + ["--pretrain_checkpoint", str(step3)]) == 0
    assert loads == ["load_model_weights", "load_optimizer"]
    _assert_losses(train_losses(read_metrics(tmp_path / "run")), reference[0], [4, 5])


def test_a_pickle_in_a_shard_is_refused_not_run(tmp_path, reference):
    import shutil

    d = Path(shutil.copytree(reference[1] / "step_0000003", tmp_path / "ck"))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    model_shards(d)[0].write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(UserError, match="not a valid safetensors file"):
        ckpt.load_model_weights(d, Transformer(ModelArgs(**json.loads((d / "config.json").read_text())["model_args"])))
    assert not marker.exists()


@pytest.mark.slow
def test_four_fsdp2_ranks_resume_on_two(tmp_path, pretrain_data, reference):
    (tmp_path / "four").mkdir(), (tmp_path / "two").mkdir()
    torchrun(tmp_path / "four", pretrain_data, 4, USE_FSDP="true", **{**COMMON, "MAX_STEPS": 3}, timeout=400)
    step3 = tmp_path / "four" / "ck" / "pretrain" / "step_0000003"
    _assert_split(step3, 4)
    _assert_losses(train_losses(read_metrics(tmp_path / "four" / "run")), reference[0], [1, 2, 3])
    torchrun(tmp_path / "two", pretrain_data, 2, "--pretrain_checkpoint", str(step3), USE_FSDP="true", **COMMON)
    _assert_losses(train_losses(read_metrics(tmp_path / "two" / "run")), reference[0], [4, 5])


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two_fsdp2_ranks_saving_async(tmp_path, pretrain_data, reference):
    """1 -> 2, and the 2-rank run saves in the background (CHECKPOINT_ASYNC): its step-5 checkpoint is published
    before the run ends and holds the weights of the one-process run's step 5."""
    step3 = reference[1] / "step_0000003"
    torchrun(tmp_path, pretrain_data, 2, "--pretrain_checkpoint", str(step3), USE_FSDP="true",
             CHECKPOINT_ASYNC="true", **COMMON)
    _assert_losses(train_losses(read_metrics(tmp_path / "run")), reference[0], [4, 5])
    root = tmp_path / "ck" / "pretrain"
    assert ckpt.latest_name(root) == "step_0000005" and not list(root.glob(".tmp-*"))
    _assert_split(root / "step_0000005", 2)
    ours = ckpt.read_model_tensors(root / "step_0000005")
    ref = ckpt.read_model_tensors(reference[1] / "step_0000005")
    for k, v in ref.items():
        torch.testing.assert_close(ours[k], v, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_kill9_inside_a_sharded_save_leaves_latest_complete(tmp_path, pretrain_data, reference):
    """Both ranks SIGKILL themselves inside the save of step 5, after their model shards are written: `latest`
    stays on step 3, which resumes (2 -> 1) with the uninterrupted losses."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "train_with_faults.py"), "--kill-in-save", "5:tmp", "--",
           *settings(tmp_path, pretrain_data, USE_FSDP="true", **COMMON)]
    p = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "SIGKILL" in p.stderr, p.stderr[-2000:]
    root = tmp_path / "ck" / "pretrain"
    assert ckpt.latest_name(root) == "step_0000003"
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [3]
    assert len(model_shards(root / ".tmp-step_0000005")) == 2  # the interrupted save, hidden
    resumed = run_inprocess(tmp_path / "one", pretrain_data, "--pretrain_checkpoint", str(root / "step_0000003"),
                            **COMMON)
    _assert_losses(train_losses(resumed), reference[0], [4, 5])


def test_an_async_save_is_published_only_when_written(tmp_path, monkeypatch):
    """The write is held back: Checkpointer.save returns with the state staged, training changes the weights,
    `latest` does not move; once the write is released, Checkpointer.wait publishes the staged (pre-change)
    weights."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    release = threading.Event()
    real_write = HuggingFaceStorageWriter.write_data

    def held_write(self, plan, planner):
        assert release.wait(timeout=60)
        return real_write(self, plan, planner)

    monkeypatch.setattr(HuggingFaceStorageWriter, "write_data", held_write)
    model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=32))
    opt = torch.optim.AdamW(model.parameters())
    root = tmp_path / "pretrain"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(trainer_state={"step": 1}, config={"model_args": model.args.to_dict()})
    checkpointer = ckpt.Checkpointer(root, async_save=True)
    assert checkpointer.save(1, model, opt, **kw) is None
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the next training step, while the save is in flight
    assert checkpointer.poll() and ckpt.latest_name(root) is None and not (root / "step_0000001").exists()
    release.set()
    checkpointer.wait()
    assert ckpt.latest_name(root) == "step_0000001" and not checkpointer.poll()
    saved = ckpt.read_model_tensors(root / "step_0000001")
    for k, v in saved.items():
        assert torch.equal(v, before[k]), k


def test_async_saves_resume_like_sync_ones(tmp_path, pretrain_data, reference):
    run_inprocess(tmp_path / "a", pretrain_data, CHECKPOINT_ASYNC="true", **{**COMMON, "MAX_STEPS": 3})
    root = tmp_path / "a" / "ck" / "pretrain"
    assert ckpt.latest_name(root) == "step_0000003" and not list(root.glob(".tmp-*"))
    resumed = run_inprocess(tmp_path / "b", pretrain_data, "--pretrain_checkpoint", str(root / "step_0000003"),
                            **COMMON)
    for s, v in train_losses(resumed).items():
        assert v == pytest.approx(reference[0][s], abs=1e-6), s


def test_save_refuses_a_plan_with_byte_items(tmp_path):
    with pytest.raises(AssertionError, match="non-tensor"):
        ckpt._dcp_write({"w": torch.zeros(2), "extra": io.BytesIO(b"x")}, tmp_path / "m", async_save=False)


# ---- export ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_hf_export_of_a_sharded_checkpoint_gives_transformers_the_same_logits(tmp_path, fsdp2_run, monkeypatch):
    from transformers import AutoModelForCausalLM

    step = fsdp2_run[0] / "ck" / "pretrain" / "step_0000005"
    monkeypatch.setattr(sys, "argv", ["model_utils.py", "export", "--model", str(step), "--format", "hf",
                                      "--out", str(tmp_path / "hf")])
    monkeypatch.setattr(model_utils, "load_model", None)  # the export never builds the model
    assert model_utils.main() == 0
    monkeypatch.undo()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours, _ = model_utils.load_model(step)
    tokens = torch.randint(0, 8448, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max().item() < 1e-4


def test_hf_export_holds_one_tensor_at_a_time(tmp_path, reference, monkeypatch):
    """Every assembled tensor is released before the one after next is read: memory is a tensor or two, never
    the model."""
    real, alive, most = ckpt.iter_model_tensors, [], [0]

    def watched(path):
        for name, t in real(path):
            alive.append(weakref.ref(t))
            most[0] = max(most[0], sum(r() is not None for r in alive))
            yield name, t
            del t

    monkeypatch.setattr(ckpt, "iter_model_tensors", watched)
    step = reference[1] / "step_0000003"
    out = model_utils.export_hf_from_checkpoint(step, tmp_path / "hf", dtype=torch.bfloat16)
    assert len(alive) == len(ckpt.model_tensor_specs(step)) > 10 and most[0] <= 2
    from safetensors.torch import load_file

    written = load_file(str(out / "model.safetensors"))
    ref = model_formats_hf(step)
    assert written.keys() == ref.keys()
    for k, v in ref.items():
        assert written[k].dtype == torch.bfloat16 and torch.equal(written[k], v.to(torch.bfloat16)), k


def model_formats_hf(step: Path) -> dict[str, torch.Tensor]:
    """The HF state dict of a checkpoint by the whole-dict conversion (independent of the streamed writer)."""
    from model_formats import ours_to_hf

    model, args = model_utils.load_model(step)
    return ours_to_hf({k: v.detach() for k, v in model.state_dict().items()}, args)
