"""Gradient accumulation: one optimizer step's per-process batch as K micro-batches.

The step's inputs are drawn once for the whole per-process batch (`step.draw_step_inputs`) and then
split, so the images, flips, timesteps, noise and label dropout of every example are those of K = 1.
Each micro-batch's loss is its mean times its share of the batch, so the summed gradients are those
of the batch mean; only the last backward pass reduces the gradients across processes (DDP's
`no_sync`, FSDP2's `set_requires_gradient_sync(False)` before)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

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
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DistributedDataParallel
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 fully_shard module (and its children)
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def accumulate_gradients(step: Any, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, noise: torch.Tensor,
                         drop: torch.Tensor | None, micro_batches: int) -> dict[str, torch.Tensor]:  # fmt: skip
    """Forward and backward over `micro_batches` equal slices of the batch, gradients summed in the
    parameters' .grad (which the caller zeroed). `step` is a `step.TrainStep` (its model, diffusion,
    autocast and grad scaler). x0, noise (N, C, H, W), t (N,), y (N,) or None, drop (N,) bool or None
    -> the loss terms {"loss", "mse", "vb"} each (N,), in the batch's order.

    With one micro-batch this is exactly the plain step: the loss is the batch mean (times 1.0)."""
    n = x0.shape[0]
    if n % micro_batches:
        raise UserError(f"--grad-accum {micro_batches} does not divide the per-process batch of {n}")
    size = n // micro_batches
    parts: list[dict[str, torch.Tensor]] = []
    for i in range(micro_batches):
        part = slice(i * size, (i + 1) * size)
        model = step.model
        if drop is not None:
            mask = drop[part]
            model = lambda x, s, c, m=mask: step.model(x, s, c, drop_labels=m)  # noqa: E731
        with gradient_sync(step.model, enabled=i == micro_batches - 1):
            with step.autocast():
                terms = step.diffusion.training_losses(model, x0[part], t[part], y=None if y is None else y[part],
                                                       noise=noise[part])
            loss = terms["loss"].mean() * (size / n)  # (micro-batch mean) x (its share): the batch mean's gradient
            step.scaler.scale(loss).backward()
        parts.append({k: v.detach() for k, v in terms.items()})
    if micro_batches == 1:
        return parts[0]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
