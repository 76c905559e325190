"""bench/gpu.sh's helper: what each shipped GPU config runs as here, and the one table at the end.

    python -m bench.gpu_report plan ENV_FILE GPUS OUT_JSON [KEY=VALUE ...]   # shell variables on stdout
    python -m bench.gpu_report table OUT_DIR                                  # the markdown table

`plan` resolves the config (with the bench's overrides): ranks to use (FSDP2 configs: up to 8 GPUs, others 1),
micro-batch geometry, precision, and memory_plan's per-GPU peak for exactly that (the figure `python
model_utils.py plan` prints) and whether it fits this GPU. `table` reads each config's runs under OUT_DIR:
step time and MFU from metrics.jsonl (MFU against the datasheet peak train.py uses, precision.peak_flops),
peak memory from bench/gpu_run.py's records, and the checks (validation, samples, save, resume, 2 ranks ==
1 rank)."""

from __future__ import annotations

import json
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# relative loss difference allowed between FSDP2 on 2 ranks and 1 rank: fp32 sums in another order; bf16
# autocast also rounds the all-reduced gradients' inputs differently per shard layout
EQUAL_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-3, "fp16": 5e-3}


def plan(env_file: str, gpus: int, out: str, overrides: list[str]) -> int:
    import torch

    import config
    import memory_plan
    import precision
    import tokenizer

    kv = dict(o.split("=", 1) for o in overrides)
    cfg = config.load_config(env_file, kv, use_environ=False)
    t, s = cfg.training, cfg.system
    device = torch.device(s.device if s.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    ranks = min(gpus, 8) if s.use_fsdp else 1
    prec = precision.resolve(t.training_precision, device, fsdp=s.use_fsdp).name
    vocab = tokenizer.load_tokenizer(cfg.tokenizer.tokenizer_checkpoint_path).vocab_size
    args = cfg.model_args(vocab)
    T, mb = cfg.model.max_seq_len, t.max_batch_size
    p = memory_plan.plan(args, ranks, prec if prec in memory_plan.PRECISIONS else "bf16", t.optimizer,
                         s.activation_checkpointing, mb, T)
    total = torch.cuda.get_device_properties(0).total_memory if device.type == "cuda" else None
    fits = total is None or p.peak <= total * (1 - memory_plan.HEADROOM)
    info = {"ranks": ranks, "fsdp": s.use_fsdp, "precision": prec, "seq_len": T, "micro_batch": mb,
            "plan_peak_bytes": p.peak, "device_bytes": total, "fits": fits,
            "plan_command": f"python model_utils.py plan --preset {cfg.model.model_preset} --gpus {ranks} "
                            f"--precision {prec}{' --activation-checkpointing' if s.activation_checkpointing else ''}"
                            f" --micro-batch {mb} --seq-len {T} --optimizer {t.optimizer}"}
    Path(out).write_text(json.dumps(info, indent=1))
    print(f"RANKS={ranks} FITS={int(fits)} SEQ={T} MB={mb} PREC={shlex.quote(prec)}")
    return 0


def _metrics(run: Path) -> list[dict]:
    f = run / "run" / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []


def _losses(metrics: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in metrics if "loss" in e}


def _gib(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**30:.2f}"


def _rc(run: Path) -> int | None:
    f = run / "rc"
    return int(f.read_text()) if f.is_file() else None


def row(cfg_dir: Path) -> tuple[list[str], bool]:
    """-> (cells, passed) for one config's runs."""
    info = json.loads((cfg_dir / "plan.json").read_text())
    name, steps = cfg_dir.name, int((cfg_dir / "steps").read_text())
    if not info["fits"]:
        need = f"plan {_gib(info['plan_peak_bytes'])} GiB > {_gib(info['device_bytes'])} GiB per GPU"
        return [name, str(info["ranks"]), f"skipped ({need}: more GPUs)", *["—"] * 6, f"`{info['plan_command']}`",
                "—"], True
    a, b, one = cfg_dir / "a", cfg_dir / "b", cfg_dir / "one"
    ma, mb = _metrics(a), _metrics(b)
    la, lb = _losses(ma), _losses(mb)
    log_a = (a / "train.log").read_text(errors="replace") if (a / "train.log").is_file() else ""
    checks = {
        "train": _rc(a) == 0 and sorted(la) == list(range(1, steps + 1)),
        "val": any("val_loss" in e for e in ma),
        "samples": "sample |" in log_a,
        "save": (a / "ck" / "pretrain" / f"step_{steps:07d}").is_dir(),
        "resume": _rc(b) == 0 and sorted(lb) == [steps + 1, steps + 2],
    }
    steady = [e for e in ma if "dt_ms" in e][1:] or [e for e in ma if "dt_ms" in e]  # step 1 compiles
    step_ms = statistics.median(e["dt_ms"] for e in steady) if steady else None
    mfu = [e["mfu"] for e in steady if e.get("mfu") is not None]
    peaks = [json.loads(f.read_text()) for f in sorted(a.glob("peak_memory_rank*.json"))]
    peak = max((p["bytes"] for p in peaks), default=None)
    equal = "—"
    if (one / "rc").is_file():
        lo = _losses(_metrics(one))
        shared = sorted(set(lo) & set(la))
        diff = max((abs(lo[s] - la[s]) / abs(lo[s]) for s in shared), default=float("nan"))
        ok = _rc(one) == 0 and len(shared) == steps and diff <= EQUAL_TOLERANCE[info["precision"]]
        checks["2 = 1 rank"] = ok
        equal = f"{'pass' if ok else '**fail**'} ({diff:.1e})"
    passed = all(checks.values())
    status = "pass" if passed else "**fail**: " + ", ".join(k for k, v in checks.items() if not v)
    peak_kind = peaks[0]["kind"] if peaks else ""
    return [name, str(info["ranks"]), status, f"{step_ms:,.0f}" if step_ms else "—",
            f"{statistics.median(mfu):.1%}" if mfu else "—",
            f"{_gib(peak)} ({peak_kind})" if peak is not None else "—", _gib(info["plan_peak_bytes"]),
            " ".join(k for k in ("val", "samples", "save", "resume") if checks[k]) or "—", equal,
            f"`{info['plan_command']}`", _syncs(peaks, steps)], passed


def _syncs(peaks: list[dict], steps: int) -> str:
    """The host syncs CUDA's sync debug mode reported on rank 0 over the whole run (evaluation, sampling and the
    save included) and per training step; '—' on CPU."""
    counts = [p.get("cuda_syncs") for p in peaks[:1] if p.get("cuda_syncs") is not None]
    return f"{counts[0]:,} ({counts[0] / steps:.1f} / step)" if counts else "—"


def table(out: str) -> int:
    dirs = sorted(d for d in Path(out).iterdir() if (d / "plan.json").is_file())
    head = ["config", "ranks", "status", "step ms (median)", "MFU (datasheet peak)", "peak memory GiB",
            "plan peak GiB", "checked", "2 ranks = 1 rank (max rel. loss diff)", "plan command",
            "CUDA host syncs, whole run (sync debug mode)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    ok = True
    for d in dirs:
        cells, passed = row(d)
        ok &= passed
        print("| " + " | ".join(cells) + " |")
    return 0 if ok and dirs else 1


if __name__ == "__main__":
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "plan":
        sys.exit(plan(rest[0], int(rest[1]), rest[2], rest[3:]))
    sys.exit(table(rest[0]))
