"""Rank-aware logging: a console line per step, `<RUN_DIR>/metrics.jsonl` (one JSON object per event,
Weights & Biases when enabled (WANDB_MODE=offline works), a start-up banner, a loss-curve
PNG and a one-line summary at the end. Only rank 0 writes anything; other ranks' calls are no-ops."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import torch


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Logger:
    """console + metrics.jsonl + W&B. `log(event)` takes a flat dict with a "step" key."""

    def __init__(self, run_dir: str | os.PathLike, is_main: bool, config: dict | None = None,
                 wandb_enabled: bool = False, wandb_project: str = "", wandb_run_name: str = "",
                 wandb_entity: str = "", resume: bool = False, resume_step: int | None = None):
        """resume: continue the run dir's metrics.jsonl — rows after `resume_step` (logged by an attempt that
        went on past the checkpoint being resumed) are dropped, the rest is the history the loss plot
        draws — and the W&B run whose id the run dir keeps."""
        self.is_main = is_main
        self.run_dir = Path(run_dir)
        self.history: list[dict] = []
        self.wandb = None
        self._wandb_upto = -1  # W&B already holds the steps up to this one (an earlier attempt's)
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        if resume:
            self.history, self._wandb_upto = _rows_up_to(path, resume_step)
        self._file = open(path, "a" if resume else "w", buffering=1)
        if wandb_enabled:
            import wandb

            id_file = self.run_dir / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
            self.wandb = wandb.init(project=wandb_project or None, name=wandb_run_name or None,
                                    entity=wandb_entity or None, dir=str(self.run_dir), config=config or {},
                                    reinit="finish_previous", id=run_id, resume="allow" if run_id else None)
            id_file.write_text(self.wandb.id + "\n")

    def print(self, *args: Any) -> None:
        if self.is_main:
            print(*args, flush=True)

    def log(self, event: dict[str, Any], console: bool = False) -> None:
        if not self.is_main:
            return
        clean = {k: _plain(v) for k, v in event.items()}
        self.history.append(clean)
        self._file.write(json.dumps(clean) + "\n")
        if self.wandb is not None and clean["step"] > self._wandb_upto:  # W&B refuses steps it already has
            self.wandb.log({k: v for k, v in clean.items() if k != "step" and isinstance(v, (int, float))},
                           step=clean["step"])
        if console:
            print(format_event(clean), flush=True)

    def banner(self, lines: dict[str, Any]) -> None:
        if not self.is_main:
            return
        width = max(len(k) for k in lines)
        print("=" * 80)
        for k, v in lines.items():
            print(f"{k:<{width}} : {v}")
        print("=" * 80, flush=True)

    def plot_loss(self, name: str = "loss.png") -> Path | None:
        """Training (and validation) loss against step as a PNG in the run dir."""
        if not self.is_main:
            return None
        train = [(e["step"], e["loss"]) for e in self.history if "loss" in e]
        val = [(e["step"], e["val_loss"]) for e in self.history if "val_loss" in e]
        if not train and not val:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train, strict=True), label="train", lw=1)
        if val:
            ax.plot(*zip(*val, strict=True), "o-", label="validation", lw=1.5)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = self.run_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def close(self) -> None:
        if not self.is_main:
            return
        self._file.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


WANDB_ID_FILE = "wandb_run_id"


def _rows_up_to(path: Path, step: int | None) -> tuple[list[dict], int]:
    """metrics.jsonl of a run being resumed at `step`: keep the rows up to it (all when None) and rewrite the
    file with them (atomically), dropping a half-written last line (kill -9 mid-write) and the rows an
    attempt logged after that checkpoint. -> (kept rows, the largest step the file held)."""
    if not path.is_file():
        return [], -1
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # only the last line can be partial
    upto = max((r.get("step", -1) for r in rows), default=-1)
    kept = [r for r in rows if step is None or r.get("step", -1) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
    return kept, upto


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the fact visible
    return v


def format_event(e: dict[str, Any]) -> str:
    """One aligned console line: `step    12 | loss 5.4321 | lr 3.00e-04 | norm 0.812 | 12,345 tok/s |
    4,321 loss tok/s | mfu 3.1%` (tok/s: positions computed, loss tok/s: targets with loss; see train.log_step)."""
    parts = [f"step {e['step']:>6}"]
    fmt = {"loss": "loss {:.4f}", "val_loss": "val_loss {:.4f}", "lr": "lr {:.2e}", "grad_norm": "norm {:.3f}",
           "tokens_per_s": "{:,.0f} tok/s", "loss_tokens_per_s": "{:,.0f} loss tok/s", "mfu": "mfu {:.1%}",
           "dt_ms": "{:.0f} ms",
           "hellaswag_acc_norm": "hellaswag acc_norm {:.4f}", "hellaswag_acc": "acc {:.4f}",
           "nonfinite_steps": "nonfinite {}"}
    for k, f in fmt.items():
        if k in e and e[k] is not None and not isinstance(e[k], str):
            parts.append(f.format(e[k]))
    # anything else numeric (an objective's metrics: ce, kd, rewards_chosen, reward_accuracy, ...), except the
    # cross-entropy when it is the loss itself (plain LM: ce == loss)
    for k, v in e.items():
        if k not in fmt and k not in _NOT_ON_CONSOLE and isinstance(v, float) and not (k == "ce" and v == e.get("loss")):
            parts.append(f"{k} {v:.4g}")
    return " | ".join(parts)


_NOT_ON_CONSOLE = ("step", "tokens", "loss_tokens")
