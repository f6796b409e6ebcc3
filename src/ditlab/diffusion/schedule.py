"""Beta schedules and timestep respacing, in float64.

A process of T steps is defined by its betas; a respaced process keeps n of the original
timesteps and recomputes its betas from the kept cumulative alphas (Improved DDPM, section 4),
so that its marginals q(x_t | x_0) at the kept steps are exactly the original ones."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

LINEAR_BETA_START = 1e-4  # Ho et al. (2020), for a 1000-step process
LINEAR_BETA_END = 0.02
LINEAR_REFERENCE_STEPS = 1000  # the linear endpoints are scaled by 1000 / T
COSINE_OFFSET = 0.008  # s of Nichol & Dhariwal (2021), eq. 17
COSINE_MAX_BETA = 0.999  # betas are clipped below 1 to avoid a singularity at t = T


def linear_betas(num_timesteps: int) -> torch.Tensor:
    """Linear betas from 1e-4 to 0.02, both scaled by 1000 / T: (T,) float64."""
    scale = LINEAR_REFERENCE_STEPS / num_timesteps
    return torch.linspace(scale * LINEAR_BETA_START, scale * LINEAR_BETA_END, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int) -> torch.Tensor:
    """Betas discretising alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi / 2), s in [0, 1]: (T,) float64."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), COSINE_MAX_BETA)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


BETA_SCHEDULES: dict[str, Callable[[int], torch.Tensor]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
}


def get_betas(schedule: str, num_timesteps: int) -> torch.Tensor:
    """The named schedule's betas (T,) float64."""
    if schedule not in BETA_SCHEDULES:
        raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be at least 2, got {num_timesteps}")
    return BETA_SCHEDULES[schedule](num_timesteps)


def spaced_timesteps(num_timesteps: int, n: int) -> list[int]:
    """n of range(T) evenly spaced, both ends kept: round(i * (T - 1) / (n - 1)), i = 0 .. n - 1.

    This is ADM's "n" spacing written in closed form. Python's round (half to even) of the
    correctly rounded quotient equals the exact rational rounding for every n <= T = 1000.
    ADM itself accumulates a float stride, which differs from the closed form at exact ties
    for some odd n (21, 23, 27, 35, ...; one or a few indices moved by 1); for n in 10, 20, 25,
    50, 100, 250, 500 and 1000 the two agree."""
    if not 2 <= n <= num_timesteps:
        raise ValueError(f"steps must be between 2 and the process length {num_timesteps}, got {n}")
    return [round(i * (num_timesteps - 1) / (n - 1)) for i in range(n)]


def respaced_betas(alphas_cumprod: torch.Tensor, kept: Sequence[int]) -> torch.Tensor:
    """Betas of the process that keeps steps `kept` (ascending) of one with alphas_cumprod (T,):
    beta_i = 1 - alpha_bar[k_i] / alpha_bar[k_{i-1}], with alpha_bar[k_{-1}] = 1. Returns (n,) float64."""
    kept_ab = alphas_cumprod.to(torch.float64)[torch.as_tensor(list(kept), dtype=torch.long)]  # (n,)
    prev_ab = torch.cat([kept_ab.new_ones(1), kept_ab[:-1]])  # (n,)
    return 1 - kept_ab / prev_ab
