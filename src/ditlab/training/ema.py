"""Exponential moving average of the weights, kept in float32, one fused update per step."""

from __future__ import annotations

import copy
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def make_ema(model: M) -> M:
    """A float32 copy of `model` that takes no gradients (the EMA starts at the weights)."""
    ema = copy.deepcopy(model).float().eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float | torch.Tensor) -> None:
    """ema <- decay * ema + (1 - decay) * model, over every parameter, in one foreach op; `decay` a
    float or a 0-dim tensor on the parameters' device (1 leaves the EMA as it is)."""
    ema_params: list[torch.Tensor] = list(ema.parameters())
    params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params, strict=True)]
    weight = 1.0 - decay
    if isinstance(weight, torch.Tensor):  # a device tensor as a list weight: a Scalar weight would sync (.item())
        torch._foreach_lerp_(ema_params, params, [weight] * len(ema_params))
    else:
        torch._foreach_lerp_(ema_params, params, weight)
