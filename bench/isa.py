"""CPU instruction-set profiles for the benches: `--isa native|avx512_bf16|avx2` runs a bench (and every child it
starts) as a host with at most that instruction set would run it.

The kernel libraries read their limits from the environment once, when their first kernel runs: ATen's dispatch
capability (ATEN_CPU_CAPABILITY), oneDNN's (ONEDNN_MAX_CPU_ISA) and MKL's (MKL_ENABLE_INSTRUCTIONS). So a
bench given --isa re-executes itself with the profile's environment before anything runs (`relaunch`); its
children inherit it. Each profile gets its own inductor cache directory: inductor's cache does not key on these
variables, so a kernel compiled under one profile would otherwise be served to another. `verified()` (called
where a result file records the profile) checks in the running process that the profile took effect.

avx512_bf16 is a stand-in for an AVX-512-BF16 host without AMX (AMD Zen 4/5) on a CPU that has AMX; avx2 for
AVX2-only laptops and VMs. Timings under a narrowed profile are indicative: the memory system and the core are
still the host's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROFILES: dict[str, dict[str, str]] = {
    "native": {},
    "avx512_bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "MKL_ENABLE_INSTRUCTIONS": "AVX512_E3"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
MARK = "LLAMA3_BENCH_ISA"  # the profile this process was (re)started under
# the CPU flag each narrowed profile needs, and ATen's capability under it
NEEDS = {"avx512_bf16": "avx512_bf16", "avx2": "avx2"}
ATEN = {"avx512_bf16": "AVX512", "avx2": "AVX2"}


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--isa", default=None, choices=list(PROFILES),
                        help="run as a host with at most this instruction set (native: this CPU's own; "
                             "avx512_bf16: AVX-512-BF16 without AMX; avx2: an AVX2-only host; timings indicative)")


def cpu_flags() -> set[str]:
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


def environment(isa: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) with the profile's limits set (and any other profile's removed), its own
    inductor cache directory and the mark naming the profile."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in LIMITS}
    env.update(PROFILES[isa])
    if isa != "native":
        env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tempfile.gettempdir()) / f"torchinductor-{os.getuid()}-{isa}")
    env[MARK] = isa
    return env


def relaunch(isa: str | None, module: str) -> None:
    """Re-execute `python -m module <same arguments>` under the profile unless this process already runs under
    it (then return). No kernel has run yet when a bench's main() calls this first, and exec replaces the process
    (nothing of it survives): the new one starts with the profile in place."""
    if isa is None or os.environ.get(MARK) == isa:
        return
    flag, flags = NEEDS.get(isa), cpu_flags()
    if flag and flags and flag not in flags:
        from errors import UserError

        raise UserError(f"--isa {isa}: this CPU has no {flag} instructions; pick a profile it has "
                        f"(native{', avx2' if 'avx2' in flags else ''})")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], environment(isa))


def onednn_isa() -> str:
    """The instruction set oneDNN dispatches to in a process with this environment (its verbose line, from a
    child: oneDNN prints it once, when it first initializes)."""
    code = "import torch; torch.zeros(4, 4).to_mkldnn()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "ONEDNN_VERBOSE": "1"})
    for line in r.stdout.splitlines():
        if ",cpu,isa:" in line:
            return line.split(",cpu,isa:", 1)[1].strip()
    return "unknown"


def verified() -> str:
    """The profile this process runs under, checked: -> "<profile> profile[ (VAR=value ...)], oneDNN isa <what
    oneDNN reports>". Raises RuntimeError when the environment does not hold the profile's limits or ATen's
    kernel capability is not the profile's (the limits were set too late, or the CPU lacks the instructions)."""
    import torch

    set_now = {k: os.environ[k] for k in LIMITS if k in os.environ}
    isa = os.environ.get(MARK)
    if isa is None:  # started without --isa: name the limits the environment holds (a user may set them by hand)
        isa = next((name for name, limits in PROFILES.items() if limits == set_now), "custom")
    elif PROFILES.get(isa) != set_now:
        raise RuntimeError(f"{MARK}={isa}: the profile wants {PROFILES.get(isa) or 'no ISA limits'} in the "
                           f"environment, this process has {set_now or 'none'}")
    capability = torch.backends.cpu.get_cpu_capability()
    if isa in ATEN and capability != ATEN[isa]:
        raise RuntimeError(f"the {isa} profile wants ATen capability {ATEN[isa]}, this process runs {capability}")
    env = " ".join(f"{k}={v}" for k, v in set_now.items())
    return f"{isa} profile{f' ({env})' if env else ''}, oneDNN isa {onednn_isa()}"
