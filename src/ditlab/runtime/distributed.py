"""One process or many under torchrun: process-group setup and the few collectives we use."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup_distributed(device: str | None = None, timeout: timedelta | None = None) -> DistInfo:
    """Join the process group torchrun describes in the environment (NCCL on GPU, gloo on CPU);
    a plain process is rank 0 of 1. `device` forces "cpu" or "cuda"; `timeout` bounds collectives."""
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        from ditlab.errors import UserError

        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA"
        raise UserError(f"--device {device}: no CUDA device is available (torch {torch.__version__}, built {built}); "
                        "use --device cpu")
    if not launched_by_torchrun():
        return DistInfo(0, 1, torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None,
                                timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), dev)


@contextmanager
def distributed_session(device: str | None = None, timeout: timedelta | None = None) -> Iterator[DistInfo]:
    """`setup_distributed` for the length of a `with` block; the process group is destroyed at
    its end only if this call created it (a caller's own group is left alone)."""
    owned = launched_by_torchrun() and not dist.is_initialized()
    info = setup_distributed(device, timeout)
    try:
        yield info
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over ranks (x itself when running alone)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= dist.get_world_size()
    return x


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def sigterm_exits() -> Iterator[None]:
    """Under torchrun a failed rank makes the agent SIGTERM the others: turn that into SystemExit so
    that temporary files are removed on the way out."""
    if not launched_by_torchrun() or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
