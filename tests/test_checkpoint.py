"""Checkpoints: resume equals not stopping (fp32, 1e-6), --reset-optimizer / --start-step, atomic writes
(a crash inside a save leaves `latest` on the previous complete checkpoint), retention, no pickles,
shape mismatch errors naming the tensor, RNG round trip, model_utils loads our checkpoints."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from helpers import make_pretrain_data, read_metrics, run_inprocess, train_losses
from safetensors.torch import load_file

import checkpoint as ckpt
from errors import UserError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_pretrain_data(tmp_path_factory.mktemp("cdata") / "pretrain")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data):
    """20 steps without stopping, checkpoints every 10 steps (kept: both)."""
    tmp = tmp_path_factory.mktemp("straight")
    m = run_inprocess(tmp, data, MAX_STEPS=20, SAVE_EVERY_X_STEPS=10, VALIDATE_EVERY_X_STEPS=10)
    return tmp, m


@pytest.mark.slow
def test_resume_equals_not_stopping(tmp_path, data, straight):
    tmp, m = straight
    ck = tmp / "ck" / "pretrain" / "step_0000010"
    resumed = run_inprocess(tmp_path, data, "--pretrain_checkpoint", str(ck), MAX_STEPS=20, SAVE_EVERY_X_STEPS=10,
                            VALIDATE_EVERY_X_STEPS=10)
    a, b = train_losses(m), train_losses(resumed)
    assert sorted(b) == list(range(11, 21))
    for s in b:
        assert b[s] == pytest.approx(a[s], abs=1e-6), s
    va = {e["step"]: e["val_loss"] for e in m if "val_loss" in e}
    vb = {e["step"]: e["val_loss"] for e in resumed if "val_loss" in e}
    assert vb == pytest.approx({20: va[20]}, abs=1e-6)
    wa = ckpt.read_model_tensors(tmp / "ck" / "pretrain" / "step_0000020")
    wb = ckpt.read_model_tensors(tmp_path / "ck" / "pretrain" / "step_0000020")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)


def test_resume_by_latest_name_and_start_step(tmp_path, data, straight):
    tmp, _ = straight
    # `latest` in the load root resolves to step 20 == MAX_STEPS: nothing left to do
    m = run_inprocess(tmp_path / "a", data, "--pretrain_checkpoint", "latest", MAX_STEPS=20,
                      PRETRAIN_LOAD_CHECKPOINTS_PATH=tmp / "ck", VALIDATE_EVERY_X_STEPS=0)
    assert train_losses(m) == {}
    # a step name inside the load root + --start-step: the counter restarts at 18 (2 more steps)
    m = run_inprocess(tmp_path / "b", data, "--pretrain_checkpoint", "step_0000010", "--start-step", "18",
                      MAX_STEPS=20, PRETRAIN_LOAD_CHECKPOINTS_PATH=tmp / "ck", VALIDATE_EVERY_X_STEPS=0)
    assert sorted(train_losses(m)) == [19, 20]


def test_reset_optimizer_keeps_weights_only(tmp_path, data, straight):
    tmp, m = straight
    ck = tmp / "ck" / "pretrain" / "step_0000010"
    r = run_inprocess(tmp_path, data, "--pretrain_checkpoint", str(ck), "--reset-optimizer", MAX_STEPS=2,
                      VALIDATE_EVERY_X_STEPS=0, WARMUP_STEPS=0)
    losses = train_losses(r)
    assert sorted(losses) == [1, 2]  # the step counter restarted
    # the weights were kept: the first loss is close to the trained model's, far below ln(vocab) ~ 9.04
    assert losses[1] < train_losses(m)[10] + 0.3 < 8.8


def test_checkpoint_contents_have_no_pickles_and_load_with_model_utils(straight):
    import model_utils

    tmp, _ = straight
    d = tmp / "ck" / "pretrain" / "step_0000020"
    names = sorted(str(p.relative_to(d)) for p in d.rglob("*"))
    shard = "shard-00001-model-00001-of-00001.safetensors"  # one process: one shard per directory
    assert names == ["config.json", "model", f"model/{shard}", "optimizer", "optimizer.json", f"optimizer/{shard}",
                     "trainer_state.json"]
    state = json.loads((d / "trainer_state.json").read_text())
    assert state["step"] == 20 and state["tokens_seen"] == 20 * 512 and state["stage"] == "pretrain"
    assert {"torch", "numpy", "python"} <= set(state["rng_ranks"][0]) and "dataloader" in state
    conf = json.loads((d / "config.json").read_text())
    assert conf["settings"]["MAX_STEPS"] == 20 and conf["model_args"]["dim"] == 64
    assert conf["format_version"] == ckpt.FORMAT_VERSION
    osd = load_file(str(d / "optimizer" / shard))
    assert "state/layers.0.attention.wq.weight/exp_avg" in osd
    model, args = model_utils.load_model(d)
    sd = load_file(str(d / "model" / shard))
    for k, v in sd.items():
        torch.testing.assert_close(model.state_dict()[k], v)


def test_shape_mismatch_names_the_tensor(straight):
    from model import ModelArgs, Transformer

    tmp, _ = straight
    d = tmp / "ck" / "pretrain" / "step_0000020"
    args = ModelArgs(**{**json.loads((d / "config.json").read_text())["model_args"], "n_kv_heads": 4})
    with pytest.raises(UserError, match=r"tensor layers\.0\.attention\.wk\.weight has shape \(32, 64\)"):
        ckpt.load_model_weights(d, Transformer(args))


def test_crash_inside_save_leaves_latest_on_previous(tmp_path, monkeypatch):
    from model import ModelArgs, Transformer

    model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=32))
    opt = torch.optim.AdamW(model.parameters())
    root = tmp_path / "pretrain"
    kw = dict(trainer_state={"step": 1}, config={"model_args": model.args.to_dict()})
    ckpt.save(root, 1, model, opt, **kw)
    real = ckpt.write_json

    def crash(path, obj):
        if path.name == ckpt.STATE_FILE:
            raise OSError("disk full (simulated)")
        real(path, obj)

    monkeypatch.setattr(ckpt, "write_json", crash)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save(root, 2, model, opt, **kw)
    assert (root / "latest").read_text().strip() == "step_0000001"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001"]  # no partial dir left
    assert ckpt.resolve("latest", root) == root / "step_0000001"


def test_retention_keeps_newest_and_best(tmp_path):
    from model import ModelArgs, Transformer

    model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=32))
    root = tmp_path / "pretrain"
    for step, best in [(1, False), (2, True), (3, False), (4, False), (5, False)]:
        ckpt.save(root, step, model, None, trainer_state={"step": step}, config={}, best=best, keep=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0000002", "step_0000004", "step_0000005"]
    assert (root / "best").read_text().strip() == "step_0000002"
    assert (root / "latest").read_text().strip() == "step_0000005"


def test_each_checkpointer_holds_its_own_save_in_flight(tmp_path):
    """The async save in flight belongs to the Checkpointer that started it: another checkpointer's saves and
    waits neither publish nor wait for it; its own wait publishes it."""
    from model import ModelArgs, Transformer

    model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=32))
    kw = dict(trainer_state={"step": 1}, config={"model_args": model.args.to_dict()})
    a = ckpt.Checkpointer(tmp_path / "a", async_save=True)
    b = ckpt.Checkpointer(tmp_path / "b", async_save=True)
    assert a.save(1, model, None, **kw) is None and b.save(1, model, None, **kw) is None
    b.wait()
    assert b.latest() == tmp_path / "b" / "step_0000001" and a.latest() is None
    assert ckpt.save(tmp_path / "c", 1, model, None, **kw) == tmp_path / "c" / "step_0000001"
    assert a.latest() is None and a.saved_step == 1
    a.wait()
    assert a.latest() == tmp_path / "a" / "step_0000001" and not a.poll()


def test_checkpoint_and_loop_modules_rebind_no_module_globals():
    """The state of a run lives on objects the loop holds (Checkpointer, Run, RunControl), not in module
    globals one module rebinds for another."""
    import ast

    from helpers import ROOT

    for name in ("checkpoint", "train", "distributed", "run_control"):
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        assert not [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Global)], name


def test_rng_state_round_trip():
    st = ckpt.rng_state()
    json.dumps(st)  # JSON-serializable
    a = (torch.rand(3), np.random.rand(2), random.random())
    ckpt.set_rng_state(st)
    b = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_rng_state_holds_the_own_gpu_generator_only(monkeypatch):
    """A rank saves and restores the generator of its own GPU; a state of the older format (every GPU the
    writing process saw) gives a device the entry of its own index."""
    gens = {0: [1, 2], 1: [3, 4]}
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor(gens[device.index], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda t, device: restored.append((t.tolist(), device.index)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("reads every GPU's generator"))
    st = ckpt.rng_state(torch.device("cuda", 1))
    assert st["cuda_device"] == [3, 4] and "cuda" not in st
    ckpt.set_rng_state(st, torch.device("cuda", 1))
    old = {k: v for k, v in st.items() if k != "cuda_device"} | {"cuda": [[1, 2], [3, 4]]}
    ckpt.set_rng_state(old, torch.device("cuda", 1))
    assert restored == [([3, 4], 1), ([3, 4], 1)]


def test_each_rank_takes_its_own_rng_entry():
    a, b = {"torch": "a"}, {"torch": "b"}
    new = ckpt.TrainerState(rng_ranks=[a, b])
    assert [ckpt.own_rng_state(new, r) for r in (0, 1, 2)] == [a, b, None]  # rank 2: not saved, keeps its seed
    old = ckpt.TrainerState.from_dict({"rng": a})  # written by rank 0 alone
    assert [ckpt.own_rng_state(old, r) for r in (0, 1)] == [a, None]


def test_missing_checkpoint_is_a_user_error(tmp_path, data):
    with pytest.raises(UserError, match="no 'latest' checkpoint"):
        run_inprocess(tmp_path, data, "--pretrain_checkpoint", "latest")
    with pytest.raises(UserError, match="not found"):
        ckpt.resolve("step_0000099", tmp_path)


def test_metrics_jsonl_appends_on_resume(tmp_path, data, straight):
    tmp, _ = straight
    ck = tmp / "ck" / "pretrain" / "step_0000010"
    run_inprocess(tmp_path, data, MAX_STEPS=10, VALIDATE_EVERY_X_STEPS=0, SAVE_EVERY_X_STEPS=0)
    run_inprocess(tmp_path, data, "--pretrain_checkpoint", str(ck), MAX_STEPS=12, VALIDATE_EVERY_X_STEPS=0)
    steps = [e["step"] for e in read_metrics(tmp_path / "run") if "loss" in e]
    assert steps == list(range(1, 13))
