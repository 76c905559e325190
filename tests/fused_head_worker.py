"""Training steps under a watch for full logits: the worker of tests/test_fused_head.py, run in-process (plain,
compiled blocks) or under torchrun (DDP, FSDP2; CPU, gloo).

    torchrun --nproc_per_node N tests/fused_head_worker.py [--unfused] --env-file F [KEY=VALUE ...]

Builds the run as train.py does (train.build_run) and takes STEPS optimizer steps through train.optimizer_step
inside LogitsWatch, a dispatch mode that records every tensor an op returns whose last dim is the vocabulary
and which holds at least one micro-batch forward's (rows, T, V) logits. --unfused routes the model's head_loss
through full logits and losses.py (the reference path: the watch must see its logits). Writes
RUN_DIR/fused_rank<R>.json: {"losses": [...], "logits": [[op, shape], ...]}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import distributed as D
import fused_ce
import model as model_mod
import train
from losses import cross_entropy_sum, sequence_logps

STEPS = 2
CHUNK_ROWS = 16  # the fused head's chunk, well under one micro-batch forward's positions


class LogitsWatch(TorchDispatchMode):
    """Records (op, shape) of every op output with last dim `vocab` and at least `numel` elements."""

    def __init__(self, vocab: int, numel: int):
        super().__init__()
        self.vocab, self.numel, self.seen = vocab, numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.ndim and t.shape[-1] == self.vocab and t.numel() >= self.numel:
                self.seen.append([str(func), list(t.shape)])
        return out


def unfused_head_loss(hidden, head, labels, per_row=False):
    logits = head(hidden)  # (B, T, V)
    return sequence_logps(logits, labels) if per_row else cross_entropy_sum(logits, labels)


def run_steps(argv: list[str], unfused: bool) -> dict:
    """STEPS optimizer steps of the run `argv` describes, watched; -> {"losses", "logits"} of this rank."""
    saved = model_mod.head_loss, fused_ce.CHUNK_ROWS
    model_mod.head_loss = unfused_head_loss if unfused else fused_ce.head_loss
    fused_ce.CHUNK_ROWS = CHUNK_ROWS
    try:
        cfg, args = train.parse_args(argv)
        run = train.build_run(cfg, args, D.init_distributed("cpu"))
        # the smallest forward of a micro-step: one micro-batch of rows (a DPO forward holds twice as many)
        watch = LogitsWatch(run.margs.vocab_size, cfg.training.max_batch_size * cfg.model.max_seq_len * run.margs.vocab_size)
        losses = []
        with watch:
            for _ in range(STEPS):
                losses.append(train.optimizer_step(run, train.SpikeGuard(0.0, 4)).loss)
        run.log.close()
        return {"losses": losses, "logits": watch.seen, "run_dir": str(run.run_dir)}
    finally:
        model_mod.head_loss, fused_ce.CHUNK_ROWS = saved


def main() -> None:
    argv = sys.argv[1:]
    unfused = "--unfused" in argv
    result = run_steps([a for a in argv if a != "--unfused"], unfused)
    (Path(result["run_dir"]) / f"fused_rank{D.rank()}.json").write_text(json.dumps(result))
    D.destroy()


if __name__ == "__main__":
    main()
