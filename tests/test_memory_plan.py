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
    ("llama3.1-8b", 8, "bf16", False, 1, 1024),  # under 0.4 x dim tokens: the head keeps the full logits
])
def test_plan_peak_within_10_percent_of_fsdp_mem_tracker(preset, gpus, precision, ac, batch, seq):
    args = bench.preset_args(preset, layers=3)  # full width, three blocks: seconds on a CPU
    tracked = bench.tracked_peak(args, gpus, precision, "adamw", ac, batch, seq)
    planned = memory_plan.plan(args, gpus, precision, "adamw", ac, batch, seq)
    assert planned.peak == pytest.approx(tracked, rel=0.10), (planned, tracked / 2**30)


def test_the_tracked_step_is_the_fused_training_step_and_the_plan_follows_it():
    """The tracker runs model(x, labels=y) (head and loss fused, bf16 parameters gathered): 4 x 8192 tokens
    at the 8B width peak below the micro-batch's bf16 logits and their fp32 copy alone, and the plan, which
    counts the fused head's (V, d) gradients and one chunk of logits, stays within 10% of it."""
    args = bench.preset_args("llama3.1-8b", layers=3)
    tracked = bench.tracked_peak(args, 8, "bf16", "adamw", True, 4, 8192)
    assert tracked < 6 * args.vocab_size * 4 * 8192
    planned = memory_plan.plan(args, 8, "bf16", "adamw", True, 4, 8192)
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


@pytest.mark.parametrize("preset", ["llama9", "moe-small"])
def test_plan_cli_refuses_an_unknown_or_moe_preset(preset):
    p = subprocess.run([sys.executable, str(ROOT / "model_utils.py"), "plan", "--preset", preset, "--gpus", "8"],
                       env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and preset in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_accumulation_counts_a_full_gradient_copy_only_when_unsharded():
    args = bench.preset_args("llama3.1-8b")
    with torch.device("meta"):
        n = model_utils.count_parameters(Transformer(args))
    one = memory_plan.plan(args, 8, "bf16", "adamw", True, 1, 8192)
    sharded = memory_plan.plan(args, 8, "bf16", "adamw", True, 1, 8192, grad_accum=16)
    unsharded = memory_plan.plan(args, 8, "bf16", "adamw", True, 1, 8192, grad_accum=16,
                                 unsharded_accumulation=True)
    assert sharded.gradients == one.gradients == one.parameters  # fp32 shards, whatever the accumulation
    assert unsharded.gradients == 4 * n and unsharded.unsharded_accumulation  # every rank: the whole model's
    # from the second micro-batch on the previous micro-batches' gradients are held at every backward (one
    # micro-batch's block backward already holds the larger of its saved activations and the shards written)
    assert one.peak < sharded.peak <= one.peak + one.gradients
    assert unsharded.peak - sharded.peak == 4 * n - sharded.gradients
    # one micro-batch accumulates nothing in either mode
    assert memory_plan.plan(args, 8, "bf16", "adamw", True, 1, 8192, unsharded_accumulation=True).peak == one.peak


def test_hsdp_holds_what_its_shard_group_alone_would():
    args = bench.preset_args("llama3.1-70b")
    hsdp = memory_plan.plan(args, 64, "bf16", "adamw", True, 1, 8192, shard_group=8)
    node = memory_plan.plan(args, 8, "bf16", "adamw", True, 1, 8192)
    assert (hsdp.parameters, hsdp.optimizer, hsdp.peak) == (node.parameters, node.optimizer, node.peak)
    assert hsdp.parameters > 7 * memory_plan.plan(args, 64, "bf16", "adamw", True, 1, 8192).parameters
    with pytest.raises(ValueError, match="does not divide"):
        memory_plan.plan(args, 64, shard_group=6)


def test_bf16_gathers_half_the_bytes_of_fp32():
    """MixedPrecisionPolicy(param_dtype=bf16): a gathered block and the root are 2 bytes per parameter; no
    weight copies for autocast; without checkpointing the activations are those of a bf16 residual stream."""
    args = bench.preset_args("llama3.1-8b", layers=4)
    bf16 = memory_plan.plan(args, 8, "bf16", "sgd", True, 1, 1)  # one token: the buffers dominate
    fp32 = memory_plan.plan(args, 8, "fp32", "sgd", True, 1, 1)
    assert bf16.parameters == fp32.parameters and bf16.optimizer == fp32.optimizer  # fp32 master weights
    assert bf16.transient < 0.75 * fp32.transient


def test_plan_cli_reads_the_job_from_a_config(capsys, monkeypatch):
    """--env-file: preset, micro-batch, sequence length, precision, optimizer, checkpointing and the
    accumulation mode from the config, the accumulation derived as training derives it (8B: 128 sequences /
    (1 x 8 GPUs) = 16 micro-steps); flags override the file."""
    import config

    env = str(ROOT / "configs" / "gpu-8b-fsdp.env")
    monkeypatch.setattr(sys, "argv", ["model_utils.py", "plan", "--env-file", env, "--gpus", "8"])
    assert model_utils.main() == 0
    out = capsys.readouterr().out
    cfg = config.load_config(env, use_environ=False)
    accum = cfg.batch_geometry(8)[1]
    assert accum == 16 and "grad accumulation 16 (sharded)" in out and "micro-batch 1 x 8192" in out
    p = memory_plan.plan(bench.preset_args("llama3.1-8b"), 8, "bf16", "adamw", True, 1, 8192, accum)
    assert f"{p.peak / 2**30:.2f} GiB" in out and out.split("muon")[0].count("adamw") == 1  # the config's optimizer
    monkeypatch.setattr(sys, "argv", ["model_utils.py", "plan", "--env-file", env, "--gpus", "8",
                                      "--unsharded-accumulation"])
    assert model_utils.main() == 0
    out = capsys.readouterr().out
    q = memory_plan.plan(bench.preset_args("llama3.1-8b"), 8, "bf16", "adamw", True, 1, 8192, accum, True)
    assert "gradients (fp32 full copy)" in out and f"{q.gradients / 2**30:.2f} GiB" in out
    assert f"{q.peak / 2**30:.2f} GiB" in out and q.peak > p.peak + 20 * 2**30


@pytest.mark.parametrize("flags,message", [
    (["--env-file", str(ROOT / "configs" / "gpu-125m.env"), "--gpus", "8"], "USE_FSDP=false"),
    (["--env-file", str(ROOT / "configs" / "gpu-8b-fsdp.env"), "--gpus", "3"], "TOTAL_BATCH_SIZE"),
    (["--preset", "llama3.1-8b", "--gpus", "12", "--shard-group", "8"], "--shard-group 8 does not divide"),
    (["--gpus", "8"], "--preset NAME or --env-file"),
])
def test_plan_cli_refuses_a_job_it_cannot_plan(flags, message):
    p = subprocess.run([sys.executable, str(ROOT / "model_utils.py"), "plan", *flags], env=subprocess_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_readme_plan_outputs_are_what_the_commands_print(capsys, monkeypatch):
    """Every `$ python model_utils.py plan ...` in the README is followed by exactly what that command prints."""
    import re
    import shlex

    text = (ROOT / "README.md").read_text()
    shown = re.findall(r"^\$ python model_utils\.py (plan [^\n]*)\n(.*?)(?=\n\$ |\n```)", text, re.S | re.M)
    assert len(shown) >= 2
    monkeypatch.chdir(ROOT)
    for command, output in shown:
        monkeypatch.setattr(sys, "argv", ["model_utils.py", *shlex.split(command)])
        assert model_utils.main() == 0
        assert capsys.readouterr().out.strip() == output.strip(), command


def test_recipe_memory_counts_the_reference_head_as_fused_ce_holds_it():
    """bench/recipe_memory.py's DPO reference term is what the reference's fused per-row log-probs allocate
    under no_grad and bf16 autocast (MemTracker on real tensors, small widths): bf16 head and hidden copies and
    one chunk of logits, not the (rows, T, V) logits (10 bytes each)."""
    from types import SimpleNamespace

    from torch.distributed._tools.mem_tracker import MemTracker

    import fused_ce

    spec = importlib.util.spec_from_file_location("bench_recipe_memory", ROOT / "bench" / "recipe_memory.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    rows, T, d, V = 2, 1536, 64, 4096
    h, w, y = torch.randn(rows, T, d), torch.randn(V, d), torch.randint(0, V, (rows, T))
    tracker = MemTracker()
    tracker.track_external(h, w, y)
    with tracker, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused_ce.fused_sequence_logps(h, w, y, chunk_size=fused_ce.CHUNK_ROWS)
    held = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] - h.nbytes - w.nbytes - y.nbytes
    counted = recipe.reference_head_bytes(SimpleNamespace(vocab_size=V, dim=d), rows * T)
    assert counted == pytest.approx(held, rel=0.02) and counted < 10 * rows * T * V / 2
