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
import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ditlab.diffusion.gaussian import ModelFn
from ditlab.diffusion.protocol import Process
from ditlab.errors import UserError
from ditlab.runtime.seeds import TRAIN_STEP, derive_seed
from ditlab.training.accumulate import gradient_sync
from ditlab.training.data import TrainingData
from ditlab.training.ema import update_ema
from ditlab.training.repa import Alignment, projection_loss

EmaUpdate = Callable[[nn.Module, nn.Module, "float | torch.Tensor"], None]  # (ema, model, decay)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of every random draw of one rank at one step."""
    return derive_seed(TRAIN_STEP, seed, step, rank)


StepInputs = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor, "torch.Tensor | None"]


def draw_step_inputs(data: TrainingData, batch: list[torch.Tensor], diffusion: Process, device: torch.device, seed: int,
                     label_dropout: float | None) -> StepInputs:
    """x0 (N, C, H, W), step indices t (N,), labels y (N,) (None: unconditional), noise (N, C, H, W)
    and the label-dropout mask (N,) bool (None without dropout) of one step: every random draw
    (flips, posterior samples, t, noise, dropout) from one generator seeded with `seed`, on the
    device (no host sync). label_dropout None means an unconditional model (no labels)."""
    return _draw(data, batch, diffusion, device, seed, label_dropout, None)[0]


def draw_aligned_step_inputs(data: TrainingData, batch: list[torch.Tensor], diffusion: Process, device: torch.device,
                             seed: int, label_dropout: float | None,
                             alignment: Alignment) -> tuple[StepInputs, torch.Tensor]:  # fmt: skip
    """draw_step_inputs (the same draws) and REPA's targets of the same examples: the frozen encoder's
    patch features (N, S, Dz) of each clean image, flipped as its training example was."""
    inputs, features = _draw(data, batch, diffusion, device, seed, label_dropout, alignment)
    assert features is not None
    return inputs, features


def _draw(data: TrainingData, batch: list[torch.Tensor], diffusion: Process, device: torch.device, seed: int,
          label_dropout: float | None, alignment: Alignment | None) -> tuple[StepInputs, torch.Tensor | None]:
    gen = torch.Generator(device=device).manual_seed(seed)
    x0, y, clean = data.model_input_and_clean(batch, device, gen, clean=alignment is not None)
    features = None if alignment is None or clean is None else alignment.targets(clean)  # (N, S, Dz)
    t = diffusion.sample_timesteps(x0.shape[0], device, generator=gen)
    noise = torch.randn(x0.shape, device=device, generator=gen)
    if label_dropout is None:
        return (x0, t, None, noise, None), features
    drop = torch.rand(x0.shape[0], device=device, generator=gen) < label_dropout if label_dropout > 0 else None
    return (x0, t, y, noise, drop), features


def grad_norm(params: Sequence[torch.Tensor], max_norm: float | None) -> torch.Tensor:
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

    def __init__(self, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer, diffusion: Process,
                 amp_dtype: torch.dtype | None, device: torch.device, ema_decay: float,
                 grad_clip: float | None = None, ema_update: EmaUpdate = update_ema,
                 skip_bad: bool = True, repa_coeff: float | None = None):  # fmt: skip
        self.repa_coeff = repa_coeff  # REPA's lambda; None: no alignment loss
        self.model, self.ema, self.opt, self.diffusion, self.skip_bad = model, ema, opt, diffusion, skip_bad
        self.ema_decay, self.grad_clip, self.ema_update = ema_decay, grad_clip, ema_update
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.amp_dtype, self.device_type = amp_dtype, device.type

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)

    def __call__(self, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, noise: torch.Tensor,
                 drop: torch.Tensor | None = None,
                 micro_batches: int = 1, features: torch.Tensor | None = None,
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:  # fmt: skip
        """x0, noise (N, C, H, W), t (N,) step indices, y (N,) labels, drop (N,) bool: labels replaced by
        the null label (None: the model's own label dropout) -> (the process's loss terms, "loss" among them, each
        (N,), norm, bad).
        With `repa_coeff`, `features` (N, S, Dz) are REPA's targets: "loss" gains repa_coeff x "repa", the
        per-example alignment loss (`training.repa.projection_loss`).
        `micro_batches` K > 1 accumulates the gradients of K slices of N / K (`accumulate`); a
        non-finite step (bad) leaves the weights, the optimizer and the EMA as they were."""
        self.opt.zero_grad(set_to_none=True)
        terms = self.accumulate(x0, t, y, noise, drop, micro_batches, features)
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

    def accumulate(self, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, noise: torch.Tensor,
                   drop: torch.Tensor | None, micro_batches: int,
                   features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        """Forward and backward over `micro_batches` equal slices of the batch, gradients summed in the
        parameters' .grad (which the caller zeroed). x0, noise (N, C, H, W), t (N,), y (N,) or None,
        drop (N,) bool or None -> the process's loss terms ("loss"; DDPM also "mse", "vb"), each (N,), in
        the batch's order.

        The inputs were drawn once for the whole per-process batch and are split here, so every
        example's draws are those of K = 1; each micro-batch's loss is its mean times its share of
        the batch, so the summed gradients are those of the batch mean; only the last backward pass
        reduces gradients across processes (`accumulate.gradient_sync`). With one micro-batch this
        is exactly the plain step: the loss is the batch mean (times 1.0)."""
        n = x0.shape[0]
        if n % micro_batches:
            raise UserError(f"--grad-accum {micro_batches} does not divide the per-process batch of {n}")
        size = n // micro_batches
        parts: list[dict[str, torch.Tensor]] = []
        for i in range(micro_batches):
            part = slice(i * size, (i + 1) * size)
            model: ModelFn = self.model
            if drop is not None:
                model = functools.partial(self.model, drop_labels=drop[part])
            projections: list[torch.Tensor] = []
            if self.repa_coeff is not None:
                model = _capturing(model, projections)
            with gradient_sync(self.model, enabled=i == micro_batches - 1):
                with self.autocast():
                    terms = self.diffusion.training_losses(model, x0[part], t[part],
                                                           y=None if y is None else y[part], noise=noise[part])
                if self.repa_coeff is not None:
                    if features is None or len(projections) != 1:
                        raise ValueError("REPA: the step needs the encoder's features and one model call per step")
                    terms["repa"] = projection_loss(projections[0], features[part])  # (n,)
                    terms["loss"] = terms["loss"] + self.repa_coeff * terms["repa"]
                loss = terms["loss"].mean() * (size / n)  # (micro-batch mean) x (its share): the batch mean's gradient
                self.scaler.scale(loss).backward()
            parts.append({k: v.detach() for k, v in terms.items()})
        if micro_batches == 1:
            return parts[0]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _step_unless(self, bad: torch.Tensor) -> None:
        """The optimizer step, skipped when `bad` is true: on the device for the fused AdamW, else with
        one host sync (an optimizer that cannot take `found_inf`)."""
        if self.scaler.is_enabled():
            self.scaler.step(self.opt)
            self.scaler.update()
        elif self.opt.defaults.get("fused"):
            self.opt.found_inf = bad.float()  # type: ignore[attr-defined]  # fused AdamW's input (GradScaler's way)
            try:
                self.opt.step()
            finally:
                del self.opt.found_inf  # type: ignore[attr-defined]
        elif not bool(bad):
            self.opt.step()


def _capturing(model: ModelFn, projections: list[torch.Tensor]) -> ModelFn:
    """`model` called with return_projection=True: returns the output, appends REPA's projection (N, T, Dz)."""

    def call(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor:
        out, projection = model(x, t, y, return_projection=True, **kwargs)  # type: ignore[call-arg]
        projections.append(projection)
        return out

    return call
