"""Batching across users: one queue, one worker thread owning the model, shared model batches.

The worker takes the oldest waiting request and every other waiting request with the same
`batch_key` (sampler, steps, guidance scale, guided channels), oldest first, up to
`max_batch_images` images, and samples them in one call. What may share a batch follows from the
sampler: steps and sampler fix the timesteps every row visits; the guidance scale is one scalar
of the guided model, and a guided request costs two rows per image (conditional and null label)
where an unguided one costs one, so mixing scales would change the images (an unguided image
computed through the guidance formula is not bitwise the unguided one). Per-image seeds make the
rest independent of the company a request keeps.

A request that waited longest runs next, so none starves; a request waits at most `window_s`
for company. A cancelled request (its client went away) leaves the queue at once; a running batch
stops at its next step when every request in it is cancelled."""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import numpy as np

from ditlab.serve.engine import BatchCancelled
from ditlab.serve.requests import SampleRequest

RECENT_BATCHES = 100  # batches /api/status lists (a long-running server keeps no more)

RunBatch = Callable[[list[SampleRequest], Callable[[], None]], list[np.ndarray]]


class QueueFull(Exception):
    """The queue holds `max_queue` requests; try again after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass(eq=False)
class Job:
    """One request in the server: its state, progress and result (n, H, W, C) uint8."""

    request: SampleRequest
    future: Future = field(default_factory=Future)
    state: str = "queued"  # queued -> running -> done | failed, or cancelled
    steps_done: int = 0
    enqueued: float = field(default_factory=time.monotonic)
    batch_images: int = 0
    """Images of the model batch it ran in (its own and its company's)."""


class Batcher:
    """The queue and its worker thread; `run_batch(requests, on_step)` samples one batch."""

    def __init__(self, run_batch: RunBatch, *, max_queue: int, max_batch_images: int, window_s: float = 0.02):
        self.run_batch, self.max_queue, self.max_batch_images, self.window_s = (
            run_batch, max_queue, max_batch_images, window_s)
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="ditlab-serve-batcher", daemon=True)
        # (requests, images) of the newest RECENT_BATCHES batches run, for tests and stats; totals beside them
        self.batches: collections.deque[tuple[int, int]] = collections.deque(maxlen=RECENT_BATCHES)
        self.batches_run = self.images_run = 0
        self.last_batch_s = 0.0

    def start(self) -> Batcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            for job in self._pending:
                job.state = "cancelled"
                job.future.cancel()
            self._pending.clear()
            self._cond.notify_all()
        self._thread.join(timeout=60)

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._pending)

    def submit(self, request: SampleRequest) -> Job:
        """Queue `request`; raises QueueFull when `max_queue` requests are waiting."""
        with self._cond:
            if len(self._pending) >= self.max_queue:
                raise QueueFull(max(1, math.ceil(self.last_batch_s)))
            job = Job(request)
            self._pending.append(job)
            self._cond.notify_all()
            return job

    def cancel(self, job: Job) -> None:
        """Forget `job` (its client went away): out of the queue now, or its batch stops early
        once no request of it is left."""
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
            if job.state in ("queued", "running"):
                job.state = "cancelled"
                job.future.cancel()

    def _take(self) -> list[Job]:
        """The next batch (empty once stopped), marked running."""
        with self._cond:
            while not self._pending and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return []
            deadline = self._pending[0].enqueued + self.window_s
            while (now := time.monotonic()) < deadline and not self._stopped:
                self._cond.wait(deadline - now)
            if not self._pending:
                return []
            key, batch, images = self._pending[0].request.batch_key, [], 0
            for job in list(self._pending):
                n = job.request.num_images
                if job.request.batch_key == key and images + n <= self.max_batch_images:
                    batch.append(job)
                    images += n
            if not batch:  # a request larger than a batch runs alone
                batch = [self._pending[0]]
            for job in batch:
                self._pending.remove(job)
                job.state = "running"
                job.batch_images = sum(j.request.num_images for j in batch)
            return batch

    def _loop(self) -> None:
        while not self._stopped:
            batch = self._take()
            if batch:
                self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        def on_step() -> None:
            for job in batch:
                job.steps_done += 1
            if all(job.state == "cancelled" for job in batch) or self._stopped:
                raise BatchCancelled

        started = time.monotonic()
        try:
            results = self.run_batch([job.request for job in batch], on_step)
        except BatchCancelled:
            return
        except Exception as e:  # a bug or an out-of-memory: every client of the batch hears of it
            for job in batch:
                job.state = "failed"
                _settle(job.future, exception=e)
            return
        finally:
            self.last_batch_s = time.monotonic() - started
        self.batches.append((len(batch), sum(len(r) for r in results)))
        self.batches_run, self.images_run = self.batches_run + 1, self.images_run + self.batches[-1][1]
        for job, images in zip(batch, results, strict=True):
            if job.state == "running":
                job.state = "done"
            _settle(job.future, result=images)


def _settle(future: Future, result: object = None, exception: BaseException | None = None) -> None:
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)
    except InvalidStateError:  # cancelled meanwhile: nobody waits for it
        pass
