"""Stopping a run on request, and noticing when it hangs.

Signals. SIGTERM and SIGINT set a flag. Every long piece of work asks `check()` between its units — each
micro-batch of a training step, each validation batch, each HellaSwag batch, each sampled token — and
`check()` answers for all ranks together (one all-reduce of the flag), so every rank leaves the same piece
of work at the same point by raising `StopRequested`. The loop then writes one checkpoint of the last
completed step and exits with `RESUMABLE_EXIT`. The longest stretch that does not look at the flag is one
micro-batch's forward and backward (or one evaluation batch, or one token), followed by the checkpoint
write: that, not the length of a step or an evaluation, bounds the time from signal to exit.

Exit codes of train.py: 0 = finished (all steps, or early stopping); `RESUMABLE_EXIT` (75, sysexits'
EX_TEMPFAIL) = stopped early with a complete checkpoint: run the same command again to continue;
2 = a setting or input to fix.

Watchdog. With STEP_WATCHDOG_FACTOR > 0 a thread on every rank expects a heartbeat (every `check()` and
every finished step is one). When none comes for longer than max(STEP_WATCHDOG_MIN_SECONDS, factor x the
median of the recent step times), it prints every thread's Python stack to stderr and ends the process
with `RESUMABLE_EXIT` instead of waiting for a collective timeout. A hung collective stalls every rank, so
each rank's watchdog fires and dumps its own stacks.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import statistics
import sys
import threading
import time
from collections import deque

import distributed as D

RESUMABLE_EXIT = 75


class StopRequested(Exception):
    """A stop signal reached some rank; raised on every rank at the same point of the work."""


class RunControl:
    """Signal flag + heartbeat watchdog for one training run. Use as a context manager: the previous
    signal handlers are restored and the watchdog ends on exit."""

    def __init__(self, watchdog_factor: float = 0.0, watchdog_min_seconds: float = 1800.0,
                 window: int = 20) -> None:
        self.received = 0
        self.factor, self.min_seconds = watchdog_factor, watchdog_min_seconds
        self.step_times: deque[float] = deque(maxlen=window)
        self.last_beat = time.monotonic()
        self._handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in self._handlers:
            signal.signal(s, self._handle)
        self._done = threading.Event()
        self._thread = None
        if watchdog_factor > 0:
            self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)
            self._thread.start()

    def _handle(self, signum, frame) -> None:
        self.received = signum

    # ---- stopping --------------------------------------------------------------------------------------

    def stop_agreed(self) -> bool:
        """Collective: True on every rank when any rank has received a stop signal."""
        self.beat()
        return D.any_rank(bool(self.received))

    def check(self) -> None:
        """Collective: raise StopRequested on every rank when any rank has received a stop signal."""
        if self.stop_agreed():
            raise StopRequested(f"signal {self.received or 'on another rank'}")

    # ---- watchdog --------------------------------------------------------------------------------------

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def step_done(self, seconds: float) -> None:
        self.step_times.append(seconds)
        self.beat()

    def limit(self) -> float:
        """Seconds without a heartbeat after which the watchdog fires."""
        median = statistics.median(self.step_times) if self.step_times else 0.0
        return max(self.min_seconds, self.factor * median)

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.min_seconds / 4)):
            quiet = time.monotonic() - self.last_beat
            if quiet > self.limit():
                print(f"watchdog: no progress for {quiet:.0f} s (limit {self.limit():.0f} s = max("
                      f"STEP_WATCHDOG_MIN_SECONDS, STEP_WATCHDOG_FACTOR x median step time)); Python stacks of "
                      f"rank {D.rank()} follow, then exit {RESUMABLE_EXIT} (resumable from the last checkpoint)",
                      file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(RESUMABLE_EXIT)

    def close(self) -> None:
        self._done.set()
        for s, h in self._handlers.items():
            signal.signal(s, h)

    def __enter__(self) -> RunControl:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
