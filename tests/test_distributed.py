"""Distributed training on CPU (gloo): DDP and FSDP2 over 2 processes give the single-process losses and
grad norms for the same TOTAL_BATCH_SIZE; their checkpoints resume in ONE process (2 -> 1); two
torchrun launches as two nodes (--master_addr, or c10d rendezvous) train and checkpoint."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import (
    ROOT,
    free_port,
    make_pretrain_data,
    read_metrics,
    run_inprocess,
    settings,
    subprocess_env,
    torchrun,
)

import distributed as D
from errors import UserError

# GRAD_CLIP below the natural norm (~0.7-1.3) so clipping is active: a wrong (per-shard) norm under
# FSDP2 would change the update and the losses after step 1.
COMMON = dict(MAX_STEPS=5, GRAD_CLIP=0.5, VALIDATE_EVERY_X_STEPS=0, SAVE_EVERY_X_STEPS=3, MAX_NUMBER_CHECKPOINTS=3)
# bf16 keeps 8 bits of mantissa: the two runs round differently (bf16 vs fp32 residual stream, other sums),
# measured 1.1e-3 apart in loss and 0.2% in grad norm over 5 steps
BF16_LOSS_TOL = 5e-3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_pretrain_data(tmp_path_factory.mktemp("ddata") / "pretrain")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """One process, 2 micro-steps of 4 sequences per step."""
    tmp = tmp_path_factory.mktemp("ref")
    return {e["step"]: e for e in run_inprocess(tmp, data, **COMMON) if "loss" in e}


def _steps(run_dir) -> dict[int, dict]:
    return {e["step"]: e for e in read_metrics(run_dir) if "loss" in e}


def _assert_same(got: dict[int, dict], ref: dict[int, dict], steps) -> None:
    for s in steps:
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], abs=1e-4), (s, got[s], ref[s])
        assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-4), (s, got[s], ref[s])
        # the objective's metrics are all-reduced with the loss: a rank-local value would differ
        assert got[s]["ce"] == pytest.approx(ref[s]["ce"], abs=1e-4), (s, got[s], ref[s])
        # positions and loss tokens are summed over ranks (and kept by a checkpoint): the same totals
        assert (got[s]["tokens"], got[s]["loss_tokens"]) == (ref[s]["tokens"], ref[s]["loss_tokens"]), s


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_match_one_and_resume_in_one(tmp_path, data, reference, fsdp):
    (tmp_path / "two").mkdir()
    torchrun(tmp_path / "two", data, 2, USE_FSDP=str(fsdp).lower(), **COMMON)
    two = _steps(tmp_path / "two" / "run")
    assert two[1]["grad_norm"] > COMMON["GRAD_CLIP"]  # clipping was active
    _assert_same(two, reference, range(1, 6))
    # the 2-process checkpoint (one shard per rank) resumes in a single process: steps 4, 5 again
    ck = tmp_path / "two" / "ck" / "pretrain" / "step_0000003"
    run_inprocess(tmp_path / "one", data, "--pretrain_checkpoint", str(ck), **COMMON)
    one = _steps(tmp_path / "one" / "run")
    assert sorted(one) == [4, 5]
    _assert_same(one, reference, [4, 5])


@pytest.mark.slow
@pytest.mark.parametrize("unsharded", [False, True], ids=["sharded", "unsharded"])
def test_fsdp2_accumulation_modes_match_one_process(tmp_path, data, reference, unsharded):
    """4 micro-batches of 1 sequence per rank (the reference: 2 of 4 in one process), gradients reduce-scattered
    after each micro-batch or accumulated unsharded and reduced once: the same losses either way."""
    p = torchrun(tmp_path, data, 2, USE_FSDP="true", MAX_BATCH_SIZE=1,
                 FSDP_UNSHARDED_ACCUMULATION=str(unsharded).lower(), **COMMON)
    assert "4 = 8 / (1 x 2 ranks)" in p.stdout + p.stderr  # the banner's grad accumulation
    _assert_same(_steps(tmp_path / "run"), reference, range(1, 6))


@pytest.mark.slow
@pytest.mark.parametrize("nproc,shard_group", [(2, 0), (4, 2)], ids=["fsdp2", "hsdp-2x2"])
def test_fsdp2_accumulation_keeps_gradients_sharded_unless_asked(tmp_path, nproc, shard_group):
    """The gradient bytes a rank holds (its .grad shards + FSDP2's unsharded accumulation buffers, and under
    HSDP the partial sums awaiting the all-reduce across replicas) after each of 4 micro-batches equal those of
    1 micro-batch by default; with FSDP_UNSHARDED_ACCUMULATION they are a full fp32 copy of the model's
    gradients until the last micro-batch reduces them. The memory plan's gradient term says the same bytes.
    fp32 and bf16 (parameters gathered in bf16, gradients kept in fp32)."""
    import config
    import memory_plan
    import tokenizer

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tests" / "sharded_worker.py"), "--grad-bytes", str(tmp_path), str(shard_group)]
    p = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    vocab = tokenizer.load_tokenizer(str(ROOT / "tokenizer.model")).vocab_size
    args = config.load_config(str(ROOT / "configs" / "debug.env"), use_environ=False).model_args(vocab)
    for rank in range(nproc):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for dtype, prec in (("float32", "fp32"), ("bfloat16", "bf16")):
            one, four = r[f"{dtype} sharded 1"], r[f"{dtype} sharded 4"]
            shards, whole = 4 * one["local_numel"], 4 * one["numel"]
            assert one["held"] == [shards] and four["held"] == [shards] * 4, (dtype, one, four)
            unsharded = r[f"{dtype} unsharded 4"]
            assert unsharded["held"] == [whole] * 3 + [shards], (dtype, unsharded)
            assert r[f"{dtype} unsharded 1"]["held"] == [shards]  # one micro-batch: nothing to accumulate
            # bf16 runs gather bf16 parameters (MixedPrecisionPolicy) and keep fp32 gradient shards
            assert one["gathered_dtype"] == f"torch.{dtype}" and one["grad_dtype"] == "torch.float32"
            for got in (four, unsharded):  # the same summed gradients, in another order of additions
                assert got["grad_abs"] == pytest.approx(one["grad_abs"], rel=1e-6 if prec == "fp32" else 1e-3)
            if rank == 0:  # the plan counts rank 0's shards (dim-0 chunks padded to the largest)
                for accum, mode, held in ((1, False, one), (4, False, four), (4, True, unsharded)):
                    plan = memory_plan.plan(args, nproc, prec, "adamw", micro_batch=1, seq_len=31, grad_accum=accum,
                                            unsharded_accumulation=mode, shard_group=shard_group or None)
                    assert plan.gradients == max(held["held"]), (prec, accum, mode, plan)


@pytest.mark.slow
def test_fsdp2_bf16_matches_one_process_bf16(tmp_path, data):
    """bf16 training: one process runs fp32 weights under autocast, FSDP2 gathers bf16 parameters (its
    residual stream is bf16 too) with fp32 master weights and fp32 gradient reduction; 2 ranks x 2
    micro-batches against 1 x 2. The losses agree to bf16's resolution."""
    bf16 = dict(COMMON, TRAINING_PRECISION="bf16")
    ref = {e["step"]: e for e in run_inprocess(tmp_path / "one", data, **bf16) if "loss" in e}
    (tmp_path / "two").mkdir()
    torchrun(tmp_path / "two", data, 2, USE_FSDP="true", MAX_BATCH_SIZE=2, **bf16)
    got = _steps(tmp_path / "two" / "run")
    for s in range(1, 6):
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], abs=BF16_LOSS_TOL), (s, got[s], ref[s])
        assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-2), (s, got[s], ref[s])


@pytest.mark.slow
def test_hsdp_2x2_matches_one_process(tmp_path, data, reference):
    """4 ranks as 2 replicas of 2-rank shard groups (FSDP_SHARD_GROUP_SIZE=2), 2 micro-batches each: the
    single-process losses and norms; the sharded checkpoint it writes resumes in one process."""
    torchrun(tmp_path, data, 4, USE_FSDP="true", FSDP_SHARD_GROUP_SIZE=2, MAX_BATCH_SIZE=1, **COMMON)
    _assert_same(_steps(tmp_path / "run"), reference, range(1, 6))
    ck = tmp_path / "ck" / "pretrain" / "step_0000003"
    run_inprocess(tmp_path / "one", data, "--pretrain_checkpoint", str(ck), **COMMON)
    _assert_same(_steps(tmp_path / "one" / "run"), reference, [4, 5])


def test_hsdp_shard_group_must_divide_the_world():
    with pytest.raises(UserError, match=r"^FSDP_SHARD_GROUP_SIZE=3 does not divide the world size 1: .*0 to shard"):
        D.fsdp_mesh(3, torch.device("cpu"))
    assert D.fsdp_mesh(0, torch.device("cpu")) is None and D.fsdp_mesh(1, torch.device("cpu")) is None


def test_hsdp_needs_fsdp():
    import config

    with pytest.raises(UserError, match="FSDP_SHARD_GROUP_SIZE=8 .* but USE_FSDP=false"):
        config.load_config(None, {"FSDP_SHARD_GROUP_SIZE": "8"}, use_environ=False)
    with pytest.raises(UserError, match="FSDP_UNSHARDED_ACCUMULATION=true .* but USE_FSDP=false"):
        config.load_config(None, {"FSDP_UNSHARDED_ACCUMULATION": "true"}, use_environ=False)


def _launch_node(tmp, data, launcher: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "--nnodes=2", "--nproc_per_node=1",
           str(ROOT / "train.py"), *settings(tmp, data, **COMMON)]
    return subprocess.Popen(cmd, cwd=tmp, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@pytest.mark.slow
@pytest.mark.parametrize("rendezvous", ["master_addr", "c10d"])
def test_two_nodes_train_and_checkpoint(tmp_path, data, reference, rendezvous):
    port = free_port()
    procs = []
    for node in (0, 1):
        if rendezvous == "master_addr":
            launcher = [f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}"]
        else:
            launcher = ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=test-job"]
        # both nodes share one checkpoint directory (as on a shared file system); only global rank 0 writes
        procs.append(_launch_node(tmp_path, data, launcher))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    got = _steps(tmp_path / "run")
    _assert_same(got, reference, range(1, 6))
    root = tmp_path / "ck" / "pretrain"
    assert (root / "latest").read_text().strip() == "step_0000005"
    assert len(list((root / "step_0000003" / "model").glob("shard-*.safetensors"))) == 2  # one per rank


# ---- single-process helpers --------------------------------------------------------------------------


def test_world_of_one_helpers():
    assert D.rank() == 0 and D.world_size() == 1 and D.is_main()
    t = torch.tensor([3.0])
    assert D.all_reduce_sum(t) is t and t.item() == 3.0
    assert D.sum_floats([1.5, 2]) == [1.5, 2.0]
    assert D.any_rank(True) and not D.any_rank(False)
    D.barrier()


def test_device_selection():
    assert D.select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert D.select_device("auto").type == expected  # cuda -> mps -> cpu
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="DEVICE=cuda"):
            D.select_device("cuda")


def test_more_local_ranks_than_gpus_is_a_user_error(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [D.select_device("cuda", r) for r in (0, 1)] == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert chosen == [0, 1]
    with pytest.raises(UserError, match=r"LOCAL_RANK=2 but this node has 2 CUDA device\(s\).*--nproc_per_node 2"):
        D.select_device("auto", 2)  # local_rank % 2 would put it on GPU 0 with rank 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="LOCAL_RANK=1"):
        D.select_device("cuda", 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")  # a launcher bound this process to one GPU of its own
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert D.select_device("cuda", 5) == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun gave its 2 local workers the same one GPU
    with pytest.raises(UserError, match="LOCAL_RANK=1"):
        D.select_device("cuda", 1)


def test_fsdp_without_process_group_is_a_user_error(tmp_path, data):
    with pytest.raises(UserError, match="USE_FSDP=true needs a process group"):
        run_inprocess(tmp_path, data, USE_FSDP="true", MAX_STEPS=1)


@pytest.mark.slow
def test_fsdp_under_torchrun_with_one_process_matches_one_process(tmp_path, data, reference):
    torchrun(tmp_path, data, 1, USE_FSDP="true", **COMMON)  # what the error above tells the user to do
    _assert_same(_steps(tmp_path / "run"), reference, range(1, 6))


def test_grad_norm_matches_reference_and_clips():
    ps = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    ps[0].grad = torch.tensor([3.0, 0.0, 0.0])
    ps[1].grad = torch.tensor([[0.0, 4.0], [0.0, 0.0]])
    norm = D.grad_norm_and_clip(ps, max_norm=1.0)
    assert float(norm) == pytest.approx(5.0)  # sqrt(3^2 + 4^2), before clipping
    assert float(torch.cat([p.grad.flatten() for p in ps]).norm()) == pytest.approx(1.0, rel=1e-5)


def test_grad_norm_and_clip_reads_nothing_on_the_host(monkeypatch):
    """The training step syncs once for loss, metrics and norm together: the clip itself must not turn a
    tensor into a Python value (on GPU that is a stall per step). Non-finite norms are returned, not checked."""
    def host_read(*_args, **_kw):
        raise AssertionError("grad_norm_and_clip read a tensor value on the host")

    for name in ("__bool__", "__float__", "__int__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    ps = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    ps[0].grad, ps[1].grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0])
    norm = D.grad_norm_and_clip(ps, max_norm=1.0)
    ps[0].grad = torch.tensor([float("inf"), 0.0, 0.0])
    inf_norm = D.grad_norm_and_clip(ps, max_norm=1.0)
    monkeypatch.undo()
    assert float(norm) == pytest.approx(5.0) and math.isinf(float(inf_norm))


def test_activation_checkpointing_gives_the_same_losses(tmp_path, data, reference):
    got = {e["step"]: e for e in run_inprocess(tmp_path, data, ACTIVATION_CHECKPOINTING="true", **COMMON) if "loss" in e}
    for s in range(1, 6):
        assert got[s]["loss"] == pytest.approx(reference[s]["loss"], abs=1e-6)
    import checkpoint as ckpt
    import model_utils

    model_utils.load_model(tmp_path / "ck" / "pretrain" / "step_0000005")  # strict names: loads
    saved = ckpt.read_model_tensors(tmp_path / "ck" / "pretrain" / "step_0000005")
    assert "layers.0.attention.wq.weight" in saved  # names on disk unchanged by the recompute wrapper
