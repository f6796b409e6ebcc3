"""Preemption: SIGTERM (a scheduler taking the machine back) and SIGINT (Ctrl-C) let the current
step finish; the loop then writes a checkpoint, prints one line and exits 128 + the signal's
number (143, 130). A second signal of either kind exits at once (temporary files are still
removed on the way out).

Under torchrun the ranks may see the signal at different steps, so they agree at every step
boundary: a one-integer all-reduce (max) of "the signal seen here, or 0", on a CPU gloo group
(the default group on CPU, a gloo side group beside NCCL, so the GPU stream is never waited on).
That all-reduce is also the run's heartbeat: it fails within --dist-timeout when a rank stops."""

from __future__ import annotations

import signal
import sys
import threading
from datetime import timedelta
from types import FrameType

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(SystemExit):
    """The run stopped on a signal after saving; the exit status is 128 + the signal's number."""


class Preemption:
    """Context manager that turns SIGTERM / SIGINT into a request the loop polls with `agreed()`."""

    def __init__(self, distributed: bool, timeout: timedelta):
        self.seen = 0
        self.previous: dict[int, object] = {}
        self.group = None
        if distributed:  # the flag's own CPU group (a collective: every rank builds it)
            on_cpu = dist.get_backend() == "gloo"
            self.group = dist.group.WORLD if on_cpu else dist.new_group(backend="gloo", timeout=timeout)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.seen:  # the second signal: stop now
            raise SystemExit(128 + signum)
        self.seen = signum

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def agreed(self) -> int:
        """The signal any rank has seen (0: none), the same on every rank."""
        if self.group is None:
            return self.seen
        flag = torch.tensor([self.seen], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())


def stop(signum: int, step: int, saved: str, is_main: bool) -> TrainingInterrupted:
    """The one line (rank 0) and the exception that ends an interrupted run."""
    if is_main:
        name = signal.Signals(signum).name
        print(f"ditlab train: stopped by {name} at step {step}; checkpoint {saved}; run the same command to resume",
              file=sys.stderr, flush=True)
    return TrainingInterrupted(128 + signum)
