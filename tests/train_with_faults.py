"""train.py with a fault injected, for the tests that prove a run survives it. The faults are given as this
launcher's own flags, before `--`; everything after `--` goes to train.py unchanged:

    python tests/train_with_faults.py --kill-in-save 4:tmp -- [train.py arguments ...]
    torchrun --nproc_per_node 2 tests/train_with_faults.py --rank-exit 1:5 -- [train.py arguments ...]

--kill-in-save STEP:PHASE   SIGKILL this process inside the checkpoint save of STEP, when the save reaches PHASE
                            (checkpoint.save_phase): `tmp` (every rank, its model shards in the temp dir, the
                            rest not) or `renamed` (rank 0, the step dir complete, `latest` not moved yet)
--rank-exit RANK:STEP       rank RANK exits with code 1 (no clean-up) during STEP, after its forward and
                            backward, on the first torchelastic attempt only
--stall-step STEP:SECONDS   every rank sleeps SECONDS during STEP without a heartbeat, as a hung collective
                            would (the step-time watchdog's case)

Each fault replaces a production function (checkpoint.save_phase, train.forward_backward) before train.main
runs, as the other launchers here do.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import checkpoint
import distributed as D
import train
from errors import run_cli


def pair(text: str) -> tuple[str, str]:
    first, _, second = text.partition(":")
    return first, second


def kill_in_save(step: int, phase: str):
    def save_phase(at_step: int, at_phase: str) -> None:
        if (at_step, at_phase) == (step, phase):
            os.kill(os.getpid(), signal.SIGKILL)

    return save_phase


def after_forward_backward(fault):
    """train.forward_backward, then fault(the step being taken) before the step's update."""
    real = train.forward_backward

    def forward_backward(run):
        out = real(run)
        fault(run.state.step + 1)
        return out

    return forward_backward


def rank_exit(rank: int, step: int):
    def exit_in_step(current: int) -> None:
        if (D.rank(), current) == (rank, step) and D.elastic_restart_count() == 0:
            print(f"fault injection: rank {rank} exits during step {step}", file=sys.stderr, flush=True)
            os._exit(1)

    return exit_in_step


def stall_step(step: int, seconds: float):
    def stall_in_step(current: int) -> None:
        if current == step:
            time.sleep(seconds)

    return stall_in_step


def main(argv: list[str]) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kill-in-save", type=pair, metavar="STEP:PHASE")
    p.add_argument("--rank-exit", type=pair, metavar="RANK:STEP")
    p.add_argument("--stall-step", type=pair, metavar="STEP:SECONDS")
    faults = p.parse_args(argv[:split])
    if faults.kill_in_save:
        step, phase = faults.kill_in_save
        checkpoint.save_phase = kill_in_save(int(step), phase)
    if faults.rank_exit:
        rank, step = faults.rank_exit
        train.forward_backward = after_forward_backward(rank_exit(int(rank), int(step)))
    if faults.stall_step:
        step, seconds = faults.stall_step
        train.forward_backward = after_forward_backward(stall_step(int(step), float(seconds)))
    return train.main(argv[split + 1:])


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
