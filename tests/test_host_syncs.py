"""Host syncs in a training step: one optimizer step of dense pretraining, SFT, DPO and MoE pretraining through
train.optimizer_step, under SyncCounter, a TorchDispatchMode that models where a CUDA run would wait for the
device. It tracks which tensors would live on the device (the model's parameters and buffers, the batch as
objectives.batch_to_device moves it, and everything computed from them or created by a factory inside the
step) and counts, on those tensors only:
  - ops that read a value on the host: aten._local_scalar_dense (.item(), int(), bool(), float()), aten.equal;
  - ops whose output shape depends on values: nonzero, masked_select, boolean indexing (index / index_put with
    a bool index), bincount, unique, repeat_interleave without output_size;
  - device-to-host reads: .tolist(), .numpy(), .cpu() (on CPU these dispatch no op, so they are counted by
    wrapping the Tensor methods).
Distillation and DPO run with their frozen model live and from its cache (looked up by sample_index, which
stays on the host). With 4 micro-steps per optimizer step, a sync in every micro-step would count at least 4. The step's one
deliberate sync is the read of the loss, metrics and gradient norm together (train.optimizer_step); the unit
count is summed over ranks as host numbers (distributed.sum_floats, over the CPU group: no device tensor)."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TOKENIZER, make_parent, settings
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import config
import distributed as D
import objectives
import train

PER_STEP = 1  # the loss / metrics / grad-norm read (see the module docstring)

SHAPE_FROM_VALUES = {"nonzero", "masked_select", "bincount", "_unique", "_unique2", "unique_dim",
                     "unique_consecutive"}
HOST_READS = {"_local_scalar_dense", "equal"}


class SyncCounter(TorchDispatchMode):
    def __init__(self, device_tensors: list[torch.Tensor]):
        super().__init__()
        self.device: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> tensor
        self.events: list[str] = []
        self.mark(device_tensors)

    def on_device(self, t: object) -> bool:
        return isinstance(t, torch.Tensor) and self.device.get(id(t)) is t

    def mark(self, tensors) -> None:
        for t in tree_leaves(tensors):
            if isinstance(t, torch.Tensor):
                self.device[id(t)] = t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        from_device = any(self.on_device(t) for t in inputs)
        name = func.overloadpacket.__name__
        if from_device:
            bool_index = name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in tree_leaves(args[1]))
            unsized = name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) < 4
            if name in SHAPE_FROM_VALUES or name in HOST_READS or bool_index or unsized:
                self.events.append(str(func))
        out = func(*args, **kwargs)
        # computed from device tensors, or made inside the step: a factory, or torch.tensor(data, device=...)
        if from_device or not inputs or name in ("lift_fresh", "lift_fresh_copy"):
            self.mark(out)
        return out


def counted_step(run: train.Run, monkeypatch) -> list[str]:
    """The sync events of one train.optimizer_step (its batches drawn before, on the host, as the loader does)."""
    batches = [run.train_loader.next_batch() for _ in range(run.accum)]
    monkeypatch.setattr(run.train_loader, "next_batch", lambda: batches.pop(0))
    tensors = [*run.model.parameters(), *run.model.buffers()]
    for helper in (getattr(run.objective, "reference", None), getattr(run.objective, "teacher", None)):
        if helper is not None:
            tensors += [*helper.parameters(), *helper.buffers()]
    counter = SyncCounter(tensors)
    to_device = objectives.batch_to_device

    def moved(batch, device):
        out = to_device(batch, device)
        counter.mark([v for k, v in out.items() if k not in objectives.HOST_KEYS])
        return out

    monkeypatch.setattr(objectives, "batch_to_device", moved)
    for method in ("tolist", "numpy", "cpu"):
        real = getattr(torch.Tensor, method)

        def read(t, *a, _real=real, _name=method, **k):
            if counter.on_device(t):
                counter.events.append(f"Tensor.{_name}")
            return _real(t, *a, **k)

        monkeypatch.setattr(torch.Tensor, method, read)
    with counter:
        train.optimizer_step(run, train.SpikeGuard(0.0, 4))
    return counter.events


@pytest.fixture(scope="module")
def data(tmp_path_factory, pretrain_data) -> dict[str, Path]:
    import data_preparation_utils as dpu
    import demo_data
    import tokenizer
    from load_dpo_dataset import DPOEncoder
    from load_instruct_dataset import SFTEncoder

    tok = tokenizer.load_tokenizer(TOKENIZER)
    root = tmp_path_factory.mktemp("syncs")
    kw = dict(tokenizer_identity=tok.identity(), seed=0, val_fraction=0.0, shard_size=1 << 20, workers=1,
              progress=False)
    dpu.prepare("sft", demo_data.demo_instruct_set(300, modules=False)[:40], root / "sft", SFTEncoder(tok, "", 0, 64),
                source="demo chats", **kw)
    dpu.prepare("dpo", demo_data.demo_preference_set(max_chars=100), root / "dpo", DPOEncoder(tok, "", 64),
                source="demo pairs", **kw)
    parent = make_parent(root / "parent")
    # the frozen models' outputs cached by sample_index (objectives.build_cache, as the CLI runs it)
    base = str(ROOT / "configs" / "debug.env")
    objectives.build_cache("reference", config.load_config(base, {"TRAINING_STAGE": "dpo"}, use_environ=False),
                           str(parent), str(root / "dpo"), str(root / "ref_cache"))
    objectives.build_cache("teacher", config.load_config(base, {"DISTILLATION_TEMPERATURE": "2.0"}, use_environ=False),
                           str(parent), str(pretrain_data), str(root / "teacher_cache"), top_k=8)
    return {"pretrain": pretrain_data, "sft": root / "sft", "dpo": root / "dpo", "parent": parent,
            "ref_cache": root / "ref_cache", "teacher_cache": root / "teacher_cache"}


def stage(kind: str, data: dict[str, Path]) -> dict:
    return {"pretrain": {},
            "sft": dict(TRAINING_STAGE="instruct", INSTRUCT_DATALOADER_ROOT_PATH=data["sft"], INIT_FROM=data["parent"]),
            "dpo": dict(TRAINING_STAGE="dpo", DPO_DATALOADER_ROOT_PATH=data["dpo"], INIT_FROM=data["parent"]),
            "dpo_cached": dict(TRAINING_STAGE="dpo", DPO_DATALOADER_ROOT_PATH=data["dpo"], INIT_FROM=data["parent"],
                               DPO_REFERENCE_LOGPS_PATH=data["ref_cache"]),
            "distill": dict(IS_MODEL_DISTILLATION="true", TEACHER_MODEL_CHECKPOINT=data["parent"]),
            "distill_cached": dict(IS_MODEL_DISTILLATION="true", TEACHER_CACHE_PATH=data["teacher_cache"],
                                   DISTILLATION_TEMPERATURE=2.0),
            "moe": dict(MOE_NUM_EXPERTS=4, MOE_TOP_K=2),
            "moe_capacity": dict(MOE_NUM_EXPERTS=4, MOE_TOP_K=2, MOE_CAPACITY_FACTOR=1.0)}[kind]


@pytest.mark.parametrize("kind", ["pretrain", "sft", "dpo", "dpo_cached", "distill", "distill_cached", "moe",
                                  "moe_capacity"])
def test_optimizer_step_syncs_only_deliberately(tmp_path, data, kind, monkeypatch):
    # 4 micro-steps of 2 rows each (TOTAL_BATCH_SIZE 512 = 8 rows of 64): a per-micro-step sync counts >= 4
    kw = dict(SAVE_CHECKPOINTS="false", VALIDATE_EVERY_X_STEPS=0, MAX_BATCH_SIZE=2, **stage(kind, data))
    cfg, args = train.parse_args(settings(tmp_path, data["pretrain"], **kw))
    run = train.build_run(cfg, args, D.init_distributed("cpu"))
    assert run.accum == 4
    events = counted_step(run, monkeypatch)
    run.log.close()
    assert len(events) <= PER_STEP, events


def test_the_counter_sees_the_syncs_it_models(monkeypatch):
    w = torch.randn(3, 5)
    counter = SyncCounter([w])
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t, _r=torch.Tensor.tolist: (
        counter.events.append("Tensor.tolist") if counter.on_device(t) else None) or _r(t))
    host = torch.arange(4)
    with counter:
        y = w.sum(0)
        int(host.sum())  # host tensor: not a sync
        float(y[0])
        y[y > 0]
        torch.bincount((w > 0).long().flatten())
        (y > 0).nonzero()
        torch.repeat_interleave(torch.arange(5), (w[0] > 0).long())
        y.tolist()
        torch.zeros(5).index_add_(0, (w[0] > 0).long(), torch.ones(5))  # fixed shapes: not a sync
    assert [e.split(".")[1] if e.startswith("aten.") else e for e in counter.events] == [
        "_local_scalar_dense", "index", "bincount", "nonzero", "repeat_interleave", "Tensor.tolist"]
