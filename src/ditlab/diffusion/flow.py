"""Flow matching on an interpolant (SiT; Ma et al. 2024, willisma/SiT's `transport/`) as small pure
functions of (path, t, x).

Time t in [0, 1]: t = 0 is the noise x_0 ~ N(0, I), t = 1 the data x_1 (SiT's convention). A path is
x_t = alpha_t x_1 + sigma_t x_0 with its velocity u_t = alpha'_t x_1 + sigma'_t x_0:
- "linear" (SiT's ICPlan): alpha_t = t, sigma_t = 1 - t;
- "gvp" (SiT's GVPCPlan, variance preserving): alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2).
The model predicts the velocity (SiT's default), the noise x_0 or the score of p_t; the probability-flow
velocity and the score follow from any of them (SiT's `get_drift` / `get_score`). Every t below is a
tensor broadcastable against x (see `expand`) or a Python number."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PATHS = ("linear", "gvp")
PREDICTIONS = ("velocity", "noise", "score")
LOSS_WEIGHTS = ("none", "velocity", "likelihood")  # SiT's loss weights for noise / score prediction
DIFFUSION_FORMS = ("sigma", "sbdm", "constant", "linear", "decreasing", "increasing-decreasing")
TIME_SAMPLINGS = ("uniform", "logit-normal")
NON_VELOCITY_EPS = 1e-3  # SiT's train_eps and sample_eps for noise / score prediction (velocity: 0)

Time = torch.Tensor | float


def _sin(t: Time) -> Time:
    return torch.sin(t) if isinstance(t, torch.Tensor) else math.sin(t)


def _cos(t: Time) -> Time:
    return torch.cos(t) if isinstance(t, torch.Tensor) else math.cos(t)


def _tan(t: Time) -> Time:
    return torch.tan(t) if isinstance(t, torch.Tensor) else math.tan(t)


def expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t (N,) viewed as (N, 1, ..., 1) to broadcast against x (N, ...)."""
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


@dataclass(frozen=True)
class Coefficients:
    """alpha_t, its derivative, sigma_t, its derivative (tensors shaped like t, or numbers)."""

    alpha: Time
    d_alpha: Time
    sigma: Time
    d_sigma: Time


def coefficients(path: str, t: Time) -> Coefficients:
    """The path's coefficients at t (SiT's compute_alpha_t / compute_sigma_t)."""
    if path == "linear":
        return Coefficients(t, 1, 1 - t, -1)
    if path == "gvp":
        half_pi_t = t * math.pi / 2
        return Coefficients(_sin(half_pi_t), math.pi / 2 * _cos(half_pi_t),
                            _cos(half_pi_t), -math.pi / 2 * _sin(half_pi_t))  # fmt: skip
    raise ValueError(f"unknown path {path!r}")


def alpha_ratio(path: str, t: Time) -> Time:
    """alpha'_t / alpha_t, in SiT's stable form: 1 / t (linear), pi / (2 tan(pi t / 2)) (gvp)."""
    if path == "linear":
        return 1 / t
    return math.pi / (2 * _tan(t * math.pi / 2))


def interpolant(path: str, t: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t and the target velocity u_t, each (N, ...), for noise x0 and data x1 (N, ...) at t (N,)."""
    c = coefficients(path, expand(t, x1))
    return c.alpha * x1 + c.sigma * x0, c.d_alpha * x1 + c.d_sigma * x0


def sbdm_diffusion(path: str, t: Time) -> Time:
    """alpha'/alpha sigma^2 - sigma sigma': the diffusion of the SDE that matches the score-based
    diffusion model (SiT's compute_drift, second term); the probability-flow velocity is
    alpha'/alpha x + this times the score."""
    c = coefficients(path, t)
    return alpha_ratio(path, t) * c.sigma**2 - c.sigma * c.d_sigma


def score_from_velocity(path: str, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The score of p_t at x_t = x from the velocity v (SiT's get_score_from_velocity); t broadcastable."""
    c = coefficients(path, t)
    reverse_ratio = c.alpha / c.d_alpha
    variance = c.sigma**2 - reverse_ratio * c.d_sigma * c.sigma
    return (reverse_ratio * v - x) / variance


def velocity_field(prediction: str, path: str, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The probability-flow velocity dx/dt at (x, t) from the model's output (SiT's get_drift)."""
    if prediction == "velocity":
        return out
    score = out if prediction == "score" else out / -coefficients(path, t).sigma
    return alpha_ratio(path, t) * x + sbdm_diffusion(path, t) * score


def score_field(prediction: str, path: str, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The score of p_t at (x, t) from the model's output (SiT's get_score)."""
    if prediction == "velocity":
        return score_from_velocity(path, out, x, t)
    return out if prediction == "score" else out / -coefficients(path, t).sigma


def training_loss(prediction: str, loss_weight: str, path: str, out: torch.Tensor, x0: torch.Tensor,
                  x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """SiT's loss, (N,): the mean over each image of (out - u_t)^2 for velocity prediction, of
    w (out - x_0)^2 for noise and of w (sigma out + x_0)^2 for score prediction, with the weight w
    1 ("none"), (D / sigma)^2 ("velocity") or D / sigma^2 ("likelihood"), D = `sbdm_diffusion`.
    out, x0 (noise), x1 (data): (N, C, ...); t (N,)."""
    te = expand(t, x1)
    if prediction == "velocity":
        sq = (out - interpolant(path, t, x0, x1)[1]) ** 2
    else:
        sigma = coefficients(path, te).sigma
        d = sbdm_diffusion(path, te)
        weight = {"none": 1, "velocity": (d / sigma) ** 2, "likelihood": d / sigma**2}[loss_weight]
        sq = weight * ((out - x0) ** 2 if prediction == "noise" else (out * sigma + x0) ** 2)
    return sq.mean(dim=tuple(range(1, sq.ndim)))


def diffusion_coefficient(form: str, path: str, t: torch.Tensor, norm: float = 1.0) -> torch.Tensor | float:
    """The SDE's diffusion coefficient w_t (SiT's compute_diffusion): the SDE is
    dx = (v + w_t score) dt + sqrt(2 w_t) dW. "sbdm" = norm x `sbdm_diffusion` (singular at t = 0),
    "sigma" = norm sigma_t, "linear" = norm (1 - t), "constant" = norm, "decreasing" =
    (norm cos(pi t) + 1)^2 / 4, "increasing-decreasing" = norm sin(pi t)^2."""
    if form == "constant":
        return norm
    if form == "sbdm":
        return norm * sbdm_diffusion(path, t)
    if form == "sigma":
        return norm * coefficients(path, t).sigma
    if form == "linear":
        return norm * (1 - t)
    if form == "decreasing":
        return 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2
    if form == "increasing-decreasing":
        return norm * torch.sin(math.pi * t) ** 2
    raise ValueError(f"unknown diffusion form {form!r}")


def default_eps(prediction: str) -> float:
    """SiT's train_eps and sample_eps: 0 for velocity prediction (stable on all of [0, 1]), else 1e-3."""
    return 0.0 if prediction == "velocity" else NON_VELOCITY_EPS


def time_interval(prediction: str, eps: float, *, sde: bool = False, diffusion_form: str = "sigma",
                  last_step_size: float = 0.0) -> tuple[float, float]:  # fmt: skip
    """SiT's check_interval for the linear and gvp paths: [0, 1] for velocity prediction's training and
    ODE; otherwise it starts at eps where the first step needs it (noise or score prediction, or the
    SBDM SDE) and ends at 1 - last_step_size (an SDE's last step covers the rest) or 1 - eps."""
    if prediction == "velocity" and not sde:
        return 0.0, 1.0
    t0 = eps if (sde and diffusion_form == "sbdm") or prediction != "velocity" else 0.0
    t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
    return t0, t1


def shift_time(t: Time, shift: float) -> Time:
    """Time shifted toward the noise for shift > 1 (SD3's shift of the noise level 1 - t:
    s (1 - t) / (1 + (s - 1)(1 - t))); shift 1 is the identity; 0 and 1 stay in place."""
    if shift == 1.0:
        return t
    noise_level = 1 - t
    return 1 - shift * noise_level / (1 + (shift - 1) * noise_level)


def sample_time(n: int, sampling: str, t0: float, t1: float, location: float = 0.0, scale: float = 1.0,
                device: torch.device | str | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """n training times (n,) float32: uniform on [t0, t1) (SiT), or logit-normal sigmoid(location + scale n),
    n ~ N(0, 1) (Esser et al. 2024), mapped onto [t0, t1]."""
    if sampling == "uniform":
        u = torch.rand(n, device=device, generator=generator)
    elif sampling == "logit-normal":
        u = torch.sigmoid(location + scale * torch.randn(n, device=device, generator=generator))
    else:
        raise ValueError(f"unknown time sampling {sampling!r}")
    return u * (t1 - t0) + t0
