"""The precision rule (precision.resolve) on every device branch, the CPU probe, and peak FLOP/s for MFU.

Device capabilities are monkeypatched so each branch runs on any host; the probe itself is also run for
real, and once more in a subprocess with PyTorch and oneDNN limited to AVX2 (bf16 emulated), where auto
must pick fp32 whatever CPU the test runs on. One precision per job: two ranks whose probes disagree take
rank 0's; a resume keeps the recorded precision unless the host cannot compute in it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_inprocess, subprocess_env

import checkpoint as ckpt
import precision

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fresh_probe(monkeypatch):
    """Forget the cached probe and the warn-once record so a test sees its own patched values."""
    precision.cpu_bf16_slowdown.cache_clear()
    monkeypatch.setattr(precision, "_warned", set())
    yield
    precision.cpu_bf16_slowdown.cache_clear()


def fake_cuda(monkeypatch, name: str, bf16: bool, capability=(7, 0)):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    def is_bf16_supported(including_emulation=True):
        assert including_emulation is False, "the rule must ask about native bf16 only"
        return bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)


def test_cuda_with_native_bf16_picks_bf16(monkeypatch):
    fake_cuda(monkeypatch, "NVIDIA A100-SXM4-80GB", bf16=True, capability=(8, 0))
    c = precision.resolve("auto", "cuda")
    assert (c.name, c.dtype) == ("bf16", torch.bfloat16) and "A100" in c.reason


def test_cuda_without_bf16_picks_fp16_but_fp32_under_fsdp(monkeypatch):
    fake_cuda(monkeypatch, "Tesla V100-SXM2-16GB", bf16=False)
    c = precision.resolve("auto", "cuda")
    assert c.name == "fp16" and "GradScaler" in c.reason and "sm 7.0" in c.reason
    c = precision.resolve("auto", "cuda", fsdp=True)
    assert c.name == "fp32" and "FSDP2" in c.reason


@pytest.mark.parametrize("macos14,want", [(True, "bf16"), (False, "fp32")])
def test_mps_follows_what_torch_supports(monkeypatch, macos14, want):
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: macos14)
    assert precision.resolve("auto", "mps").name == want


@pytest.mark.parametrize("slowdown,want,phrase", [(0.3, "bf16", "3.3x faster"), (9.0, "fp32", "9.0x slower")])
def test_cpu_follows_the_measured_matmul_speed(monkeypatch, fresh_probe, slowdown, want, phrase):
    monkeypatch.setattr(precision, "_matmul_time", lambda dtype, *a, **k: slowdown if dtype == torch.bfloat16 else 1.0)
    c = precision.resolve("auto", "cpu")
    assert c.name == want and phrase in c.reason
    assert c.describe() == f"auto -> {want}: bf16 matmul {phrase} than fp32 on this CPU"


def test_cpu_probe_runs_once_per_process(monkeypatch, fresh_probe):
    calls = []

    def timed(dtype, *a, **k):
        calls.append(dtype)
        return 1.0

    monkeypatch.setattr(precision, "_matmul_time", timed)
    for _ in range(3):
        precision.resolve("auto", "cpu")
    assert calls == [torch.float32, torch.bfloat16]


def test_explicit_choices_are_kept_and_bf16_on_a_slow_cpu_warns_once(monkeypatch, fresh_probe, capsys):
    monkeypatch.setattr(precision, "_matmul_time", lambda dtype, *a, **k: 12.0 if dtype == torch.bfloat16 else 1.0)
    assert [precision.resolve(p, "cpu").name for p in ("fp32", "fp16", "bfloat16", "bf16")] == \
        ["fp32", "fp16", "bf16", "bf16"]
    err = capsys.readouterr().err
    assert err.count("warning: precision bf16 requested") == 1 and "12.0x slower" in err
    assert precision.resolve("fp32", "cpu").describe() == "fp32: requested"


def test_explicit_bf16_on_a_fast_cpu_does_not_warn(monkeypatch, fresh_probe, capsys):
    monkeypatch.setattr(precision, "_matmul_time", lambda dtype, *a, **k: 0.5 if dtype == torch.bfloat16 else 1.0)
    assert precision.resolve("bf16", "cpu").name == "bf16"
    assert "warning" not in capsys.readouterr().err


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        precision.resolve("fp8", "cpu")


def test_real_probe_measures_both_dtypes():
    s = precision.cpu_bf16_slowdown()
    assert 0 < s < float("inf")
    assert precision.resolve("auto", "cpu").name == ("bf16" if s <= 1.0 else "fp32")


def test_auto_picks_fp32_when_kernels_are_limited_to_avx2():
    """With ATen and oneDNN limited to AVX2, bf16 matmuls are emulated: the probe must see that and pick
    fp32 even on an AVX-512-BF16/AMX host (CPU flags alone would still say bf16 there)."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
           "MKL_ENABLE_INSTRUCTIONS": "AVX2", "PYTHONPATH": str(ROOT)}
    code = ("import json, precision; c = precision.resolve('auto', 'cpu'); "
            "print(json.dumps([c.name, precision.cpu_bf16_slowdown()]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    name, slowdown = json.loads(out.stdout.strip().splitlines()[-1])
    assert name == "fp32" and slowdown > 1.5, (name, slowdown)


def test_gpu_peaks_are_dense_and_most_specific_first():
    assert precision.gpu_peak("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert precision.gpu_peak("NVIDIA H100 PCIe", "bf16") == 756e12
    assert precision.gpu_peak("NVIDIA H200", "bf16") == 989e12
    assert precision.gpu_peak("NVIDIA B200", "bf16") == 2250e12
    assert precision.gpu_peak("NVIDIA A100-PCIE-40GB", "fp32") == 19.5e12
    assert precision.gpu_peak("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 on Volta
    assert precision.gpu_peak("Some Future GPU", "bf16") is None


@pytest.mark.parametrize("name,bf16,fp32", [
    ("NVIDIA H100 80GB HBM3", 989e12, 67e12),
    ("NVIDIA H100 PCIe", 756e12, 51e12),
    ("NVIDIA H100 NVL", 835e12, 60e12),
    ("NVIDIA A100-SXM4-80GB", 312e12, 19.5e12),
    ("NVIDIA A100 80GB PCIe", 312e12, 19.5e12),
    ("NVIDIA L40S", 362e12, 91.6e12),
    ("NVIDIA L40", 181e12, 90.5e12),  # not an L4
    ("NVIDIA L4", 121e12, 30.3e12),
    ("NVIDIA A10G", 70e12, 35e12),  # not an A10
    ("NVIDIA A10", 125e12, 31.2e12),
    ("NVIDIA GH200 480GB", 989e12, 67e12),  # not an H200 (the same Hopper rate, its own row)
    ("NVIDIA H200", 989e12, 67e12),
    ("NVIDIA GeForce RTX 4090", 165e12, 82.6e12),
    ("Tesla V100-SXM2-16GB", None, 15.7e12),  # no bf16 on Volta
    ("Tesla T4", None, 8.1e12),
])
def test_gpu_peaks_match_whole_tokens_of_the_device_name(name, bf16, fp32):
    assert precision.gpu_peak(name, "bf16") == bf16
    assert precision.gpu_peak(name, "fp32") == fp32


def test_gpu_peak_rows_are_reached_and_names_that_only_contain_a_key_do_not_match():
    for key, peaks in precision.GPU_PEAKS:  # no row is shadowed by an earlier, less specific one
        assert precision.gpu_peak(f"NVIDIA {key}", "fp32") == peaks["fp32"], key
    for name in ("NVIDIA L40X", "NVIDIA A10X", "NVIDIA XH100", "NVIDIA T40"):
        assert precision.gpu_peak(name, "fp32") is None, name


def test_peak_flops_sources(monkeypatch):
    assert precision.peak_flops("cpu", "fp32", override=1e12) == (1e12, "PEAK_FLOPS")
    peak, src = precision.peak_flops("cpu", "fp32")
    assert peak > 1e9 and src == "measured 1024x1024x1024 fp32 matmul"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery GPU")
    peak, src = precision.peak_flops("cuda", "bf16")
    assert peak is None and "PEAK_FLOPS" in src and "Mystery GPU" in src  # never silently dropped


def test_names_round_trip():
    for name, dtype in precision.DTYPES.items():
        assert precision.dtype_of(name) == dtype and precision.name_of(dtype) == name
    assert precision.dtype_of("float16") == torch.float16 and precision.canonical("bfloat16") == "bf16"


# ---- the training loop's use of the rule --------------------------------------------------------------


def test_train_banner_states_the_auto_choice_and_mfu_uses_its_peak(tmp_path, capsys):
    from helpers import make_pretrain_data, run_inprocess

    data = make_pretrain_data(tmp_path / "data", n_docs=120)
    m = run_inprocess(tmp_path, data, TRAINING_PRECISION="auto", MAX_STEPS=2, VALIDATE_EVERY_X_STEPS=0,
                      SAVE_CHECKPOINTS="false", LOG_EVERY_X_STEPS=1)
    out = capsys.readouterr().out
    want = precision.resolve("auto", "cpu")
    line = next(ln for ln in out.splitlines() if ln.startswith("precision"))
    assert line.split(":", 1)[1].strip() == want.describe() and line.split(": ", 1)[1].startswith("auto -> ")
    peak_line = next(ln for ln in out.splitlines() if ln.startswith("MFU peak"))
    assert f"measured 1024x1024x1024 {want.name} matmul" in peak_line
    mfus = [e["mfu"] for e in m if "loss" in e]
    assert len(mfus) == 2 and all(0 < x < 1 for x in mfus)


def test_fp16_under_fsdp_is_refused(tmp_path):
    from helpers import make_pretrain_data, run_inprocess

    from errors import UserError

    data = make_pretrain_data(tmp_path / "data", n_docs=60)
    with pytest.raises(UserError, match="TRAINING_PRECISION=fp16 with USE_FSDP=true"):
        run_inprocess(tmp_path, data, TRAINING_PRECISION="fp16", USE_FSDP="true", MAX_STEPS=1)
    assert not (tmp_path / "run").exists() and not (tmp_path / "ck").exists()


@pytest.mark.parametrize("slowdown,want", [(0.5, torch.bfloat16), (8.0, torch.float32)])
def test_teacher_precision_auto_follows_the_rule(monkeypatch, fresh_probe, slowdown, want):
    from test_objectives import distill_objective, lm_batch, tiny_model

    monkeypatch.setattr(precision, "_matmul_time", lambda dtype, *a, **k: slowdown if dtype == torch.bfloat16 else 1.0)
    o = distill_objective(TEACHER_PRECISION="auto")
    o.teacher = tiny_model(1)
    info = o.setup(tiny_model(0), None, torch.device("cpu"))
    assert next(o.teacher.parameters()).dtype == want and info["teacher_precision"] == precision.name_of(want)
    loss, _ = o.loss(tiny_model(0), lm_batch())
    assert torch.isfinite(loss)


# ---- one precision per job: rank 0 decides, the checkpoint records it, a resume keeps it ---------------------


def probe_says(monkeypatch, slowdown: float) -> None:
    """The CPU probe measures bf16 `slowdown` times the fp32 time (cache forgotten, so the next resolve asks)."""
    precision.cpu_bf16_slowdown.cache_clear()
    monkeypatch.setattr(precision, "_matmul_time", lambda dtype, *a, **k: slowdown if dtype == torch.bfloat16 else 1.0)


def test_what_a_device_can_never_compute_in(monkeypatch, fresh_probe):
    probe_says(monkeypatch, 0.3)
    assert precision.unavailable("fp32", "cpu") == precision.unavailable("bf16", "cpu") == ""
    probe_says(monkeypatch, 1.6)  # slower here today, but native
    assert precision.unavailable("bf16", "cpu") == ""
    probe_says(monkeypatch, 88.0)
    assert "emulates bf16" in precision.unavailable("bf16", "cpu")
    assert "CUDA" in precision.unavailable("fp16", "cpu")
    fake_cuda(monkeypatch, "Tesla V100-SXM2-16GB", bf16=False)
    assert "V100" in precision.unavailable("bf16", "cuda")
    assert precision.unavailable("fp16", "cuda") == "" and "FSDP2" in precision.unavailable("fp16", "cuda", fsdp=True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: False)
    assert "macOS 14" in precision.unavailable("bf16", "mps")


def test_auto_keeps_the_recorded_precision_whatever_the_probe_says_now(monkeypatch, fresh_probe, capsys):
    probe_says(monkeypatch, 1.6)  # a loaded host's probe flipped: bf16 is native here all the same
    assert precision.resolve("auto", "cpu").name == "fp32"
    c = precision.resolve("auto", "cpu", recorded="bf16")
    assert (c.name, c.requested) == ("bf16", "auto") and "checkpoint" in c.reason
    probe_says(monkeypatch, 0.3)
    assert precision.resolve("auto", "cpu", recorded="fp32").name == "fp32"
    assert precision.resolve("fp32", "cpu", recorded="bf16").name == "fp32"  # an explicit request wins
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("device,recorded,fsdp,want", [("cpu", "fp16", False, "bf16"), ("cuda", "bf16", False, "fp16"),
                                                       ("cuda", "fp16", True, "fp32"), ("cpu", "bf16", False, "fp32")])
def test_auto_changes_a_recorded_precision_the_device_cannot_do_in_one_line(monkeypatch, fresh_probe, capsys,
                                                                             device, recorded, fsdp, want):
    probe_says(monkeypatch, 88.0 if recorded == "bf16" and device == "cpu" else 0.3)  # an AVX2 CPU emulates bf16
    fake_cuda(monkeypatch, "Tesla V100-SXM2-16GB", bf16=False)
    c = precision.resolve("auto", device, fsdp=fsdp, recorded=recorded)
    assert c.name == want and "unavailable" in c.reason
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and f"from the checkpoint's {recorded} to {want}" in lines[0], lines


@pytest.mark.slow
def test_two_ranks_compute_in_rank_0s_precision(tmp_path):
    """Rank 1's probe answers the opposite of rank 0's: both ranks still compute in rank 0's answer."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "precision_worker.py"), str(tmp_path)]
    p = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["own_probe"] for r in ranks] == ["bf16", "fp32"]  # the probes disagree ...
    assert [r["name"] for r in ranks] == ["bf16", "bf16"] and ranks[0]["reason"] == ranks[1]["reason"]  # ... not the job


def _recorded(step_dir: Path) -> str:
    return json.loads((step_dir / "trainer_state.json").read_text())["precision"]


def test_a_resume_keeps_the_recorded_precision_unless_the_host_cannot(tmp_path, pretrain_data, monkeypatch,
                                                                       fresh_probe, capsys):
    kw = dict(TRAINING_PRECISION="auto", SAVE_EVERY_X_STEPS=1, VALIDATE_EVERY_X_STEPS=0, MAX_NUMBER_CHECKPOINTS=3)
    root = tmp_path / "ck" / "pretrain"
    probe_says(monkeypatch, 0.5)
    run_inprocess(tmp_path, pretrain_data, MAX_STEPS=1, **kw)
    assert _recorded(root / ckpt.step_name(1)) == "bf16"
    capsys.readouterr()
    probe_says(monkeypatch, 1.6)  # the probe now says fp32 (a loaded host): the resume keeps bf16, silently
    run_inprocess(tmp_path, pretrain_data, MAX_STEPS=2, **kw)
    assert _recorded(root / ckpt.step_name(2)) == "bf16"
    assert "precision changes" not in capsys.readouterr().err
    # the checkpoint says fp16 (a GPU run's): this CPU cannot, so auto decides afresh and says so once
    state_file = root / ckpt.step_name(2) / "trainer_state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "precision": "fp16"}))
    run_inprocess(tmp_path, pretrain_data, MAX_STEPS=3, **kw)
    assert _recorded(root / ckpt.step_name(3)) == "fp32"
    err = capsys.readouterr().err
    assert err.count("precision changes") == 1 and "from the checkpoint's fp16 to fp32" in err, err
