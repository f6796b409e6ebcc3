"""`Diffusion`: the public face of the Gaussian process (DESIGN.md section 3). It owns the float64
tables (and their per-device copies), respacing, and dispatches to the pure functions of
`gaussian.py` and the samplers of `samplers.py`."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from ditlab.diffusion import gaussian, samplers
from ditlab.diffusion.gaussian import FIXED_VARIANCES, ModelFn, ProcessTables
from ditlab.diffusion.guidance import Guidance
from ditlab.diffusion.guided import check_sample_inputs
from ditlab.diffusion.schedule import get_betas, respaced_betas, spaced_timesteps
from ditlab.errors import UserError

DEFAULT_TIMESTEPS = 1000  # DiT's process length
DEFAULT_SAMPLING_STEPS = 250  # the paper's DDPM sampling steps


class Diffusion:
    """A T-step Gaussian diffusion (ADM / Improved DDPM): epsilon prediction, learned-range or
    fixed variance, MSE + variational-bound loss, DDPM / DDIM / DPM-Solver++(2M) sampling.

    `fixed_variance` ("large" = beta_t, "small" = the posterior variance) is used only when
    learn_sigma is False; DiT's reference uses "large"."""

    objective = "ddpm"
    """What `diffusion.protocol.PROCESSES` calls it (a checkpoint's record names it)."""
    sampler_names: tuple[str, ...] = tuple(samplers.SAMPLERS)
    """The samplers `generate` takes; the first is the default."""
    default_steps = DEFAULT_SAMPLING_STEPS

    def __init__(
        self,
        num_timesteps: int = DEFAULT_TIMESTEPS,
        schedule: str = "linear",
        learn_sigma: bool = True,
        fixed_variance: str = "large",
    ):
        if fixed_variance not in FIXED_VARIANCES:
            raise UserError(f"unknown fixed variance {fixed_variance!r}; choose one of {', '.join(FIXED_VARIANCES)}")
        betas = get_betas(schedule, num_timesteps)
        self.schedule = schedule
        self.learn_sigma = learn_sigma
        self.fixed_variance = fixed_variance
        self._set_process(betas, torch.arange(num_timesteps))

    def _set_process(self, betas: torch.Tensor, timesteps: torch.Tensor,
                     base_alphas_cumprod: torch.Tensor | None = None) -> None:  # fmt: skip
        """The process of `betas` at original `timesteps`; the base alpha_bars default to its own."""
        self.tables = ProcessTables.from_betas(betas, timesteps)  # float64, on the CPU
        self.num_timesteps = len(betas)
        # (T_original,) alpha_bars of the unspaced process, what respacing starts from
        self.base_alphas_cumprod = self.tables.alphas_cumprod if base_alphas_cumprod is None else base_alphas_cumprod
        self._device_tables: dict[torch.device, ProcessTables] = {}
        self._respaced: dict[int | str | tuple[int, ...], Diffusion] = {}

    def __repr__(self) -> str:
        return (
            f"Diffusion(num_timesteps={self.num_timesteps} of {len(self.base_alphas_cumprod)}, "
            f"schedule={self.schedule!r}, learn_sigma={self.learn_sigma})"
        )

    @property
    def timesteps(self) -> torch.Tensor:
        """(T,) long: the original index of each step, ascending (arange(T) unless respaced)."""
        return self.tables.timesteps

    @property
    def betas(self) -> torch.Tensor:
        """(T,) float64 betas of this (possibly respaced) process."""
        return self.tables.betas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """(T,) float64 alpha_bar_t of this (possibly respaced) process."""
        return self.tables.alphas_cumprod

    def tables_on(self, device: torch.device | str) -> ProcessTables:
        """The tables on `device`, copied there once and cached."""
        device = torch.device(device)
        if device not in self._device_tables:
            self._device_tables[device] = self.tables.to(device)
        return self._device_tables[device]

    # ---- respacing ----------------------------------------------------------------------------

    def respace(self, spacing: int | str | Sequence[int]) -> Diffusion:
        """A Diffusion over the steps of this process that ADM's `space_timesteps` keeps: n evenly
        spaced ones for an int n (both ends kept; n = 1 keeps step 0), or ADM's section counts
        ("10,15,20") and "ddimN" forms (see `schedule.spaced_timesteps`). Its betas are recomputed
        from the kept alpha_bars; its steps keep their ORIGINAL indices (`timesteps`)."""
        key = spacing if isinstance(spacing, int | str) else tuple(int(c) for c in spacing)
        if key not in self._respaced:
            kept = spaced_timesteps(self.num_timesteps, spacing)
            if len(kept) == self.num_timesteps:
                return self
            self._respaced[key] = self.respace_to(self.timesteps[kept].tolist())
        return self._respaced[key]

    def respace_to(self, timesteps: Sequence[int]) -> Diffusion:
        """A Diffusion over the given ORIGINAL timestep indices (strictly ascending)."""
        ts = [int(s) for s in timesteps]
        base_len = len(self.base_alphas_cumprod)
        if not ts or any(b <= a for a, b in zip(ts, ts[1:])) or ts[0] < 0 or ts[-1] >= base_len:
            shown = ts if len(ts) <= 8 else [*ts[:4], "...", *ts[-4:]]
            raise UserError(f"timesteps must be strictly ascending indices in [0, {base_len}), got {shown}")
        spaced = copy.copy(self)  # the same settings; the process itself is replaced below
        betas = respaced_betas(self.base_alphas_cumprod, ts)
        spaced._set_process(betas, torch.tensor(ts, dtype=torch.long), self.base_alphas_cumprod)
        return spaced

    # ---- the process ---------------------------------------------------------------------------

    def sample_timesteps(
        self, n: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """n step indices drawn uniformly from [0, T): (n,) long (ADM's uniform schedule sampler)."""
        return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """A draw of x_t ~ q(x_t | x_0) for x0 (N, ...) and step indices t (N,)."""
        dtype = gaussian.working_dtype(x0)
        noise = torch.randn_like(x0, dtype=dtype) if noise is None else noise.to(dtype)
        return gaussian.q_sample(self.tables_on(x0.device), x0.to(dtype), t, noise)

    def q_posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (N, ...) and clipped log-variance (N, 1, ..., 1) of q(x_{t-1} | x_t, x_0)."""
        dtype = gaussian.working_dtype(x_t)
        return gaussian.q_posterior(self.tables_on(x_t.device), x0.to(dtype), x_t.to(dtype), t)

    def p_mean_variance(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False
    ) -> dict[str, torch.Tensor]:
        """"mean", "log_variance", "pred_x0" (each (N, C, ...)) of p(x_{t-1} | x_t) from the model's raw
        output (N, 2C or C, ...) at the ORIGINAL timestep self.timesteps[t]; t (N,) indexes this process."""
        tab = self.tables_on(x_t.device)
        return gaussian.p_mean_variance(
            tab, model_output, x_t, t, self.learn_sigma, self.fixed_variance, clip_denoised=clip_denoised
        )

    def training_losses(
        self,
        model: ModelFn,
        x0: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """{"loss", "mse", "vb"}, each (N,), for data x0 (N, C, ...) at steps t (N,) of this process."""
        tab = self.tables_on(x0.device)
        return gaussian.training_losses(tab, model, x0, t, y, noise, self.learn_sigma, self.fixed_variance)

    # ---- the Process protocol (diffusion.protocol) -------------------------------------------------

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Diffusion:
        """The Diffusion of a `to_record` dict (or of a run's config: its "learn_sigma"; DiT's
        defaults for what it lacks)."""
        return cls(num_timesteps=int(record.get("num_timesteps", DEFAULT_TIMESTEPS)),
                   schedule=str(record.get("schedule", "linear")), learn_sigma=bool(record.get("learn_sigma", True)),
                   fixed_variance=str(record.get("fixed_variance", "large")))

    def to_record(self) -> dict[str, Any]:
        """The settings of the (unspaced) process, JSON-able; `from_record` rebuilds it."""
        return {"objective": self.objective, "num_timesteps": len(self.base_alphas_cumprod),
                "schedule": self.schedule, "learn_sigma": self.learn_sigma, "fixed_variance": self.fixed_variance}

    def generate(self, model: ModelFn, noise: torch.Tensor, y: torch.Tensor | None = None, *, steps: int,
                 sampler: str, guidance: Guidance, generator: samplers.Generators = None, progress: bool = False,
                 clip_denoised: bool = False, eta: float = 0.0) -> torch.Tensor:  # fmt: skip
        """x_0 (N, C, ...) from x_T = noise (N, C, ...) with `steps` respaced steps of `sampler`, guided
        as `guidance` says (its null_class None: the model's `null_class`). See `sample` for the rest."""
        if sampler not in samplers.SAMPLERS:
            raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(samplers.SAMPLERS)}")
        if not isinstance(steps, int) or not 1 <= steps <= self.num_timesteps:
            raise UserError(f"steps must be between 1 and the process length {self.num_timesteps}, got {steps}")
        if eta < 0 or (eta != 0 and sampler != "ddim"):
            raise UserError(f"eta={eta} is only meaningful for sampler 'ddim' (eta >= 0)")
        check_sample_inputs(model, noise, y, guidance, stacklevel=3)
        if guidance.null_class is None:
            guidance = dataclasses.replace(guidance, null_class=getattr(model, "null_class", None))
        options = samplers.Options(sampler=sampler, eta=eta, clip_denoised=clip_denoised, progress=progress)
        return samplers.sample(self.respace(steps), model, noise, y, guidance, options, generator)

    def sample(self, model: ModelFn, noise: torch.Tensor, y: torch.Tensor | None = None, steps: int = 250,
               sampler: str = "ddpm", cfg_scale: float = 1.0, guidance_channels: int | None = None, eta: float = 0.0,
               generator: samplers.Generators = None, progress: bool = False, clip_denoised: bool = False,
               guidance_interval: tuple[float, float] | None = None, guidance_t: tuple[float, float] | None = None,
               guide: ModelFn | None = None) -> torch.Tensor:  # fmt: skip
        """Generate x_0 (N, C, ...) from x_T = noise (N, C, ...) with `steps` respaced steps.

        sampler: "ddpm" (ancestral, 250 steps in the paper), "ddim" (eta), "dpm++2m" (20-25 steps).
        y (N,) long labels, or None for an unconditional model. cfg_scale != 1 applies classifier-free
        guidance with the model's `null_class`; guidance_channels=3 reproduces DiT's reference (which
        guides only 3 of the 4 latent channels). generator: one torch.Generator, or one per image.
        clip_denoised clamps x_0 predictions to [-1, 1] (pixel space; DiT samples latents without).
        The model should be in eval mode (DiT drops labels in training mode). guidance_interval (lo, hi):
        guide only the steps whose EDM noise level sqrt((1 - alpha_bar) / alpha_bar) lies in (lo, hi];
        guidance_t (lo, hi): only those whose original timestep index lies in [lo, hi]; guide: a model of
        the same latent space whose prediction replaces the unconditional one (autoguidance, both
        conditional; the variance stays the main model's). The keyword form of `generate`, which takes
        the guidance as one value (`diffusion.guidance.Guidance`)."""
        guidance = Guidance(scale=cfg_scale, channels=guidance_channels, interval=guidance_interval,
                            t_interval=guidance_t, guide=guide)
        return self.generate(model, noise, y, steps=steps, sampler=sampler, guidance=guidance, generator=generator,
                             progress=progress, clip_denoised=clip_denoised, eta=eta)
