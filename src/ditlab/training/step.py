"""One optimisation step: every random draw of the step (from one generator seeded by
(seed, step, rank)), then loss under autocast, backward, gradient norm, AdamW, EMA.

The step never waits for the host: no `.item()`, no Python branch on a tensor. The gradient
norm is computed for the metrics without the extra pass over the gradients that clipping to an
infinite norm would make; with --grad-clip the gradients are scaled on the device.

A step whose loss or gradient norm is not finite changes nothing: the fused AdamW skips its update
on the device (its `found_inf` input, as GradScaler uses it) and the EMA update's weight becomes 0;
the step returns the flag so that the loop can count such steps (`training.guard`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ditlab.runtime.seeds import TRAIN_STEP, derive_seed
from ditlab.training.accumulate import accumulate_gradients
from ditlab.training.ema import update_ema


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of every random draw of one rank at one step."""
    return derive_seed(TRAIN_STEP, seed, step, rank)


def draw_step_inputs(data: Any, batch: list[torch.Tensor], diffusion: Any, device: torch.device, seed: int,
                     label_dropout: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                    torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """x0 (N, C, H, W), step indices t (N,), labels y (N,) (None: unconditional), noise (N, C, H, W)
    and the label-dropout mask (N,) bool (None without dropout) of one step: every random draw
    (flips, posterior samples, t, noise, dropout) from one generator seeded with `seed`, on the
    device (no host sync). `data` is a training.data.TrainingData; label_dropout None means an
    unconditional model (no labels)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x0, y = data.to_model_input(batch, device, gen)
    t = diffusion.sample_timesteps(x0.shape[0], device, generator=gen)
    noise = torch.randn(x0.shape, device=device, generator=gen)
    if label_dropout is None:
        return x0, t, None, noise, None
    drop = torch.rand(x0.shape[0], device=device, generator=gen) < label_dropout if label_dropout > 0 else None
    return x0, t, y, noise, drop


def grad_norm(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients (a 0-dim tensor on their device), clipping
    them in place to max_norm when it is given (torch's clip_grad_norm_ semantics)."""
    if max_norm is not None or not hasattr(torch.nn.utils, "get_total_norm"):  # the latter: torch < 2.6
        return torch.nn.utils.clip_grad_norm_(params, float("inf") if max_norm is None else max_norm, foreach=True)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)


class TrainStep:
    """Callable (x0, t, y, noise) -> (loss terms, grad norm, bad) that updates `model`, `opt` and `ema`,
    unless the step is bad (a 0-dim bool tensor: its loss or gradient norm is not finite).

    model(x (N, C, H, W), t (N,), y (N,) or None) -> (N, C_out, H, W) is any callable module (DiT,
    a DDP / FSDP / compiled wrapper, or a peer's model behind an adapter); `ema_update(ema, model,
    decay)` defaults to the fused foreach update (it must take a 0-dim tensor decay unless skip_bad is
    False: the plain step of a reference trainer, which updates whatever the flag says)."""

    def __init__(self, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer, diffusion: Any,
                 amp_dtype: torch.dtype | None, device: torch.device, ema_decay: float,
                 grad_clip: float | None = None,
                 ema_update: Callable[[nn.Module, nn.Module, float], None] = update_ema,
                 skip_bad: bool = True):  # fmt: skip
        self.model, self.ema, self.opt, self.diffusion, self.skip_bad = model, ema, opt, diffusion, skip_bad
        self.ema_decay, self.grad_clip, self.ema_update = ema_decay, grad_clip, ema_update
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.amp_dtype, self.device_type = amp_dtype, device.type

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)

    def __call__(self, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, noise: torch.Tensor,
                 drop: torch.Tensor | None = None,
                 micro_batches: int = 1) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:  # fmt: skip
        """x0, noise (N, C, H, W), t (N,) step indices, y (N,) labels, drop (N,) bool: labels replaced by
        the null label (None: the model's own label dropout) -> ({"loss", "mse", "vb"} each (N,), norm, bad).
        `micro_batches` K > 1 accumulates the gradients of K slices of N / K (training.accumulate); a
        non-finite step (bad) leaves the weights, the optimizer and the EMA as they were."""
        self.opt.zero_grad(set_to_none=True)
        terms = accumulate_gradients(self, x0, t, y, noise, drop, micro_batches)
        loss = terms["loss"].mean()
        self.scaler.unscale_(self.opt)
        norm = grad_norm(self.params, self.grad_clip)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP: the global norm
            norm = norm.full_tensor()
        bad = ~torch.isfinite(loss.detach())
        if not self.scaler.is_enabled():  # fp16: the scaler skips non-finite gradients (and rescales) itself
            bad = bad | ~torch.isfinite(norm.detach())
        if not self.skip_bad:
            self.scaler.step(self.opt)
            self.scaler.update()
            self.ema_update(self.ema, self.model, self.ema_decay)
            return terms, norm, bad
        self._step_unless(bad)
        decay = torch.where(bad, 1.0, self.ema_decay)  # 1: the EMA stays as it was
        self.ema_update(self.ema, self.model, decay)
        return terms, norm, bad

    def _step_unless(self, bad: torch.Tensor) -> None:
        """The optimizer step, skipped when `bad` is true: on the device for the fused AdamW, else with
        one host sync (an optimizer that cannot take `found_inf`)."""
        if self.scaler.is_enabled():
            self.scaler.step(self.opt)
            self.scaler.update()
        elif self.opt.defaults.get("fused"):
            self.opt.found_inf = bad.float()
            try:
                self.opt.step()
            finally:
                del self.opt.found_inf
        elif not bool(bad):
            self.opt.step()
