"""The memory plan (memory_plan.py, `python model_utils.py plan`): its totals against torch's FSDP2 memory
tracker (FSDPMemTracker) under fake tensors on the real Llama 3.1 8B / 70B widths with three blocks, its state
bytes against exact parameter counts, and the CLI."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, subprocess_env

import memory_plan
import model_utils
from model import Transformer

_spec = importlib.util.spec_from_file_location("bench_memory_plan", ROOT / "bench" / "memory_plan.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("preset,gpus,precision,ac,batch,seq", [
    ("llama3.1-8b", 8, "bf16", False, 1, 4096),
    ("llama3.1-8b", 8, "fp32", True, 1, 2048),
    ("llama3.1-70b", 64, "bf16", True, 1, 4096),
    ("llama3.1-70b", 64, "bf16", False, 1, 2048),
])
def test_plan_peak_within_10_percent_of_fsdp_mem_tracker(preset, gpus, precision, ac, batch, seq):
    args = bench.preset_args(preset, layers=3)  # full width, three blocks: seconds on a CPU
    tracked = bench.tracked_peak(args, gpus, precision, "adamw", ac, batch, seq)
    planned = memory_plan.plan(args, gpus, precision, "adamw", ac, batch, seq)
    assert planned.peak == pytest.approx(tracked, rel=0.10), (planned, tracked / 2**30)


def test_state_bytes_follow_the_parameter_count_and_fall_1_over_n():
    args = bench.preset_args("llama3.1-8b")
    with torch.device("meta"):
        n = model_utils.count_parameters(Transformer(args))
    one = memory_plan.plan(args, 1, optimizer="adamw")
    assert one.parameters == one.gradients == 4 * n and one.optimizer == 8 * n
    assert memory_plan.plan(args, 1, optimizer="sgd").optimizer == 4 * n
    muon = memory_plan.plan(args, 1, optimizer="muon").optimizer
    hidden = args.n_layers * (args.dim * args.dim * 2 + 2 * args.dim * args.n_kv_heads * args.head_dim
                              + 3 * args.dim * args.hidden_dim)
    assert muon == 4 * hidden + 8 * (n - hidden)  # momentum on block matrices, AdamW on the rest
    with torch.device("meta"):
        row_bytes = 4 * sum(p[0].numel() for p in Transformer(args).parameters())  # one dim-0 row per tensor
    for gpus in (8, 64):
        p = memory_plan.plan(args, gpus)
        # dim-0 chunks are padded to the largest: at most one row per tensor above 1/N
        assert 4 * n / gpus <= p.parameters <= 4 * n / gpus + row_bytes
        assert p.optimizer == 2 * p.parameters


def test_plan_cli_prints_every_part_and_the_fits(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["model_utils.py", "plan", "--preset", "llama3.1-70b", "--gpus", "64",
                                      "--activation-checkpointing", "--seq-len", "8192"])
    assert model_utils.main() == 0
    out = capsys.readouterr().out
    for row in ("parameters", "gradients", "optimizer state", "activations", "peak", "fits 40 GB", "fits 80 GB",
                "fits 141 GB"):
        assert row in out
    assert out.split("muon")[0].count("adamw") == 1  # one column per optimizer
    p = memory_plan.plan(bench.preset_args("llama3.1-70b"), 64, "bf16", "adamw", True, 1, 8192)
    assert f"{p.peak / 2**30:.2f} GiB" in out


def test_plan_cli_takes_presets_without_a_vocabulary(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["model_utils.py", "plan", "--preset", "tiny", "--gpus", "2", "--vocab-size",
                                      "8448", "--optimizer", "sgd", "--precision", "fp32"])
    assert model_utils.main() == 0
    out = capsys.readouterr().out
    p = memory_plan.plan(bench.preset_args("tiny", vocab_size=8448), 2, "fp32", "sgd")
    assert "vocabulary 8448" in out and f"{p.peak / 2**20:.1f} MiB" in out


def test_plan_cli_refuses_an_unknown_preset():
    p = subprocess.run([sys.executable, str(ROOT / "model_utils.py"), "plan", "--preset", "llama9", "--gpus", "8"],
                       env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "llama9" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
