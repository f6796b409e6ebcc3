"""Beta schedules and timestep respacing, in float64.

A process of T steps is defined by its betas; a respaced process keeps n of the original
timesteps and recomputes its betas from the kept cumulative alphas (Improved DDPM, section 4),
so that its marginals q(x_t | x_0) at the kept steps are exactly the original ones."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ditlab.errors import UserError

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
        raise UserError(f"unknown noise schedule {schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")
    if num_timesteps < 2:
        raise UserError(f"num_timesteps must be at least 2, got {num_timesteps}")
    return BETA_SCHEDULES[schedule](num_timesteps)


def _section(size: int, count: int) -> list[int]:
    """`count` of range(size) as ADM takes them: a float stride (size - 1) / (count - 1) is added
    up step by step and each partial sum rounded with Python's round (half to even); a section of
    count 1 keeps its first index. The accumulated float is the reference's arithmetic: at ties it
    rounds differently from the exact rational i * (size - 1) / (count - 1) (e.g. count 21 of
    1000 keeps 499, not 500), so it must not be written in closed form."""
    stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
    cur, kept = 0.0, []
    for _ in range(count):
        kept.append(round(cur))
        cur += stride
    return kept


def spaced_timesteps(num_timesteps: int, spacing: int | str | Sequence[int]) -> list[int]:
    """The kept steps of range(T), ascending, exactly as ADM's `space_timesteps` keeps them.

    spacing: n (an int or "n") keeps n evenly spaced steps, both ends included (one section);
    "10,15,20" or [10, 15, 20] splits the process into that many equal sections (the first
    T % k one step longer) and keeps that many steps of each; "ddimN" keeps range(0, T, s) for
    the smallest stride s that gives N steps."""
    T = num_timesteps
    if isinstance(spacing, str) and spacing.startswith("ddim"):
        desired = _parse_count(spacing[len("ddim"):], spacing)
        for stride in range(1, T):
            if len(range(0, T, stride)) == desired:
                return list(range(0, T, stride))
        raise UserError(f"spacing {spacing!r}: no integer stride gives {desired} of {T} steps")
    if isinstance(spacing, str):
        counts = [_parse_count(c, spacing) for c in spacing.split(",")]
    elif isinstance(spacing, int):
        counts = [spacing]
    else:
        counts = [int(c) for c in spacing]
    if not counts or any(c < 1 for c in counts) or sum(counts) > T:
        raise UserError(f"steps must be between 1 and the process length {T}, got {_show(spacing)}")
    size_per, extra = divmod(T, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise UserError(f"spacing {_show(spacing)}: section {i} has {size} steps, fewer than {count}")
        kept += [start + k for k in _section(size, count)]
        start += size
    return sorted(set(kept))


def _parse_count(text: str, spacing: str) -> int:
    try:
        return int(text)
    except ValueError as e:
        raise UserError(f"spacing {spacing!r}: expected a step count like 250, \"10,15,20\" or \"ddim50\"") from e


def _show(spacing: int | str | Sequence[int]) -> str:
    return str(spacing) if isinstance(spacing, int) else repr(spacing if isinstance(spacing, str) else list(spacing))


def respaced_betas(alphas_cumprod: torch.Tensor, kept: Sequence[int]) -> torch.Tensor:
    """Betas of the process that keeps steps `kept` (ascending) of one with alphas_cumprod (T,):
    beta_i = 1 - alpha_bar[k_i] / alpha_bar[k_{i-1}], with alpha_bar[k_{-1}] = 1. Returns (n,) float64."""
    kept_ab = alphas_cumprod.to(torch.float64)[torch.as_tensor(list(kept), dtype=torch.long)]  # (n,)
    prev_ab = torch.cat([kept_ab.new_ones(1), kept_ab[:-1]])  # (n,)
    return 1 - kept_ab / prev_ab
