"""Guidance as a value: what a sampler does with the model's predictions, handed to
`Process.generate` as one object rather than flags threaded through each caller.

- Classifier-free guidance (Ho & Salimans, 2022): D = D_null + s (D_cond - D_null), the null-label
  prediction as the base.
- Autoguidance (Karras et al. 2024, EDM2's `generate_images.py`): with a `guide` model,
  D = D_guide + s (D_main - D_guide), both conditional.
- A guidance interval (Kynkaanniemi et al. 2024): guidance only at the sampling steps whose EDM
  noise level sigma lies in (lo, hi] (`interval`), or whose time in the process's own t lies in
  [lo, hi] (`t_interval`, as REPA's sampler takes `guidance_low` / `guidance_high`). Elsewhere the
  model is called once, unguided.

The decision is made once per sampling step, at the step's first time (the interval paper's EDM
sampler and REPA's Heun step guide both of a step's evaluations or neither); dopri5, whose steps
are its own, decides at every evaluation. No guidance-scale schedule: none of the references this
follows (DiT, SiT, EDM2, REPA, the interval paper) defines one."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ditlab.errors import UserError

T_EDGE = 1e-9
"""A time this close to an end of a t interval is inside it: a grid's rounding (REPA's linspace(1, 0) against
SiT's linspace(0, 1)) must not decide whether a step on the edge is guided."""


@dataclass(frozen=True, kw_only=True)
class Guidance:
    """scale s (1: none), the channels it applies to (None: all), the null label of the unconditional
    branch (None: the model's own `null_class`), the guide model of autoguidance (None: classifier-free
    guidance), and where it applies: `interval` (lo, hi] in sigma, or `t_interval` [lo, hi] in the
    process's own time (DDPM: the original timestep index; flow: t, 0 noise, 1 data); None: everywhere."""

    scale: float = 1.0
    channels: int | None = None
    null_class: int | None = None
    interval: Sequence[float] | None = None
    """(lo, hi] in sigma; any two numbers, kept as a tuple"""
    t_interval: Sequence[float] | None = None
    """[lo, hi] in the process's t; any two numbers, kept as a tuple"""
    guide: Any = None
    """a model called as guide(x, t, y), of the main model's latent shape and objective"""

    def __post_init__(self) -> None:
        if not math.isfinite(self.scale):
            raise UserError(f"guidance scale must be finite, got {self.scale}")
        if self.interval is not None and self.t_interval is not None:
            raise UserError("give a guidance interval in sigma or in t, not both")
        if self.interval is not None:
            lo, hi = _pair(self.interval, "guidance interval")
            if not 0 <= lo <= hi:
                raise UserError(f"guidance interval LO HI in sigma needs 0 <= LO <= HI, got {lo} {hi}")
            object.__setattr__(self, "interval", (lo, hi))  # frozen: normalised once, here
        if self.t_interval is not None:
            lo, hi = _pair(self.t_interval, "guidance t interval")
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                raise UserError(f"guidance t interval LO HI needs finite LO <= HI, got {lo} {hi}")
            object.__setattr__(self, "t_interval", (lo, hi))

    @property
    def active(self) -> bool:
        """Whether anything is guided at all (scale 1 is the main model alone)."""
        return self.scale != 1.0

    def applies(self, sigma: float, t: float) -> bool:
        """Whether a step at EDM noise level `sigma` and process time `t` is guided."""
        if not self.active:
            return False
        if self.interval is not None:
            lo, hi = self.interval
            return lo < sigma <= hi
        if self.t_interval is not None:
            lo, hi = self.t_interval
            return lo - T_EDGE <= t <= hi + T_EDGE
        return True


def _pair(value: Any, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as e:
        raise UserError(f"{name} must be two numbers LO HI, got {value!r}") from e
    if math.isnan(lo) or math.isnan(hi):
        raise UserError(f"{name} must be two numbers LO HI, got {lo} {hi}")
    return lo, hi


def ddpm_sigma(alpha_bar: float) -> float:
    """The EDM noise level of a DDPM step: sqrt((1 - alpha_bar) / alpha_bar) (Karras et al. 2022, eq. 6's
    reparameterisation x / sqrt(alpha_bar) = x_0 + sigma eps)."""
    return math.sqrt((1.0 - alpha_bar) / alpha_bar)


def flow_sigma(path: str, t: float) -> float:
    """The EDM noise level of a flow at time t (0 noise, 1 data): sigma_t / alpha_t of the path,
    (1 - t) / t on the linear path, cot(pi t / 2) on the gvp one; inf at t = 0."""
    if path == "linear":
        return math.inf if t <= 0 else (1.0 - t) / t
    if path == "gvp":
        half = math.pi * t / 2
        return math.inf if t <= 0 else math.cos(half) / math.sin(half)
    raise ValueError(f"unknown path {path!r}")
