"""The pieces train() is made of, each on its own: TrainerState (incl. a checkpoint written before it
existed), build_run, initial_state / restore_training, save_checkpoint, record_validation, due,
wants_checkpoint, evaluate_and_save, forward_backward, apply_update, optimizer_step, log_step; and exact
resume from the stored checkpoint fixture."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT, read_metrics, run_inprocess, settings, train_losses

import checkpoint as ckpt
import distributed as D
import model_utils
import objectives
import train
from errors import UserError

FIXTURE = ROOT / "tests" / "fixtures" / "resume_checkpoint"
SMALL = dict(DIM=16, N_LAYERS=1, N_HEADS=2, N_KV_HEADS=1, MULTIPLE_OF=16, TIE_EMBEDDINGS="true", MAX_SEQ_LEN=32,
             TOTAL_BATCH_SIZE=128, MAX_BATCH_SIZE=2, MAX_STEPS=6, VALIDATE_EVERY_X_STEPS=3, SAVE_EVERY_X_STEPS=3,
             WARMUP_STEPS=2)


def make_run(tmp: Path, data: Path, *flags: str, **kw) -> train.Run:
    cfg, args = train.parse_args(settings(tmp, data, **{**SMALL, **kw}) + list(flags))
    return train.build_run(cfg, args, D.init_distributed("cpu"))


# ---- TrainerState and the checkpoint format ------------------------------------------------------------


def test_trainer_state_reads_the_fixture_checkpoint_and_writes_it_back_identically():
    raw = json.loads((FIXTURE / "step_0000003" / ckpt.STATE_FILE).read_text())
    state = ckpt.read_trainer_state(FIXTURE / "step_0000003")
    assert (state.step, state.tokens_seen, state.best_step, state.stage) == (3, 384, 3, "pretrain")
    assert state.dataloader["offset"] == 12
    written = state.to_dict()
    # every key of the file, same order and values; fields added since (with defaults) are the only extras
    assert json.dumps({k: v for k, v in written.items() if k in raw}) == json.dumps(raw)
    assert {k: v for k, v in written.items() if k not in raw} == {"loss_tokens_seen": 0, "parent_fingerprint": None,
                                                                  "parent_requested": None, "precision": None}


def test_trainer_state_defaults_fill_keys_an_older_file_lacks():
    state = ckpt.TrainerState.from_dict({"step": 7, "tokens_seen": 70, "best_val": 1.5, "unknown_key": 1})
    assert (state.step, state.best_val, state.spike_steps, state.nonfinite_total, state.parent) == (7, 1.5, 0, 0, None)
    assert "unknown_key" not in state.to_dict()


def test_config_json_and_parent_source(tmp_path):
    plain = ckpt.config_json({"dim": 4}, {"K": 1})
    assert plain == {"model_args": {"dim": 4}, "settings": {"K": 1}, "cwd": os.getcwd()}
    lora_conf = ckpt.config_json({"dim": 4}, {}, {"rank": 2}, "/base", "f1ng3r")
    assert lora_conf["base_model"] == {"source": "/base", "config_sha": ckpt.config_sha({"dim": 4}),
                                       "fingerprint": "f1ng3r"}
    d = tmp_path / "step_0000001"
    d.mkdir()
    (d / ckpt.STATE_FILE).write_text(json.dumps({"step": 1, "parent": str(tmp_path)}))
    assert ckpt.parent_source(d) == str(tmp_path)
    (d / ckpt.CONFIG_FILE).write_text(json.dumps({**lora_conf, "base_model": {"source": str(d)}}))
    assert ckpt.parent_source(d) == str(d)  # a LoRA run's base wins over the recorded parent
    (d / ckpt.STATE_FILE).write_text(json.dumps({"step": 1, "parent": "/no/such/dir"}))
    (d / ckpt.CONFIG_FILE).unlink()
    with pytest.raises(UserError, match="no longer exists"):
        ckpt.parent_source(d)


# ---- exact resume from a stored checkpoint ---------------------------------------------------------------


def test_resume_from_stored_checkpoint_continues_exactly(tmp_path, pretrain_data):
    """The fixture was written by train.py; resuming it must give that run's own steps 4-6."""
    spec = json.loads((FIXTURE / "continuation.json").read_text())
    m = run_inprocess(tmp_path, pretrain_data, "--pretrain_checkpoint", str(FIXTURE / "step_0000003"),
                      **spec["settings"])
    want = {e["step"]: e for e in spec["metrics"] if "loss" in e}
    got = {e["step"]: e for e in m if "loss" in e}
    assert sorted(got) == sorted(want) == [4, 5, 6]
    for s in want:
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], abs=1e-6), s
        assert got[s]["grad_norm"] == pytest.approx(want[s]["grad_norm"], abs=1e-5), s
        assert (got[s]["lr"], got[s]["tokens"]) == (want[s]["lr"], want[s]["tokens"])
    val = [e["val_loss"] for e in m if "val_loss" in e]
    assert val == pytest.approx([e["val_loss"] for e in spec["metrics"] if "val_loss" in e], abs=1e-6)


# ---- build_run, initial_state, restore_training -----------------------------------------------------------


def test_build_run_fresh(tmp_path, pretrain_data):
    run = make_run(tmp_path, pretrain_data, VALIDATE_EVERY_X_STEPS=0)
    assert (run.G, run.accum, run.max_steps, run.state.step, run.state.stage) == (4, 2, 6, 0, "pretrain")
    assert run.val_loader is None and run.resume_dir is None and run.numerics.scaler is None
    assert run.checkpointer.root == tmp_path / "ck" / "pretrain"
    assert run.params and all(p.requires_grad for p in run.params)
    run.log.close()


def test_build_run_resumes_weights_state_data_position(tmp_path, pretrain_data):
    step3 = FIXTURE / "step_0000003"
    run = make_run(tmp_path, pretrain_data, "--pretrain_checkpoint", str(step3))
    assert run.resume_dir == step3 and run.state.step == 3 and run.state.best_val is not None
    assert run.train_loader.state_dict()["offset"] == 12
    saved = ckpt.read_model_tensors(step3)
    for k, v in saved.items():
        torch.testing.assert_close(run.model.state_dict()[k], v, atol=0, rtol=0)
    assert run.optimizer.state  # moments restored
    run.log.close()


def test_initial_state_reset_optimizer_and_start_step(tmp_path, pretrain_data):
    run = make_run(tmp_path, pretrain_data, "--pretrain_checkpoint", str(FIXTURE / "step_0000003"),
                   "--reset-optimizer", "--start-step", "5")
    assert run.state.step == 5 and run.state.best_val is None  # counters fresh, weights loaded
    assert not run.optimizer.state
    run.log.close()


def test_restore_training_sets_loader_and_rng(tmp_path, pretrain_data):
    run = make_run(tmp_path, pretrain_data)
    state = ckpt.read_trainer_state(FIXTURE / "step_0000003")
    torch.manual_seed(0)
    train.restore_training(FIXTURE / "step_0000003", run.model, run.optimizer, None, run.train_loader, state)
    assert run.train_loader.state_dict()["offset"] == 12
    assert torch.equal(torch.get_rng_state(), torch.tensor(state.rng["torch"], dtype=torch.uint8))
    run.log.close()


# ---- evaluation and checkpoint decisions ---------------------------------------------------------------


def test_record_validation_best_and_early_stopping():
    c = SimpleNamespace(early_stopping_min_delta=0.1, early_stopping_patience=2, early_stopping_patience_skip_steps=0)
    st = ckpt.TrainerState(step=1)
    assert train.record_validation(st, 5.0, c) == (True, False) and (st.best_val, st.best_step) == (5.0, 1)
    st.step = 2
    assert train.record_validation(st, 4.95, c) == (False, False)  # within min_delta: no improvement
    st.step = 3
    assert train.record_validation(st, 6.0, c) == (False, True) and st.bad_validations == 2
    st.step = 4
    assert train.record_validation(st, 1.0, c) == (True, False) and st.bad_validations == 0
    skip = SimpleNamespace(early_stopping_min_delta=0.0, early_stopping_patience=1, early_stopping_patience_skip_steps=10)
    st2 = ckpt.TrainerState(step=5, best_val=1.0)
    assert train.record_validation(st2, 2.0, skip) == (False, False) and st2.bad_validations == 0


def test_due_and_wants_checkpoint():
    assert train.due(5, 10, False) and not train.due(5, 7, False) and train.due(5, 7, True)
    assert not train.due(0, 10, True) and not train.due(-1, 10, True)
    c = SimpleNamespace(save_checkpoints=True, save_every_x_steps=5, save_best_only=False)
    assert train.wants_checkpoint(c, 5, False, False) and not train.wants_checkpoint(c, 6, False, False)
    assert train.wants_checkpoint(c, 6, True, False) and train.wants_checkpoint(c, 6, False, True)
    best_only = SimpleNamespace(save_checkpoints=True, save_every_x_steps=5, save_best_only=True)
    assert not train.wants_checkpoint(best_only, 5, False, True) and train.wants_checkpoint(best_only, 5, True, False)
    off = SimpleNamespace(save_checkpoints=False, save_every_x_steps=5, save_best_only=False)
    assert not train.wants_checkpoint(off, 5, True, True)


def test_evaluate_and_save_validates_records_and_checkpoints(tmp_path, pretrain_data):
    run = make_run(tmp_path, pretrain_data, EARLY_STOPPING_PATIENCE=1)
    run.state.step = 3
    assert train.evaluate_and_save(run, last_step=False) is False
    assert run.state.best_step == 3 and (run.checkpointer.root / "step_0000003").is_dir()
    assert (run.checkpointer.root / "best").read_text().strip() == "step_0000003"
    run.state.best_val = -1.0  # nothing can improve on it: patience 1 stops at the next validation
    run.state.step = 6
    assert train.evaluate_and_save(run, last_step=False) is True
    run.log.close()
    vals = [e for e in read_metrics(tmp_path / "run") if "val_loss" in e]
    assert [e["step"] for e in vals] == [3, 6] and all(math.isfinite(e["val_loss"]) for e in vals)


def test_save_checkpoint_writes_state_at_the_current_step(tmp_path, pretrain_data):
    run = make_run(tmp_path, pretrain_data)
    run.state.step, run.state.tokens_seen = 2, 256
    train.save_checkpoint(run)
    state = ckpt.read_trainer_state(run.checkpointer.root / "step_0000002")
    assert (state.step, state.tokens_seen, state.world_size) == (2, 256, 1)
    assert state.dataloader == run.train_loader.state_dict() and len(state.rng_ranks) == 1
    conf = json.loads((run.checkpointer.root / "step_0000002" / ckpt.CONFIG_FILE).read_text())
    assert conf["model_args"]["dim"] == 16 and "lora" not in conf
    extra = json.loads((run.checkpointer.root / "step_0000002" / ckpt.OPTIM_JSON).read_text())
    assert extra["schedule"]["max_steps"] == 6
    run.log.close()


# ---- one optimizer step ---------------------------------------------------------------------------------


def test_forward_backward_sums_units_and_fills_gradients(tmp_path, pretrain_data):
    run = make_run(tmp_path, pretrain_data)
    reduced, names, n_units, work = train.forward_backward(run)
    assert names == ["ce"] and n_units == run.G * 32  # every position of a pretrain window is a target
    assert work == objectives.Work(run.G * 32, run.G * 32, model_utils.model_flops(run.margs, run.G, 32))
    assert reduced[0].item() == pytest.approx(reduced[1].item())  # the loss is the ce here
    assert reduced[0].item() / n_units == pytest.approx(math.log(8448), abs=0.1)  # ~uniform at init
    assert all(p.grad is not None for p in run.params)
    run.log.close()


def test_forward_backward_work_is_what_torch_counts_with_a_live_teacher(tmp_path, pretrain_data):
    """The step's FLOPs (the MFU numerator) are every pass forward_backward runs, the distillation teacher's
    forwards included (a model of another size than the student): torch's FlopCounterMode sees the same."""
    from helpers import flop_counter, make_parent
    from torch.nn.attention import SDPBackend, sdpa_kernel

    teacher = make_parent(tmp_path / "teacher")  # the debug preset, larger than SMALL
    run = make_run(tmp_path, pretrain_data, IS_MODEL_DISTILLATION="true", TEACHER_MODEL_CHECKPOINT=teacher,
                   TEACHER_PRECISION="fp32")
    with flop_counter() as counter, sdpa_kernel(SDPBackend.MATH):
        _, names, _, work = train.forward_backward(run)
    assert names == ["ce", "kd"] and work.positions == run.G * 32
    student = model_utils.model_flops(run.margs, run.G, 32)
    assert work.flops == counter.get_total_flops() > 2 * student  # the teacher's forward costs more than the student
    run.log.close()


def test_apply_update_steps_or_skips_and_stops(tmp_path, pretrain_data):
    run = make_run(tmp_path, pretrain_data, MAX_NONFINITE_STEPS=2)
    spikes = train.SpikeGuard(0.0, 4)
    train.forward_backward(run)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    assert train.apply_update(run, spikes, float("nan"), 1.0) == "non-finite"
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())  # weights untouched
    assert (run.state.nonfinite_total, run.state.nonfinite_in_a_row) == (1, 1)
    assert train.apply_update(run, spikes, 9.0, 1.0) is None and run.state.nonfinite_in_a_row == 0
    assert any(not torch.equal(before[k], v) for k, v in run.model.state_dict().items())
    train.apply_update(run, spikes, 9.0, float("inf"))
    with pytest.raises(UserError, match="2 steps in a row"):
        train.apply_update(run, spikes, float("nan"), 1.0)
    run.log.close()


def test_optimizer_step_advances_state_and_clears_gradients(tmp_path, pretrain_data):
    run = make_run(tmp_path, pretrain_data)
    r = train.optimizer_step(run, train.SpikeGuard(0.0, 4))
    assert (run.state.step, run.state.tokens_seen) == (1, 128)
    assert r.skipped is None and math.isfinite(r.loss) and r.grad_norm > 0 and r.dt > 0
    assert r.metrics["ce"] == pytest.approx(r.loss)
    assert all(p.grad is None for p in run.params)
    run.log.close()


def test_log_step_writes_the_step_record(tmp_path, pretrain_data, capsys):
    run = make_run(tmp_path, pretrain_data)
    run.state.step, run.state.tokens_seen, run.state.loss_tokens_seen = 4, 512, 300
    work = objectives.Work(positions=96, loss_tokens=40, flops=3e9)
    train.log_step(run, train.StepResult(loss=2.5, grad_norm=0.5, metrics={"ce": 2.5}, dt=0.5, work=work), lr=1e-3)
    run.log.close()
    (rec,) = [e for e in read_metrics(tmp_path / "run") if "loss" in e]
    assert rec["step"] == 4 and rec["loss"] == 2.5 and rec["tokens"] == 512 and rec["lr"] == 1e-3
    assert rec["tokens_per_s"] == pytest.approx(96 / 0.5) and rec["ce"] == 2.5 and rec["grad_norm"] == 0.5
    assert rec["loss_tokens"] == 300 and rec["loss_tokens_per_s"] == pytest.approx(40 / 0.5)
    assert rec["mfu"] == pytest.approx(3e9 / 0.5 / run.throughput.peak)  # unclamped, all model FLOPs of the step
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step      4"))
    assert "| 192 tok/s | 80 loss tok/s |" in line


def test_train_loop_fits_on_one_screen():
    import ast

    (fn,) = [n for n in ast.parse((ROOT / "train.py").read_text()).body
             if isinstance(n, ast.FunctionDef) and n.name == "train"]
    assert fn.end_lineno - fn.lineno + 1 <= 60


def test_resume_of_a_copied_fixture_saves_next_checkpoint(tmp_path, pretrain_data):
    """The fixture resumed from a copy under the stage's own checkpoint root (by `latest`) trains on and saves."""
    spec = json.loads((FIXTURE / "continuation.json").read_text())
    root = tmp_path / "ck" / "pretrain"
    root.mkdir(parents=True)
    shutil.copytree(FIXTURE / "step_0000003", root / "step_0000003")
    (root / "latest").write_text("step_0000003\n")
    m = run_inprocess(tmp_path, pretrain_data, "--pretrain_checkpoint", "latest", **spec["settings"])
    assert sorted(train_losses(m)) == [4, 5, 6]
    assert ckpt.read_trainer_state(root / "step_0000006").step == 6


def test_weights_fingerprint_sees_any_change_and_ignores_the_load_dtype():
    g = torch.Generator().manual_seed(0)
    sd = {"a.weight": torch.randn(300, 700, generator=g), "b": torch.randn(5, generator=g)}
    fp = ckpt.weights_fingerprint(sd)
    assert ckpt.weights_fingerprint({k: v.clone() for k, v in sd.items()}) == fp
    assert ckpt.weights_fingerprint({k: v.double() for k, v in sd.items()}) == fp  # dtype of the load
    moved = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in sd.items()}  # a training step
    assert ckpt.weights_fingerprint(moved) != fp
    assert ckpt.weights_fingerprint({"a.weight": sd["a.weight"], "c": sd["b"]}) != fp  # names count
