"""The model as a sampler calls it: `GuidedModel(x, t, guided)` is the main model alone where a step
is not guided (one call of N), and where it is, classifier-free guidance (one call of 2N: the
conditional and null-label inputs in one batch) or autoguidance (the main and the guide model, one
call of N each: two models cannot share a batch), combined as `Guidance` says."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ditlab.diffusion.gaussian import ModelFn
from ditlab.diffusion.guidance import Guidance
from ditlab.errors import UserError


def model_config(model: Any) -> Any:
    """The DiTConfig of a DiT, also behind wrappers that hold it as `.model` (autocast, step counters);
    None for a plain function."""
    for _ in range(8):  # wrappers are shallow; a cycle must not hang
        if hasattr(model, "cfg"):
            return model.cfg
        model = getattr(model, "model", None)
        if model is None:
            return None
    return None


def check_guide(guide: ModelFn, noise: torch.Tensor, num_classes: int) -> None:
    """A guide must take the main model's input: the latent shape (C, h, w) of `noise` (N, C, h, w) and its
    labels (the same number of classes)."""
    cfg = model_config(guide)
    if cfg is None:
        return
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    if shape != tuple(noise.shape[1:]):
        raise UserError(f"the guide model takes {shape[0]}-channel {shape[1]}x{shape[2]} latents, the main model "
                        f"{noise.shape[1]}-channel {noise.shape[2]}x{noise.shape[3]}: a guide must share the "
                        f"latent space")
    if cfg.num_classes != num_classes:
        raise UserError(f"the guide model has {cfg.num_classes} classes, the main model {num_classes}")


def check_sample_inputs(model: ModelFn, noise: torch.Tensor, y: torch.Tensor | None, guidance: Guidance,
                        stacklevel: int) -> None:  # fmt: skip
    """What every process's sampler needs of its inputs: noise (N, C, ...), labels (N,) for a class-conditional
    model, guidance channels among the C, a guide that takes the same latents and labels; a model left in
    training mode is warned about (`stacklevel` as the caller's own `warnings.warn` would give it)."""
    if noise.ndim < 2:
        raise UserError(f"noise must be (N, C, ...), got shape {tuple(noise.shape)}")
    N, C = noise.shape[:2]
    num_classes = getattr(model, "num_classes", 0)  # a DiT's; a plain function may be unconditional
    if y is None and num_classes:
        raise UserError(f"the model is class-conditional ({num_classes} classes): pass labels y")
    if y is not None and tuple(y.shape) != (N,):
        raise UserError(f"y must have shape ({N},) to match the noise, got {tuple(y.shape)}")
    if guidance.channels is not None and not 1 <= guidance.channels <= C:
        raise UserError(f"guidance_channels must be between 1 and {C}, got {guidance.channels}")
    if isinstance(model, torch.nn.Module) and model.training:
        warnings.warn("sampling from a model in training mode (DiT then drops labels at random): call "
                      "model.eval()", stacklevel=stacklevel + 1)
    if guidance.guide is not None:
        check_guide(guidance.guide, noise, num_classes)


class GuidedModel:
    """model(x, t, y) guided as `guidance` says, on the first `guidance.channels` (default: all C latent)
    channels; the remaining output channels (the learned variance) come from the main model's conditional
    output, as DiT's `forward_with_cfg` takes them. guided=False: the main model alone."""

    def __init__(self, model: ModelFn, y: torch.Tensor | None, guidance: Guidance, channels: int):
        self.model, self.y, self.guidance = model, y, guidance
        self.scale = float(guidance.scale)
        self.k = channels if guidance.channels is None else guidance.channels
        self.y_both: torch.Tensor | None = None
        if not guidance.active:
            return
        if guidance.guide is None:
            if y is None:
                raise UserError(f"classifier-free guidance (cfg_scale={self.scale}) needs class labels y")
            if guidance.null_class is None:
                raise UserError(f"classifier-free guidance (cfg_scale={self.scale}) needs a model with a null class")
            self.y_both = torch.cat([y, torch.full_like(y, guidance.null_class)])  # (2N,)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, guided: bool = True) -> torch.Tensor:
        """The output (N, C_out, ...) at x (N, C, ...), t (N,): guided where `guided` and the scale is not 1."""
        if not (guided and self.guidance.active):
            return self.model(x, t, self.y)
        if self.y_both is not None:
            out = self.model(torch.cat([x, x]), torch.cat([t, t]), self.y_both)  # (2N, C_out, ...)
            out = out.to(torch.promote_types(out.dtype, torch.float32))
            main, base = out.chunk(2)  # (N, C_out, ...) each: conditional, null label
        else:
            main = self.model(x, t, self.y)  # (N, C_out, ...)
            base = self.guidance.guide(x, t, self.y)  # (N, C_guide, ...): its first C channels are used
            main = main.to(torch.promote_types(main.dtype, torch.float32))
            base = base.to(main.dtype)
        k = self.k
        guided_part = base[:, :k] + self.scale * (main[:, :k] - base[:, :k])
        return torch.cat([guided_part, main[:, k:]], dim=1)  # (N, C_out, ...)
