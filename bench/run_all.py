"""Run every benchmark and print ONE markdown table (also written to bench/results.md).

    python -m bench.run_all [--quick] [--timeout 300] [--out bench/results.md] [--save run_all]

Jobs (each in its own subprocess, each with a timeout so one slow job cannot eat the budget):
training step vs transformers (bench/train_throughput.py) on `small` and `smollm2-135m`: in bf16 eager and
torch.compile plus fp32 eager where the CPU has native bf16, fp32 eager and compiled where it does not; greedy generation vs transformers generate (bench/generate_throughput.py) on SmolLM2-135M
and `tiny`; data preparation vs raw tiktoken (bench/data_prep.py); HellaSwag evaluator vs a per-ending
loop (bench/hellaswag_throughput.py, lm-eval skipped: it needs its own venv); whole jobs against TRL,
transformers Trainer / generate and lm-eval (bench/jobs.py, peers in bench-only venvs). --quick shrinks every job
(shorter sequences, fewer rounds) for a smoke run; the targets are only judged on the full settings.
--isa native|avx512_bf16|avx2 runs everything as a host with at most that instruction set (bench/isa.py: this
process re-executes itself under the profile's environment, which every job inherits; the result file records
the profile, verified in a child). --dry-run prints the host line (from a child, as the jobs would see it) and
the commands without running them.
--save NAME also writes the rows to bench/results/NAME.json and, on a full run, the whole-job figures to
bench/results/jobs.json: the files bench/readme_tables.py renders the README's tables from.
Figures are ratios measured side by side inside one process; absolute numbers drift with machine load.
The header names the CPU, PyTorch's kernel capability and the precision rule's measurement, so every
figure can be read against the host it was measured on.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import precision
from bench import isa
from fileio import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
DRY_RUN = False  # --dry-run: run() prints the commands instead of running them


def host_line() -> str:
    """CPU model, ATen's kernel capability, the instruction-set profile and what the precision rule measured on
    this host, in this process."""
    from bench import results_file

    return f"{results_file.host()}, {results_file.cpu_profile()}"


@functools.cache
def child_host_line() -> str:
    """host_line() as a child process started like the jobs reports it (their environment: the --isa profile)."""
    r = subprocess.run([PY, "-m", "bench.results_file"], cwd=ROOT, capture_output=True, text=True, env=child_env())
    if r.returncode:
        raise RuntimeError(f"bench/results_file.py failed: {r.stderr.strip()[-500:]}")
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    return f"{rec['host']}, {rec['cpu_profile']}"


def child_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
            "TOKENIZERS_PARALLELISM": "false"}


def precisions() -> list[str]:
    """bf16 and fp32 where the CPU does bf16 natively; fp32 alone where bf16 would be emulated."""
    return ["bf16", "fp32"] if precision.resolve("auto", "cpu").name == "bf16" else ["fp32"]


def run(cmd: list[str], timeout: float) -> tuple[str, str]:
    """-> (stdout, status) where status is "ok", "timeout" or "failed (rc N)"."""
    if DRY_RUN:
        print(f"  would run: {' '.join(cmd[1:])}", flush=True)
        return "", "dry run"
    env = child_env()
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        print(f"  timeout after {timeout:.0f}s: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        return out, "timeout"
    print(f"  {time.perf_counter() - t0:5.0f}s rc={r.returncode}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    if r.returncode:
        print(r.stderr[-1500:], file=sys.stderr)
        return r.stdout, f"failed (rc {r.returncode})"
    return r.stdout, "ok"


def json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def md_rows(text: str) -> list[list[str]]:
    """Data rows of the markdown tables a bench printed (header and separator rows dropped)."""
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in text.splitlines() if ln.startswith("|")]
    return [r for r in rows if not set("".join(r)) <= set("-: ") and not r[0].lower().startswith(("workers",
                                                                                                  "evaluator"))]


def verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("yes" if ok else "**no**")


def train_rows(a: argparse.Namespace, table: list[tuple]) -> None:
    precs = precisions()
    # bf16 host: bf16 eager + compiled, fp32 eager; fp32-only host: fp32 eager + compiled
    settings = [(precs[0], False), (precs[0], True), *[(p, False) for p in precs[1:]]]
    for preset in ("small", "smollm2-135m"):
        for prec, compile_ in settings:
            vocab = "32000" if preset == "small" else "49152"
            cmd = [PY, "-m", "bench.train_throughput", "--preset", preset, "--precision", prec, "--vocab", vocab,
                   "--json", "--batch", "1" if a.quick else "2", "--rounds", "2" if a.quick else "3",
                   "--steps", "1" if a.quick else "2", *(["--seq", "128"] if a.quick else []),
                   *(["--seq", "512"] if preset == "smollm2-135m" and not a.quick else []),
                   *(["--compile"] if compile_ else [])]
            out, status = run(cmd, a.timeout * (2 if compile_ else 1))
            setting = f"{preset} {prec} {'compiled' if compile_ else 'eager'}"
            res = json_lines(out)
            if not res:
                table.append(("train tokens/s", setting, status, "", "", "≥ 1×", verdict(None)))
                continue
            r = res[-1]
            ratio = r["ratio_ours_over_hf"]
            table.append(("train tokens/s", setting, f"{r['ours_tokens_per_s']:,.0f}", f"{r['hf_tokens_per_s']:,.0f}",
                          f"{ratio:.2f}×", "≥ 1×", verdict(ratio >= 1.0)))
            table.append((f"train MFU (of the {prec} matmul peak)", setting, f"{r['ours_mfu']:.1%}",
                          f"{r['hf_mfu']:.1%}", f"peak {r['matmul_peak_tflops'] * 1e3:.0f} GFLOP/s", "", "—"))
            mo, mh = r["ours_peak_memory_mb"], r["hf_peak_memory_mb"]
            table.append(("train peak memory MB", setting, f"{mo:,.0f}", f"{mh:,.0f}",
                          f"{mo / mh:.2f}×" if mh > 0 else "n/a (RSS growth 0)", "≤ 1×", verdict(mo <= mh)))


def generate_rows(a: argparse.Namespace, table: list[tuple]) -> None:
    cmd = [PY, "-m", "bench.generate_throughput", "--json", "--models", "smollm2", "tiny", "--dtypes", *precisions(),
           "--new-tokens", "16" if a.quick else "64", "--rounds", "2" if a.quick else "3"]
    out, status = run(cmd, a.timeout * 3)
    rows = json_lines(out)
    if not rows:
        table.append(("generate tokens/s", "all", status, "", "", "", verdict(None)))
    for r in rows:
        target = r["model"] == "smollm2" and r["batch"] == 1 and r["dtype"] == precisions()[0]
        table.append(("generate tokens/s (greedy)", f"{r['model']} {r['dtype']} batch {r['batch']}",
                      f"{r['ours_tokens_per_s']:.1f}", f"{r['hf_tokens_per_s']:.1f}", f"{r['ratio']:.2f}×",
                      "≥ 1.5×" if target else "", verdict(r["ratio"] >= 1.5) if target else "—"))


def data_prep_rows(a: argparse.Namespace, table: list[tuple]) -> None:
    out, status = run([PY, "-m", "bench.data_prep", "--mb", "2" if a.quick else "10"], a.timeout)
    rows = md_rows(out)
    if not rows:
        table.append(("data prep MB/s", "", status, "", "", "", verdict(None)))
    for r in rows:  # | workers | raw MB/s | raw tok/s | ours MB/s | ours tok/s | ours / raw |
        table.append(("data prep MB/s (vs raw tiktoken)", f"{r[0]} worker(s)", r[3], r[1], r[5], "", "—"))


def hellaswag_rows(a: argparse.Namespace, table: list[tuple]) -> None:
    out, status = run([PY, "-m", "bench.hellaswag_throughput", "--skip-lm-eval", "--repeats", "1",
                       "--limit", "8" if a.quick else "32"], a.timeout)
    rows = md_rows(out)
    if not rows:
        table.append(("hellaswag examples/s", "", status, "", "", "", verdict(None)))
    ours = next((r for r in rows if r[0].startswith("ours: batched, context once")), None)
    for r in rows:  # | evaluator | examples/s | seconds | acc | acc_norm | speedup of ours |
        if r is not ours and ours is not None:
            table.append(("hellaswag examples/s", f"ours vs {r[0]}", ours[1], r[1], r[5], "", "—"))


def jobs_rows(a: argparse.Namespace, table: list[tuple]) -> None:
    """bench/jobs.py: whole jobs against TRL / transformers Trainer / generate / lm-eval; its table's rows."""
    # the README's whole-job table reads jobs.json; a profile's run keeps its own file
    save = ["--save", f"jobs_{a.isa}" if a.isa else "jobs"] if a.save and not a.quick else []
    out, status = run([PY, "-m", "bench.jobs", *(["--quick"] if a.quick else []), *save], a.timeout * 12)
    rows = [r for r in md_rows(out) if len(r) == 7 and r[0] != "job"]
    if not rows:
        table.append(("whole jobs (bench/jobs.py)", "", status, "", "", "", verdict(None)))
    table.extend(tuple(r) for r in rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: smaller shapes, fewer rounds")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per job (compiled jobs get 2x)")
    p.add_argument("--only", nargs="+", default=["train", "generate", "data_prep", "hellaswag", "jobs"],
                   choices=["train", "generate", "data_prep", "hellaswag", "jobs"])
    p.add_argument("--out", default=str(ROOT / "bench" / "results.md"))
    p.add_argument("--save", default=None, metavar="NAME",
                   help="also write the table's rows to bench/results/NAME.json (read by bench/readme_tables.py)")
    p.add_argument("--results-dir", default=None, help=argparse.SUPPRESS)  # --save's directory (tests)
    p.add_argument("--dry-run", action="store_true", help="print the host line and the commands, run nothing")
    isa.add_argument(p)
    a = p.parse_args()
    isa.relaunch(a.isa, "bench.run_all")
    global DRY_RUN
    DRY_RUN = a.dry_run
    t0 = time.perf_counter()
    table: list[tuple] = []
    jobs = {"train": train_rows, "generate": generate_rows, "data_prep": data_prep_rows, "hellaswag": hellaswag_rows,
            "jobs": jobs_rows}
    for name in a.only:
        print(f"[{name}]", file=sys.stderr, flush=True)
        try:
            jobs[name](a, table)
        except Exception as e:  # one broken bench must not lose the others' rows
            table.append((name, "", f"error: {type(e).__name__}: {e}", "", "", "", verdict(None)))
    lines = ["| benchmark | setting | ours | reference (transformers / raw / loop) | ratio | target | met |",
             "|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table]
    header = (f"bench/run_all.py{' --quick' if a.quick else ''}: {time.strftime('%Y-%m-%d %H:%M')}, "
              f"{time.perf_counter() - t0:.0f}s total\n\nhost: {child_host_line()}")
    text = header + "\n\n" + "\n".join(lines) + "\n"
    print(text)
    if not a.dry_run:
        write_text_atomic(a.out, text)
    if a.save:
        from bench import results_file

        keys = ("benchmark", "setting", "ours", "reference", "ratio", "target", "met")
        results_file.write(a.save, "python -m bench.run_all " + " ".join(sys.argv[1:]),
                           {"rows": [dict(zip(keys, (str(c) for c in row), strict=True)) for row in table]},
                           out_dir=Path(a.results_dir) if a.results_dir else results_file.RESULTS,
                           host_and_profile=results_file.split_host_line(child_host_line()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
