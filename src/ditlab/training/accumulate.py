"""Gradient accumulation: one optimizer step's per-process batch as K micro-batches (the
accumulation itself is `step.TrainStep.accumulate`; here the checks and the gradient sync).

The step's inputs are drawn once for the whole per-process batch (`step.draw_step_inputs`) and then
split, so the images, flips, timesteps, noise and label dropout of every example are those of K = 1.
Each micro-batch's loss is its mean times its share of the batch, so the summed gradients are those
of the batch mean; only the last backward pass reduces the gradients across processes (DDP's
`no_sync`, FSDP2's `set_requires_gradient_sync(False)` before)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn

from ditlab.errors import UserError


def check_micro_batches(global_batch: int, world_size: int, micro_batches: int) -> int:
    """The micro-batch size: global_batch / (world_size x micro_batches), which must be whole."""
    local = global_batch // world_size
    if local % micro_batches:
        raise UserError(f"--grad-accum {micro_batches}: the {local} images per process (--global-batch-size "
                        f"{global_batch} over {world_size} processes) do not split into {micro_batches} micro-batches")
    return local // micro_batches


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, backward passes reduce gradients across processes only if `enabled`:
    DDP's `no_sync`, FSDP2's `set_requires_gradient_sync`; a plain module has nothing to reduce."""
    no_sync = getattr(model, "no_sync", None)  # DistributedDataParallel's
    set_sync = getattr(model, "set_requires_gradient_sync", None)  # an FSDP2 fully_shard module's (and its children)
    if enabled:
        yield
    elif no_sync is not None:
        with no_sync():
            yield
    elif set_sync is not None:
        set_sync(False)
        try:
            yield
        finally:
            set_sync(True)
    else:
        yield


class Accumulating(Protocol):
    """What accumulates a step's gradients: `step.TrainStep`."""

    def accumulate(self, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, noise: torch.Tensor,
                   drop: torch.Tensor | None, micro_batches: int) -> dict[str, torch.Tensor]: ...


def accumulate_gradients(step: Accumulating, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                         noise: torch.Tensor, drop: torch.Tensor | None, micro_batches: int) -> dict[str, torch.Tensor]:
    """`step.accumulate(...)` (`TrainStep.accumulate`): forward and backward over `micro_batches` equal
    slices of the batch, gradients summed in the parameters' .grad."""
    return step.accumulate(x0, t, y, noise, drop, micro_batches)
