"""Preemption: SIGTERM (a scheduler taking the machine back) and SIGINT (Ctrl-C) let the current
step finish; the loop then writes a checkpoint, prints one line and exits 128 + the signal's
number (143, 130). A second signal of either kind exits at once (temporary files are still
removed on the way out).

Under torchrun the ranks may see the signal at different steps, so they agree at every step
boundary: a one-integer all-reduce (max) of "the signal seen here, or 0", on a CPU gloo group
(the default group on CPU, a gloo side group beside NCCL, so the GPU stream is never waited on).
That all-reduce is also the run's heartbeat: it fails within --dist-timeout when a rank stops."""

from __future__ import annotations

import re
import signal
import sys
import threading
from datetime import timedelta
from types import FrameType

import torch
import torch.distributed as dist

from ditlab.errors import UserError

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


def is_timeout(e: BaseException) -> bool:
    """Whether `e` is a collective that waited past the process group's timeout."""
    text = str(e)
    return "Timed out" in text or "timed out" in text or "Timeout" in text


def health_group(distributed: bool):
    """A gloo group used for nothing but `silent_rank_error`'s question (a group whose collective
    timed out is closed; this one is still open then). None when running alone. A collective."""
    return dist.new_group(backend="gloo") if distributed else None


def silent_rank_error(seconds: float, rank: int, group) -> UserError:
    """After a collective timed out: which rank stopped answering, asked with a monitored barrier on
    the `health_group` (rank 0 learns the culprits; the others, that rank 0 gave up)."""
    who = "another process"
    if group is not None:
        try:
            dist.monitored_barrier(group, timeout=timedelta(seconds=min(seconds, 30.0)), wait_all_ranks=True)
        except RuntimeError as e:
            found = re.search(r"Ranks? ([\d, ]+) failed to pass", str(e))
            who = f"rank {found.group(1).strip()}" if found else "rank 0" if rank else who
    return UserError(f"rank {rank}: {who} did not answer within --dist-timeout {seconds:g} s (stopped, hung or "
                     "dead); the run stops here, run the same command to resume (raise --dist-timeout if it is "
                     "only slow)")
