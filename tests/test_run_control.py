"""Stopping and restarting a run as a new user meets it: a stop signal during validation or inside a long
step is heeded within a bounded time with a checkpoint and the resumable exit code; the same command then
continues exactly; a hung step trips the watchdog; RESUME decides what an existing run dir means; a run
that would train nothing is refused; --help says how to pass settings and what the exit codes mean."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    ROOT,
    make_pretrain_data,
    read_metrics,
    run_inprocess,
    settings,
    subprocess_env,
    train_losses,
    wandb_records,
)

import checkpoint as ckpt
from errors import UserError
from run_control import RESUMABLE_EXIT


def _train_cmd(tmp: Path, data: Path, faults: tuple[str, ...] = (), **kw) -> list[str]:
    """train.py, or with `faults` the launcher that injects them (tests/train_with_faults.py)."""
    script = [str(ROOT / "tests" / "train_with_faults.py"), *faults, "--"] if faults else [str(ROOT / "train.py")]
    return [sys.executable, *script, *settings(tmp, data, **kw)]


def _start(tmp: Path, data: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(_train_cmd(tmp, data, **kw), cwd=tmp, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for_loss_lines(run_dir: Path, n: int, p: subprocess.Popen, timeout: float = 120) -> None:
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        if metrics.is_file() and sum('"loss"' in ln for ln in metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not log {n} steps in time (exit {p.poll()})")


def test_sigterm_during_a_long_validation_stops_with_a_checkpoint(tmp_path, pretrain_data):
    """Validation after every step with a million batches: without a check inside validation the run would
    never reach the next between-steps check."""
    p = _start(tmp_path, pretrain_data, MAX_STEPS=50, VALIDATE_EVERY_X_STEPS=1, VAL_STEPS=1_000_000,
               SAVE_EVERY_X_STEPS=0)
    try:
        _wait_for_loss_lines(tmp_path / "run", 1, p)
        time.sleep(1.0)  # well inside the validation of step 1
        t0 = time.time()
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
        elapsed = time.time() - t0
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == RESUMABLE_EXIT, out[-2000:]
    assert elapsed < 15, elapsed  # one validation batch + one checkpoint write
    root = tmp_path / "ck" / "pretrain"
    assert ckpt.latest_name(root) == ckpt.step_name(1)
    assert not any("val_loss" in e for e in read_metrics(tmp_path / "run"))  # the abandoned validation is not logged


def test_sigterm_inside_a_long_step_abandons_it_and_resume_is_exact(tmp_path, pretrain_data):
    """32 micro-batches per step: the signal lands inside step 2, which is dropped (gradients and loader
    position); the checkpoint is step 1 and the same command continues to the uninterrupted run's losses."""
    kw = dict(MAX_STEPS=3, TOTAL_BATCH_SIZE=4096, MAX_BATCH_SIZE=2, VALIDATE_EVERY_X_STEPS=0, SAVE_EVERY_X_STEPS=0)
    ref = train_losses(run_inprocess(tmp_path / "ref", pretrain_data, **kw))
    p = _start(tmp_path, pretrain_data, **kw)
    try:
        _wait_for_loss_lines(tmp_path / "run", 1, p)
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == RESUMABLE_EXIT, out[-2000:]
    assert ckpt.latest_name(tmp_path / "ck" / "pretrain") == ckpt.step_name(1)
    assert sorted(train_losses(read_metrics(tmp_path / "run"))) == [1]
    r = subprocess.run(_train_cmd(tmp_path, pretrain_data, **kw), cwd=tmp_path, env=subprocess_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    got = train_losses(read_metrics(tmp_path / "run"))
    assert sorted(got) == [1, 2, 3]
    for s in got:
        assert got[s] == pytest.approx(ref[s], abs=1e-6), s


def test_watchdog_dumps_stacks_and_exits_resumable(tmp_path, pretrain_data):
    """Step 4 stalls for 120 s (the fault launcher sleeps inside it, without a heartbeat)."""
    cmd = _train_cmd(tmp_path, pretrain_data, faults=("--stall-step", "4:120"), MAX_STEPS=6, VALIDATE_EVERY_X_STEPS=0,
                     SAVE_EVERY_X_STEPS=0, STEP_WATCHDOG_FACTOR=3, STEP_WATCHDOG_MIN_SECONDS=2)
    t0 = time.time()
    r = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=100)
    assert r.returncode == RESUMABLE_EXIT, r.stdout[-2000:] + r.stderr[-2000:]
    assert time.time() - t0 < 60  # not the injected 120 s
    assert "watchdog: no progress" in r.stderr and "stall_in_step" in r.stderr  # the stuck frame is named
    assert sorted(train_losses(read_metrics(tmp_path / "run"))) == [1, 2, 3]


def test_watchdog_is_quiet_on_a_healthy_run(tmp_path, pretrain_data):
    m = run_inprocess(tmp_path, pretrain_data, MAX_STEPS=4, VALIDATE_EVERY_X_STEPS=2, SAVE_EVERY_X_STEPS=0,
                      STEP_WATCHDOG_FACTOR=50, STEP_WATCHDOG_MIN_SECONDS=30)
    assert sorted(train_losses(m)) == [1, 2, 3, 4]


def test_resume_modes(tmp_path, pretrain_data):
    kw = dict(MAX_STEPS=2, VALIDATE_EVERY_X_STEPS=0, SAVE_EVERY_X_STEPS=0)
    with pytest.raises(UserError, match="RESUME=require but .* has no checkpoint"):
        run_inprocess(tmp_path, pretrain_data, RESUME="require", **kw)
    run_inprocess(tmp_path, pretrain_data, **kw)  # a first run: auto starts fresh
    with pytest.raises(UserError, match=r"RESUME=never but .* already holds a run: set RUN_DIR"):
        run_inprocess(tmp_path, pretrain_data, RESUME="never", **kw)
    with pytest.raises(UserError, match=r"other model settings \(N_LAYERS=2 there, 3 now\)"):
        run_inprocess(tmp_path, pretrain_data, N_LAYERS=3, MAX_STEPS=4)
    m = run_inprocess(tmp_path, pretrain_data, RESUME="require", MAX_STEPS=4, VALIDATE_EVERY_X_STEPS=0)
    assert sorted(train_losses(m)) == [1, 2, 3, 4]  # metrics.jsonl continued, not overwritten
    assert ckpt.latest_name(tmp_path / "ck" / "pretrain") == ckpt.step_name(4)


def test_a_run_that_would_train_nothing_is_refused_and_writes_nothing(tmp_path):
    data = make_pretrain_data(tmp_path / "data", n_docs=30)
    r = subprocess.run(_train_cmd(tmp_path, data, MAX_STEPS=-1, TOTAL_BATCH_SIZE=65536, MAX_BATCH_SIZE=4,
                                  VALIDATE_EVERY_X_STEPS=0),
                       cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "MAX_STEPS=-1" in err[0] and "trains 0 steps" in err[0] and "TOTAL_BATCH_SIZE" in err[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "ck").exists()


def test_help_names_key_value_settings_and_exit_codes():
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], env=subprocess_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert "[KEY=VALUE ...]" in r.stdout and "KEY=VALUE: any setting" in r.stdout and f"{RESUMABLE_EXIT} stopped" in r.stdout


def test_generate_and_hellaswag_consult_the_stop_check():
    from helpers import TOKENIZER

    import generate
    import hellaswag_utils
    import tokenizer as tk
    from model import ModelArgs, Transformer

    class Stop(Exception):
        pass

    calls = []

    def stop_after(n):
        def check():
            calls.append(1)
            if len(calls) > n:
                raise Stop

        return check

    m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=8448, multiple_of=16,
                              max_seq_len=64))
    m.init_weights(generator=torch.Generator().manual_seed(0))
    with pytest.raises(Stop):
        generate.generate(m, [[1, 2, 3]], 20, stop_check=stop_after(5))
    assert len(calls) == 6 and m.cache_len == 0  # asked before every token; the KV cache is released
    calls.clear()
    tok = tk.load_tokenizer(TOKENIZER)
    ex = hellaswag_utils.load_examples(ROOT / "tests" / "fixtures" / "hellaswag_golden.jsonl", None)
    with pytest.raises(Stop):
        hellaswag_utils.evaluate(m, tok, ex, batch_size=1, progress=False, stop_check=stop_after(1))
    assert len(calls) == 2


def test_dataset_cli_without_arguments_says_it_prepares_the_demo_set(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "load_pretrain_dataset.py"), "--out", str(tmp_path / "d"),
                        "--no-progress", f"TOKENIZER_CHECKPOINT_PATH={ROOT / 'tokenizer.model'}"],
                       cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "preparing the offline demo set (embedded corpus" in r.stderr
    assert "prepared pretrain from embedded corpus" in r.stderr


def _wandb_loss_steps(run: Path) -> list[int]:
    import json as _json

    from wandb.proto import wandb_internal_pb2

    steps = []
    for data in wandb_records(next(run.glob("*.wandb"))):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): _json.loads(i.value_json) for i in rec.history.item}
            if "loss" in items:
                steps.append(items["_step"])
    return steps


@pytest.mark.slow
def test_resume_continues_the_wandb_run_and_the_metrics_history(tmp_path, pretrain_data, monkeypatch):
    """A run goes on to step 4 after its step-2 checkpoint; resuming that checkpoint drops rows 3-4 from
    metrics.jsonl (they are re-done), keeps 1-2, continues the same W&B run id and sends W&B only the steps
    it does not hold yet; the loss plot is drawn from the whole history."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    kw = dict(WANDB_ENABLED="true", VALIDATE_EVERY_X_STEPS=0, SAVE_EVERY_X_STEPS=2, MAX_NUMBER_CHECKPOINTS=5)
    first = train_losses(run_inprocess(tmp_path, pretrain_data, MAX_STEPS=4, **kw))
    step2 = tmp_path / "ck" / "pretrain" / ckpt.step_name(2)
    m = run_inprocess(tmp_path, pretrain_data, "--pretrain_checkpoint", str(step2), MAX_STEPS=6, **kw)
    steps = [e["step"] for e in m if "loss" in e]
    assert steps == [1, 2, 3, 4, 5, 6]  # each once: the first attempt's 3 and 4 were replaced
    again = train_losses(m)
    for s in (3, 4):
        assert again[s] == pytest.approx(first[s], abs=1e-6)  # exact resume: the re-done steps agree
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"), key=lambda p: p.stat().st_mtime)
    assert len(runs) == 2 and runs[0].name.split("-")[-1] == runs[1].name.split("-")[-1]  # one W&B run id
    assert _wandb_loss_steps(runs[0]) == [1, 2, 3, 4] and _wandb_loss_steps(runs[1]) == [5, 6]
    assert (tmp_path / "run" / "loss.png").is_file()
