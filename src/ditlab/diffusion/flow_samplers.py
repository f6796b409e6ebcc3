"""Samplers of a flow (SiT's `transport/integrators.py` and `Sampler`): Euler and Heun on a fixed
time grid for the probability-flow ODE dx = v dt, Euler-Maruyama and Heun for the SDE
dx = (v + w_t score) dt + sqrt(2 w_t) dW with SiT's last step, and dopri5 through torchdiffeq.

Each integrates from t0 (noise) to t1 (data) over a grid of Python floats; the model is reached through
`Fields`, which evaluates it once at (x, t) and returns the velocity and the score. SDE step noise comes
from a `NoiseFn` (see `samplers.noise_source`), one draw a step, so that per-image generators make
image i depend on its own generator alone. Steps follow SiT's order of operations."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import torch

from ditlab.diffusion import flow
from ditlab.errors import UserError

NoiseFn = Callable[[], torch.Tensor]
LAST_STEPS = ("mean", "tweedie", "euler", "none")
DOPRI5_ATOL = 1e-6  # SiT's sample.py defaults
DOPRI5_RTOL = 1e-3


class Fields(Protocol):
    """The model's velocity and score at the state x (N, C, ...) and time t (a float); `at` is the time
    that decides whether the evaluation is guided (None: t), the step's first time for a step's later
    evaluations (a guidance interval guides all of a step or none of it)."""

    path: str

    def velocity(self, x: torch.Tensor, t: float, at: float | None = None) -> torch.Tensor: ...

    def velocity_and_score(self, x: torch.Tensor, t: float,
                           at: float | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...  # fmt: skip


def time_grid(t0: float, t1: float, intervals: int, shift: float = 1.0) -> list[float]:
    """intervals + 1 times from t0 to t1, evenly spaced (SiT's linspace) or, for shift != 1, shifted
    toward t0 (the noise) by `flow.shift_time` on [t0, t1] (both ends kept)."""
    u = torch.linspace(0.0, 1.0, intervals + 1, dtype=torch.float64)
    u = torch.as_tensor(flow.shift_time(u, shift))
    return (t0 + (t1 - t0) * u).tolist()


def _progress(pairs: Iterable, total: int, progress: bool) -> Iterable:
    if not progress:
        return pairs
    from tqdm.auto import tqdm

    return tqdm(pairs, total=total, desc="sampling", unit="step")


def _intervals(grid: Sequence[float], progress: bool) -> Iterable[tuple[float, float]]:
    return _progress(zip(grid[:-1], grid[1:]), len(grid) - 1, progress)


def euler_ode(fields: Fields, x: torch.Tensor, grid: Sequence[float], progress: bool = False) -> torch.Tensor:
    """x at grid[-1] from x at grid[0]: x <- x + dt v(x, t) (torchdiffeq's euler on SiT's grid)."""
    for t, t_next in _intervals(grid, progress):
        x = x + (t_next - t) * fields.velocity(x, t)
    return x


def heun_ode(fields: Fields, x: torch.Tensor, grid: Sequence[float], progress: bool = False) -> torch.Tensor:
    """Heun's method (torchdiffeq's heun2): x <- x + dt/2 (v(x, t) + v(x + dt v(x, t), t + dt))."""
    for t, t_next in _intervals(grid, progress):
        dt = t_next - t
        k1 = fields.velocity(x, t)
        k2 = fields.velocity(x + dt * k1, t_next, at=t)
        x = x + dt * (0.5 * k1 + 0.5 * k2)
    return x


class SDE:
    """The SDE of `fields` with diffusion coefficient w_t = flow.diffusion_coefficient(form, path, t, norm)."""

    def __init__(self, fields: Fields, form: str, norm: float):
        self.fields, self.form, self.norm = fields, form, norm

    def diffusion(self, x: torch.Tensor, t: float) -> torch.Tensor | float:
        """w_t as a (1, ..., 1) tensor of x's dtype (a number for the constant form)."""
        t_ = torch.full((1,) * x.ndim, t, dtype=x.dtype, device=x.device)
        return flow.diffusion_coefficient(self.form, self.fields.path, t_, self.norm)

    def drift(self, x: torch.Tensor, t: float, at: float | None = None) -> torch.Tensor:
        """v + w_t score at (x, t) (guided as at `at`, default t)."""
        v, score = self.fields.velocity_and_score(x, t, at)
        return v + self.diffusion(x, t) * score


def _sqrt(w: torch.Tensor | float) -> torch.Tensor | float:
    return torch.sqrt(w) if isinstance(w, torch.Tensor) else math.sqrt(w)


def sde_euler(sde: SDE, x: torch.Tensor, grid: Sequence[float], draw: NoiseFn,
              progress: bool = False) -> torch.Tensor:  # fmt: skip
    """Euler-Maruyama over the grid: x <- x + drift dt + sqrt(2 w_t) sqrt(dt) noise."""
    for t, t_next in _intervals(grid, progress):
        dt = t_next - t
        noise = draw()
        mean = x + sde.drift(x, t) * dt
        x = mean + _sqrt(2 * sde.diffusion(x, t)) * (noise * math.sqrt(dt))
    return x


def sde_heun(sde: SDE, x: torch.Tensor, grid: Sequence[float], draw: NoiseFn,
             progress: bool = False) -> torch.Tensor:  # fmt: skip
    """SiT's stochastic Heun: the noise first, x^ = x + sqrt(2 w_t) sqrt(dt) noise, then a Heun step of
    the drift from x^: x <- x^ + dt/2 (K1 + K2), K1 = drift(x^, t), K2 = drift(x^ + dt K1, t + dt)."""
    for t, t_next in _intervals(grid, progress):
        dt = t_next - t
        x_hat = x + _sqrt(2 * sde.diffusion(x, t)) * (draw() * math.sqrt(dt))
        k1 = sde.drift(x_hat, t)
        k2 = sde.drift(x_hat + dt * k1, t_next, at=t)
        x = x_hat + 0.5 * dt * (k1 + k2)
    return x


def last_step(kind: str, sde: SDE, x: torch.Tensor, t: float, size: float) -> torch.Tensor:
    """SiT's last SDE step from t to t + size without noise: "mean" (the SDE's drift), "euler" (the
    ODE's velocity), "tweedie" (the denoised E[x_1 | x_t] = (x + sigma_t^2 score) / alpha_t) or "none"."""
    if kind == "none":
        return x
    if kind == "mean":
        return x + sde.drift(x, t) * size
    if kind == "euler":
        return x + sde.fields.velocity(x, t) * size
    if kind == "tweedie":
        c = flow.coefficients(sde.fields.path, torch.tensor(t, dtype=x.dtype, device=x.device))
        return x / c.alpha + c.sigma**2 / c.alpha * sde.fields.velocity_and_score(x, t)[1]
    raise ValueError(f"unknown last step {kind!r}")


def dopri5(fields: Fields, x: torch.Tensor, t0: float, t1: float, atol: float = DOPRI5_ATOL,
           rtol: float = DOPRI5_RTOL, points: int = 2) -> torch.Tensor:  # fmt: skip
    """The adaptive Dormand-Prince 5(4) solution at t1 from x at t0, by torchdiffeq's odeint as SiT calls it
    (`points` output times from t0 to t1 do not change the steps). The step size is controlled on the
    whole batch's error, so an image depends on the batch it is solved in. Its steps are its own: a
    guidance interval is decided at every evaluation, by its time."""
    try:
        from torchdiffeq import odeint  # type: ignore[import-untyped]
    except ImportError as e:
        raise UserError("sampler 'dopri5' needs torchdiffeq: pip install 'ditlab[flow]' (or torchdiffeq)") from e
    times = torch.linspace(t0, t1, max(points, 2), device=x.device)
    return odeint(lambda t, y: fields.velocity(y, float(t)), x, times, method="dopri5", atol=atol, rtol=rtol)[-1]
