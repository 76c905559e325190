"""Which floating-point precision to compute in, and how fast the device computes in it.

One table maps precision names to dtypes (`DTYPES`, with the long torch names as aliases). `resolve()`
turns a requested precision (`auto`, `bf16`, `fp16`, `fp32`) into the one a run uses and says why:

- CUDA: bf16 where the GPU does it natively (`torch.cuda.is_bf16_supported(including_emulation=False)`,
  Ampere and newer); otherwise fp16 with a GradScaler, except under FSDP2, where every rank would see
  only its shard's overflow: fp32 there.
- CPU: bf16 when a short bf16 matmul is at least as fast as the same fp32 one (AVX-512-BF16 / AMX
  hosts), fp32 otherwise (AVX2-only or AVX-512 without bf16: bf16 is emulated and many times slower).
  A measurement rather than CPU flags: `get_cpu_capability()` reports "AVX512" on CPUs that have no
  bf16 instructions, and flags ignore `ONEDNN_MAX_CPU_ISA`. Measured once per process (~0.1 s).
- MPS: bf16 on macOS 14 and newer (where torch supports it), fp32 before.

An explicit bf16 on a CPU without native bf16 is honoured with one warning. `auto` with the precision a
resumed checkpoint `recorded` keeps it (the probe may answer otherwise today) unless the device cannot
compute in it (`unavailable()`), then decides afresh and prints one line saying so.

`peak_flops()` gives the dense peak FLOP/s of one device in the precision actually used, for MFU: a
table of vendor dense (no sparsity) tensor-core figures for known GPUs, and on CPU a measured
1024 x 1024 x 1024 matmul in that dtype (the best of a few repetitions), cached per process.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys
import time
from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALIASES: dict[str, str] = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
CHOICES: tuple[str, ...] = ("auto", *DTYPES)

# the matmul the CPU probe times: small enough to take milliseconds natively and ~0.1 s emulated
PROBE_SHAPE = (256, 512, 512)
# the matmul the CPU peak is measured with (M, K, N)
PEAK_SHAPE = (1024, 1024, 1024)


def canonical(name: str) -> str:
    """'bfloat16' -> 'bf16'; 'auto' and the short names unchanged. Raises ValueError on anything else."""
    name = ALIASES.get(name, name)
    if name not in CHOICES:
        raise ValueError(f"unknown precision {name!r}: use one of {', '.join(CHOICES)}")
    return name


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a concrete precision name (short or long form)."""
    return DTYPES[canonical(name)]


def name_of(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bf16' (the inverse of dtype_of)."""
    return next(k for k, v in DTYPES.items() if v == dtype)


@dataclass(frozen=True)
class Choice:
    """The precision a run computes in: `name` in DTYPES, what was asked for, and why."""

    name: str
    requested: str
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def describe(self) -> str:
        """One line for a start-up banner, e.g. 'auto -> fp32: bf16 matmul 9.1x slower than fp32 on this CPU'."""
        head = f"{self.requested} -> {self.name}" if self.requested != self.name else self.name
        return f"{head}: {self.reason}" if self.reason else head


def _best_time(fn, reps: int, budget_s: float) -> float:
    """Minimum wall time of fn() over up to `reps` calls (after one warm-up), stopping once `budget_s` is spent."""
    fn()
    best, spent = float("inf"), 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent > budget_s:
            break
    return best


def _matmul_time(dtype: torch.dtype, shape: tuple[int, int, int], reps: int, budget_s: float,
                 device: str = "cpu") -> float:
    m, k, n = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=g).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        torch.mm(a, b)
        sync()

    return _best_time(run, reps, budget_s)


@functools.lru_cache(maxsize=1)
def cpu_bf16_slowdown() -> float:
    """bf16 matmul time / fp32 matmul time on this CPU, measured once per process (> 1: bf16 is slower)."""
    fp32 = _matmul_time(torch.float32, PROBE_SHAPE, reps=5, budget_s=0.05)
    bf16 = _matmul_time(torch.bfloat16, PROBE_SHAPE, reps=5, budget_s=0.05)
    return bf16 / fp32


def _cpu_reason(slowdown: float) -> str:
    if slowdown <= 1.0:
        return f"bf16 matmul {1 / slowdown:.1f}x faster than fp32 on this CPU"
    return f"bf16 matmul {slowdown:.1f}x slower than fp32 on this CPU"


_warned: set[str] = set()  # the warnings this process has printed: each is printed once per process


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        print(f"warning: {message}", file=sys.stderr, flush=True)


# bf16 this many times slower than fp32 on a CPU means emulated bf16 (AVX2: ~20-90x), not a probe that flipped
# on a loaded host (native bf16 measures ~0.2-0.5x, and a loaded probe stays within ~2x of that)
CPU_BF16_EMULATED = 4.0


def unavailable(name: str, device: torch.device | str, fsdp: bool = False) -> str:
    """Why `auto` could never pick precision `name` on `device` ('' when it could): the precisions a device
    can train in at speed. fp32 runs everywhere; bf16 needs native bf16 on CUDA, macOS 14 on MPS, and a CPU
    that does not emulate it (the probe measuring it CPU_BF16_EMULATED times slower than fp32 or more: a
    host's load moves the probe far less than that); fp16 is for CUDA GPUs, and not under FSDP2."""
    name, device = canonical(name), torch.device(device)
    if name == "fp32":
        return ""
    if name == "fp16":
        if device.type != "cuda":
            return f"fp16 with GradScaler is for CUDA GPUs, not {device.type}"
        return "fp16's GradScaler would check overflow per FSDP2 shard" if fsdp else ""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return f"{torch.cuda.get_device_name(device)} has no native bf16"
    if device.type == "mps" and not torch.backends.mps.is_macos_or_newer(14, 0):
        return "MPS before macOS 14 has no bf16"
    if name == "bf16" and device.type == "cpu" and cpu_bf16_slowdown() >= CPU_BF16_EMULATED:
        return f"this CPU emulates bf16 ({_cpu_reason(cpu_bf16_slowdown())})"
    return ""


def resolve(requested: str, device: torch.device | str, fsdp: bool = False, recorded: str | None = None) -> Choice:
    """The precision to compute in on `device` for a requested one ('auto' or a concrete name).

    fsdp: the model is sharded with FSDP2 (auto then never picks fp16: GradScaler's overflow check is
    per rank). Explicit choices are kept; an explicit bf16 on a CPU without native bf16 warns once.
    recorded: the precision a resumed checkpoint computed in. `auto` keeps it, so a run and its resume compute
    alike even where the CPU probe would now answer otherwise; when this device cannot compute in it, auto
    decides afresh and one line says what changed and why."""
    requested = canonical(requested)
    device = torch.device(device)
    if requested == "auto" and recorded:
        why_not = unavailable(recorded, device, fsdp)
        if not why_not:
            return Choice(canonical(recorded), "auto", "kept from the checkpoint being resumed")
        fresh = resolve("auto", device, fsdp)
        print(f"warning: precision changes from the checkpoint's {recorded} to {fresh.name}: {why_not} "
              f"({fresh.reason})", file=sys.stderr, flush=True)
        return Choice(fresh.name, "auto", f"{fresh.reason}; the checkpoint's {recorded} is unavailable: {why_not}")
    if requested != "auto":
        if requested == "bf16" and device.type == "cpu":
            slowdown = cpu_bf16_slowdown()
            if slowdown > 1.0:
                _warn_once("cpu-bf16", f"precision bf16 requested, but {_cpu_reason(slowdown)}: it runs, slowly "
                           "(set TRAINING_PRECISION=auto or fp32 / --dtype auto for the fast choice)")
        return Choice(requested, requested, "requested")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return Choice("bf16", "auto", f"native bf16 on {name}")
        major, minor = torch.cuda.get_device_capability(device)
        if fsdp:
            return Choice("fp32", "auto", f"no native bf16 on {name} (sm {major}.{minor}) and fp16's GradScaler "
                          "would check overflow per FSDP2 shard")
        return Choice("fp16", "auto", f"no native bf16 on {name} (sm {major}.{minor}): fp16 with GradScaler")
    if device.type == "mps":
        if torch.backends.mps.is_macos_or_newer(14, 0):
            return Choice("bf16", "auto", "bf16 on MPS (macOS 14+)")
        return Choice("fp32", "auto", "MPS before macOS 14 has no bf16")
    if device.type == "cpu":
        slowdown = cpu_bf16_slowdown()
        return Choice("bf16" if slowdown <= 1.0 else "fp32", "auto", _cpu_reason(slowdown))
    return Choice("fp32", "auto", f"no precision rule for device type {device.type!r}")


def autocast(device_type: str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """The training forward's mixed precision: nothing for fp32, else torch.autocast to `dtype` with its weight
    cache off. The cache keeps the low-precision copy of every fp32 weight it casts until the autocast region
    ends, i.e. for the whole forward: with activation checkpointing that is a copy of the whole model, on every
    FSDP2 rank (the copies are otherwise only saved per block for its backward). Without it each matmul casts
    its weight again when it runs; the values are the same."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, cache_enabled=False)


def inference_dtype(requested: str, device: torch.device | str) -> torch.dtype:
    """The dtype a CLI that only runs the model (generate, evaluation, caches) computes in for --dtype."""
    return resolve(requested, device).dtype


# Dense (no sparsity) peak FLOP/s per GPU. A row's key is a few whole tokens of torch.cuda.get_device_name
# (see gpu_peak: "NVIDIA L40" is not an "L4", "A10G" not an "A10", "GH200" not an "H200"); rows with more
# tokens come first, so "H100 PCIe" wins over "H100". Vendor datasheet tensor-core figures (the dense
# column, half the "with sparsity" one); fp32 is the plain (non-TF32) rate, which torch's default matmul uses.
GPU_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    ("RTX 4090", {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12}),
    ("B200", {"bf16": 2250e12, "fp16": 2250e12, "fp32": 80e12}),
    ("GH200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),  # NVIDIA GH200 Grace Hopper Superchip datasheet
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),  # SXM
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),  # SXM and PCIe
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),  # NVIDIA L40S datasheet
    ("L40", {"bf16": 181e12, "fp16": 181e12, "fp32": 90.5e12}),  # NVIDIA L40 datasheet
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
    # AWS's A10 variant (EC2 G5): NVIDIA publishes no datasheet for it; the figures AWS and NVIDIA quote for
    # G5 (tabulated in Baseten's "NVIDIA A10 vs A10G" comparison) give it half the A10's tensor rate
    ("A10G", {"bf16": 70e12, "fp16": 70e12, "fp32": 35e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12}),  # NVIDIA A10 datasheet
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),
    ("T4", {"fp16": 65e12, "fp32": 8.1e12}),
)


def name_tokens(name: str) -> list[str]:
    """A device name as upper-case alphanumeric tokens: "NVIDIA A100-SXM4-80GB" -> NVIDIA, A100, SXM4, 80GB."""
    return re.findall(r"[A-Z0-9]+", name.upper())


def gpu_peak(name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of the GPU called `name` in `precision`, or None when the table does not know it.
    A row matches when every token of its key is a whole token of the name."""
    tokens = set(name_tokens(name))
    for key, peaks in GPU_PEAKS:
        if set(name_tokens(key)) <= tokens:
            return peaks.get(precision)
    return None


@functools.lru_cache(maxsize=4)
def measured_cpu_peak(precision: str) -> float:
    """FLOP/s of a PEAK_SHAPE matmul in `precision` on this CPU with torch's threads (best of a few runs)."""
    m, k, n = PEAK_SHAPE
    return 2 * m * k * n / _matmul_time(DTYPES[precision], PEAK_SHAPE, reps=8, budget_s=0.3)


def peak_flops(device: torch.device | str, precision: str, override: float = 0.0) -> tuple[float | None, str]:
    """-> (peak FLOP/s of one device in `precision` or None, where the figure comes from)."""
    device = torch.device(device)
    if override > 0:
        return override, "PEAK_FLOPS"
    if device.type == "cpu":
        m, k, n = PEAK_SHAPE
        return measured_cpu_peak(precision), f"measured {m}x{k}x{n} {precision} matmul"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak(name, precision)
        if peak is None:
            return None, f"no dense {precision} peak known for {name}: set PEAK_FLOPS to report MFU"
        return peak, f"{name} dense {precision} datasheet peak"
    return None, f"no peak known for device {device.type}: set PEAK_FLOPS to report MFU"
