"""Samplers over a (respaced) Diffusion: ancestral DDPM, DDIM, DPM-Solver++(2M), and
classifier-free guidance wrapped around the model.

Every sampler visits the process's steps from last to first, calls the model once per step
with the ORIGINAL timestep index, and returns x_0. Step noise comes from `generator`: one
torch.Generator for the batch, or a list of N, one per image, so that image i depends only
on its own generator (and not on the batch it was sampled in)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ditlab.diffusion.gaussian import ModelFn, ProcessTables, extract, predict_eps_from_x0
from ditlab.diffusion.guidance import Guidance, ddpm_sigma
from ditlab.diffusion.guided import GuidedModel
from ditlab.errors import UserError


class Process(Protocol):
    """What a sampler needs of a (respaced) Gaussian process: `diffusion.Diffusion` is one. (The
    protocol every training objective implements is `diffusion.protocol.Process`.)"""

    num_timesteps: int

    @property
    def timesteps(self) -> torch.Tensor: ...  # (T,) long original indices

    @property
    def alphas_cumprod(self) -> torch.Tensor: ...  # (T,) float64

    def tables_on(self, device: torch.device | str) -> ProcessTables: ...

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = False) -> dict[str, torch.Tensor]: ...  # fmt: skip

Generators = torch.Generator | Sequence[torch.Generator] | None
StepModel = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]  # (x (N, C, ...), t (N,), guided) -> output
NoiseFn = Callable[[], torch.Tensor]


def guided_model(model: ModelFn, y: torch.Tensor | None, cfg_scale: float, guidance_channels: int | None,
                 channels: int, null_class: int | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """model(x, t, y), or with cfg_scale != 1 classifier-free guidance at every call (Ho & Salimans,
    2022): the conditional and null-label inputs in one batch of 2N, eps = eps_u + s * (eps_c - eps_u)
    on the first `guidance_channels` channels (default: all C eps channels), the remaining output
    channels (and the variance) taken from the conditional half. With guidance_channels=3 this is
    exactly DiT's `forward_with_cfg`; only the conditional half of the state is carried. (A
    `guided.GuidedModel` that guides everywhere.)"""
    guided = GuidedModel(model, y, Guidance(scale=cfg_scale, channels=guidance_channels, null_class=null_class),
                         channels)
    return lambda x, t: guided(x, t)


def step_plan(process: Process, guidance: Guidance) -> list[bool]:
    """Whether each step i of `process` (indexing its respaced steps) is guided: by its EDM noise level
    sigma = sqrt((1 - alpha_bar) / alpha_bar) and its ORIGINAL timestep index as the process's t."""
    ab = process.alphas_cumprod.tolist()  # float64 on the host
    ts = process.timesteps.tolist()
    return [guidance.applies(ddpm_sigma(a), float(t)) for a, t in zip(ab, ts)]


def noise_source(like: torch.Tensor, generator: Generators) -> NoiseFn:
    """A function drawing standard normal noise shaped like `like` (N, ...) on its device."""
    shape, dtype, device = like.shape, like.dtype, like.device
    if generator is None:
        return lambda: torch.randn(shape, dtype=dtype, device=device)
    if isinstance(generator, torch.Generator):
        g = generator
        return lambda: torch.randn(shape, generator=g, dtype=dtype, device=g.device).to(device)
    gens = list(generator)
    if len(gens) != shape[0]:
        raise UserError(f"got {len(gens)} generators for a batch of {shape[0]}: pass one per image")
    row = (1, *shape[1:])
    return lambda: torch.cat([torch.randn(row, generator=g, dtype=dtype, device=g.device).to(device) for g in gens])


def _steps(n: int, progress: bool) -> Iterator[int]:
    """Step indices n - 1, ..., 0, behind a progress bar if asked."""
    indices = range(n - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        return iter(tqdm(indices, desc="sampling", unit="step"))
    return iter(indices)


def _full(i: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((like.shape[0],), i, dtype=torch.long, device=like.device)  # (N,)


def _predict(process: Process, model: StepModel, x: torch.Tensor, i: int, clip_denoised: bool,
             plan: Sequence[bool] | None) -> dict[str, torch.Tensor]:  # fmt: skip
    """p_mean_variance of the model's output at step i of `process` (the model gets the ORIGINAL index),
    guided where plan[i] (plan None: every step)."""
    original = int(process.timesteps[i])
    out = model(x, _full(original, x), True if plan is None else plan[i])
    return process.p_mean_variance(out, x, _full(i, x), clip_denoised=clip_denoised)


def ddpm_step(out: dict[str, torch.Tensor], noise: torch.Tensor | None) -> torch.Tensor:
    """One ancestral step from p_mean_variance's `out`: x_{t-1} = mean + exp(log_variance / 2) * noise
    (noise (N, C, ...) standard normal; None at the last step, which adds none)."""
    if noise is None:
        return out["mean"]
    return out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise


def ddim_step(
    tab: ProcessTables,
    out: dict[str, torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM step (Song et al., 2021, eqs. 12 and 16) from x_t (N, C, ...) at step indices t (N,),
    written as ADM does: eps is re-derived from the (possibly clipped) x_0 prediction in `out`.
    eta = 0 is deterministic (noise unused), eta = 1 has DDPM's posterior variance."""
    x = x.to(out["pred_x0"].dtype)
    eps = predict_eps_from_x0(tab, x, t, out["pred_x0"])
    ab, ab_prev = extract(tab.alphas_cumprod, t, x), extract(tab.alphas_cumprod_prev, t, x)
    sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
    x_prev = out["pred_x0"] * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma**2) * eps
    return x_prev if noise is None else x_prev + sigma * noise


def ddpm_loop(process: Process, model: StepModel, x: torch.Tensor, draw: NoiseFn, *, clip_denoised: bool,
              progress: bool, plan: Sequence[bool] | None = None) -> torch.Tensor:  # fmt: skip
    """Ancestral sampling with the model's (learned) variance; no noise at the last step."""
    for i in _steps(process.num_timesteps, progress):
        x = ddpm_step(_predict(process, model, x, i, clip_denoised, plan), draw() if i > 0 else None)
    return x


def ddim_loop(process: Process, model: StepModel, x: torch.Tensor, draw: NoiseFn, *, clip_denoised: bool,
              progress: bool, eta: float = 0.0, plan: Sequence[bool] | None = None) -> torch.Tensor:  # fmt: skip
    """DDIM sampling (deterministic for eta = 0)."""
    tab = process.tables_on(x.device)
    for i in _steps(process.num_timesteps, progress):
        out = _predict(process, model, x, i, clip_denoised, plan)
        x = ddim_step(tab, out, x, _full(i, x), eta, draw() if i > 0 and eta > 0 else None)
    return x


def dpm_solver_2m_loop(process: Process, model: StepModel, x: torch.Tensor, draw: NoiseFn, *,
                       clip_denoised: bool, progress: bool,
                       plan: Sequence[bool] | None = None) -> torch.Tensor:  # fmt: skip
    """DPM-Solver++(2M) (Lu et al., 2022, algorithm 2): the multistep second-order solver of the
    probability-flow ODE in the data prediction x_0, stepping in lambda = log(alpha / sigma).
    Deterministic. Two steps are first order (then equal to DDIM): the first, which has no
    history, and the step into the first kept timestep t_0 = 0, by far the longest in lambda
    (2.9 against at most 0.7 for 20 evenly spaced steps of the linear schedule), where the
    multistep extrapolation from a 4x shorter previous step overshoots while x_0 barely moves.
    The last step goes to sigma = 0, i.e. returns the x_0 prediction at t_0 (as diffusers'
    final_sigmas_type="zero")."""
    ab = process.alphas_cumprod.tolist()  # float64 on the host: the coefficients are scalars
    alpha = [math.sqrt(a) for a in ab]
    sigma = [math.sqrt(1.0 - a) for a in ab]
    lam = [math.log(a) - math.log(s) for a, s in zip(alpha, sigma)]
    prev_x0, prev_h = None, None
    for i in _steps(process.num_timesteps, progress):
        x0 = _predict(process, model, x, i, clip_denoised, plan)["pred_x0"]
        if i == 0:
            x = x0  # the last step lands on sigma = 0: x_0 itself (the loop ends here)
            continue
        h = lam[i - 1] - lam[i]
        if prev_x0 is None or prev_h is None or i == 1:
            d = x0
        else:
            half_inv_r = 0.5 * h / prev_h  # 1 / (2r), r = h_prev / h
            d = (1 + half_inv_r) * x0 - half_inv_r * prev_x0
        x = (sigma[i - 1] / sigma[i]) * x.to(x0.dtype) - (alpha[i - 1] * math.expm1(-h)) * d
        prev_x0, prev_h = x0, h
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": ddpm_loop,
    "ddim": ddim_loop,
    "dpm++2m": dpm_solver_2m_loop,
}


@dataclass(frozen=True, kw_only=True)
class Options:
    """How to walk the process: which sampler, DDIM's eta, x_0 clipping, a progress bar."""

    sampler: str = "ddpm"
    eta: float = 0.0
    clip_denoised: bool = False
    progress: bool = False


def sample(process: Process, model: ModelFn, noise: torch.Tensor, y: torch.Tensor | None = None,
           guidance: Guidance = Guidance(), options: Options = Options(),
           generator: Generators = None) -> torch.Tensor:
    """x_0 (N, C, ...) from x_T = noise (N, C, ...) through every step of `process` (already
    respaced), the model called with the ORIGINAL timestep index; y (N,) labels or None; guided at the
    steps `step_plan` picks (one model call of N elsewhere). Checked inputs: see `diffusion.Diffusion.sample`."""
    step_model = GuidedModel(model, y, guidance, noise.shape[1])
    draw = noise_source(noise, generator)
    extra = {"eta": options.eta} if options.sampler == "ddim" else {}
    with torch.no_grad():
        return SAMPLERS[options.sampler](process, step_model, noise, draw, clip_denoised=options.clip_denoised,
                                         progress=options.progress, plan=step_plan(process, guidance), **extra)
