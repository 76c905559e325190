"""bench/gpu.sh --dry-run: the GPU bench's logic on CPU (debug preset) — a shipped config's run, its
validation, samples, checkpoint and resume, the table with step time, MFU and peak memory against the plan,
logs kept; a broken check turns the table's status and exit code to failure."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import ROOT, subprocess_env


@pytest.mark.slow
def test_gpu_bench_dry_run_runs_a_config_saves_resumes_and_reports(tmp_path):
    out = tmp_path / "bench"
    env = {**subprocess_env(), "PY": sys.executable}
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run", "--configs", "gpu-125m gpu-1b-fsdp", "--steps", "2",
                        "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    row = next(line for line in p.stdout.splitlines() if line.startswith("| gpu-125m"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == ["1", "pass"], row
    assert float(cells[3].replace(",", "")) > 0 and cells[4].endswith("%")  # step ms, MFU
    assert "cpu peak RSS" in cells[5] and float(cells[6]) > 0  # measured peak, planned peak
    assert cells[7] == "val samples save resume"
    assert "model_utils.py plan --preset debug" in cells[9]
    assert cells[10] == "—"  # CUDA's sync debug mode counts host syncs on GPUs only
    fsdp = next(line for line in p.stdout.splitlines() if line.startswith("| gpu-1b-fsdp"))
    cells = [c.strip() for c in fsdp.strip("|").split("|")]  # FSDP2 on 2 ranks: sampling included, = 1 rank
    assert cells[1:3] == ["2", "pass"] and cells[7] == "val samples save resume" and cells[8].startswith("pass"), fsdp
    run = out / "gpu-125m"
    assert (run / "a" / "train.log").is_file() and (run / "b" / "train.log").is_file()  # logs kept
    assert (out / "table.md").read_text().count("| gpu-125m") == 1
    # a resume that did not continue is a failure of the table and of its exit code
    (run / "b" / "run" / "metrics.jsonl").unlink()
    t = subprocess.run([sys.executable, "-m", "bench.gpu_report", "table", str(out)], cwd=ROOT,
                       env=env, capture_output=True, text=True)
    assert t.returncode == 1 and "**fail**: resume" in t.stdout, t.stdout
