"""`FlowMatching`: the second process beside `Diffusion` (DESIGN.md section 3), SiT's interpolant
training and samplers on the DiT backbone. It holds the settings (`FlowConfig`), checks the inputs
and dispatches to the pure functions of `flow.py` and the integrators of `flow_samplers.py`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from ditlab.diffusion import flow, flow_samplers
from ditlab.diffusion.gaussian import ModelFn
from ditlab.diffusion.guidance import Guidance, flow_sigma
from ditlab.diffusion.guided import GuidedModel, check_sample_inputs
from ditlab.diffusion.samplers import Generators, noise_source
from ditlab.errors import UserError

OBJECTIVE = "flow"
SAMPLERS = ("euler", "heun", "sde-euler", "sde-heun", "dopri5")  # the first is the default
DEFAULT_STEPS = 250  # grid intervals (SiT's sample.py: 250 grid points)


@dataclass(frozen=True, kw_only=True)
class FlowConfig:
    """The settings of a flow: what is trained and how it is sampled (SiT's names in brackets)."""

    path: str = "linear"
    """interpolant: "linear" (x_t = t x_1 + (1 - t) x_0) or "gvp" (sin / cos) [--path-type]"""
    prediction: str = "velocity"
    """what the model predicts: "velocity", "noise" or "score" [--prediction]"""
    loss_weight: str = "none"
    """loss weight of noise / score prediction: "none", "velocity" or "likelihood" [--loss-weight]"""
    time_sampling: str = "uniform"
    """training times: "uniform" on SiT's interval, or "logit-normal" (Esser et al. 2024)"""
    time_location: float = 0.0
    """logit-normal: mean of the normal whose sigmoid is t"""
    time_scale: float = 1.0
    """logit-normal: standard deviation of that normal"""
    train_eps: float | None = None
    """training interval [eps, 1 - eps] of noise / score prediction; None: SiT's (1e-3; velocity 0) [--train-eps]"""
    sample_eps: float | None = None
    """the same for sampling; None: SiT's; for velocity it only moves the SBDM SDE's start [--sample-eps]"""
    time_shift: float = 1.0
    """sampler grid shifted toward the noise by this factor (SD3's shift; 1: SiT's even grid)"""
    diffusion_form: str = "sigma"
    """SDE diffusion coefficient w_t: "sigma" (SiT's sample.py default), "sbdm", "linear", "constant",
    "decreasing", "increasing-decreasing" [--diffusion-form]"""
    diffusion_norm: float = 1.0
    """its magnitude [--diffusion-norm]"""
    last_step: str = "mean"
    """SDE last step: "mean", "tweedie", "euler" or "none" [--last-step]"""
    last_step_size: float = 0.04
    """its size in time (none: 0) [--last-step-size]"""
    atol: float = flow_samplers.DOPRI5_ATOL
    """dopri5's absolute tolerance [--atol]"""
    rtol: float = flow_samplers.DOPRI5_RTOL
    """dopri5's relative tolerance [--rtol]"""

    def __post_init__(self) -> None:
        for name, choices in (("path", flow.PATHS), ("prediction", flow.PREDICTIONS),
                              ("loss_weight", flow.LOSS_WEIGHTS), ("time_sampling", flow.TIME_SAMPLINGS),
                              ("diffusion_form", flow.DIFFUSION_FORMS),
                              ("last_step", flow_samplers.LAST_STEPS)):  # fmt: skip
            if getattr(self, name) not in choices:
                raise UserError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(choices)}")
        for name in ("train_eps", "sample_eps"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 0.5:
                raise UserError(f"{name} must be in [0, 0.5), got {value}")
        if not (math.isfinite(self.time_scale) and self.time_scale > 0 and math.isfinite(self.time_location)):
            raise UserError(f"time_scale must be > 0 and time_location finite, got {self.time_scale}, "
                            f"{self.time_location}")
        if not (math.isfinite(self.time_shift) and self.time_shift > 0):
            raise UserError(f"time_shift must be > 0, got {self.time_shift}")
        if not 0 <= self.last_step_size < 1:
            raise UserError(f"last_step_size must be in [0, 1), got {self.last_step_size}")
        if not (self.diffusion_norm >= 0 and self.atol > 0 and self.rtol > 0):
            raise UserError("diffusion_norm must be >= 0 and atol, rtol > 0")


class FlowMatching:
    """Flow matching on an interpolant (SiT): t in [0, 1], t = 0 noise, t = 1 data, the model called with
    t as is (DiT's timestep embedder takes it as a fractional timestep), velocity prediction by default.
    A model with 2C output channels (learned sigma, as SiT's released weights) is read on its first C."""

    objective: str = OBJECTIVE
    sampler_names: tuple[str, ...] = SAMPLERS
    default_steps: int = DEFAULT_STEPS

    def __init__(self, path: str = "linear", **settings: Any):
        self.config = FlowConfig(path=path, **settings)

    def __getattr__(self, name: str) -> Any:  # the settings read as attributes: fm.path, fm.diffusion_form
        if name != "config" and name in FlowConfig.__dataclass_fields__:
            return getattr(self.config, name)
        raise AttributeError(name)

    def __repr__(self) -> str:
        defaults = FlowConfig()
        changed = {k: v for k, v in dataclasses.asdict(self.config).items() if v != getattr(defaults, k)}
        return f"FlowMatching({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    # ---- the record a checkpoint keeps ---------------------------------------------------------

    def to_record(self) -> dict[str, Any]:
        """The objective and every setting, JSON-able: `from_record` rebuilds this process."""
        return {"objective": OBJECTIVE, **dataclasses.asdict(self.config)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> FlowMatching:
        """The process of a `to_record` dict, or of a run's config (its flow settings; other keys are not
        the process's): settings it lacks take their defaults (records older than a setting)."""
        objective = record.get("objective", OBJECTIVE)
        if objective != OBJECTIVE:
            raise UserError(f"the record is of objective {objective!r}, not {OBJECTIVE!r}")
        return cls(**{k: v for k, v in record.items() if k in FlowConfig.__dataclass_fields__})

    # ---- training ------------------------------------------------------------------------------

    @property
    def train_interval(self) -> tuple[float, float]:
        """SiT's training interval of t."""
        eps = flow.default_eps(self.prediction) if self.train_eps is None else self.train_eps
        return flow.time_interval(self.prediction, eps)

    def sample_timesteps(self, n: int, device: torch.device | str | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
        """n training times (n,) float32 in SiT's interval, by the configured time sampling."""
        return flow.sample_time(n, self.time_sampling, *self.train_interval, self.time_location, self.time_scale,
                                device=device, generator=generator)  # fmt: skip

    def training_losses(self, model: ModelFn, x1: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                        noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        """{"loss": (N,)} for data x1 (N, C, ...) at times t (N,) in [0, 1], noise x_0 (default: drawn)."""
        dtype = torch.promote_types(x1.dtype, torch.float32)
        x1 = x1.to(dtype)
        x0 = torch.randn_like(x1) if noise is None else noise.to(dtype)
        t = t.to(device=x1.device, dtype=dtype)
        x_t, _ = flow.interpolant(self.path, t, x0, x1)
        out = model(x_t, t, y)[:, : x1.shape[1]].to(dtype)  # (N, C, ...): learned sigma's half dropped
        return {"loss": flow.training_loss(self.prediction, self.loss_weight, self.path, out, x0, x1, t)}

    # ---- sampling ------------------------------------------------------------------------------

    def sample_interval(self, sampler: str) -> tuple[float, float]:
        """SiT's interval of t for `sampler` (an SDE's ends at 1 - last_step_size)."""
        eps = flow.default_eps(self.prediction) if self.sample_eps is None else self.sample_eps
        size = 0.0 if self.last_step == "none" else self.last_step_size
        return flow.time_interval(self.prediction, eps, sde=sampler.startswith("sde-"),
                                  diffusion_form=self.diffusion_form, last_step_size=size)  # fmt: skip

    def sample(self, model: ModelFn, noise: torch.Tensor, y: torch.Tensor | None = None, steps: int = DEFAULT_STEPS,
               sampler: str = SAMPLERS[0], cfg_scale: float = 1.0, guidance_channels: int | None = None,
               generator: Generators = None, progress: bool = False, clip_denoised: bool = False,
               guidance_interval: tuple[float, float] | None = None, guidance_t: tuple[float, float] | None = None,
               guide: ModelFn | None = None) -> torch.Tensor:  # fmt: skip
        """x at t = 1 (N, C, ...) from the noise at t = 0 (N, C, ...): `steps` intervals of the time grid
        (SiT's num_steps = steps + 1; an SDE adds its last step to 1, dopri5 chooses its own steps). y (N,)
        labels or None; cfg_scale != 1 guides the velocity with the model's null class, on all channels or
        the first `guidance_channels` (3: SiT's forward_with_cfg); generator: SDE noise, one
        torch.Generator or one per image; clip_denoised clamps the result to [-1, 1] (pixel space). The model
        should be in eval mode. guidance_interval (lo, hi): guide only the steps whose EDM noise level
        sigma_t / alpha_t ((1 - t) / t on the linear path) lies in (lo, hi]; guidance_t (lo, hi): those whose
        t lies in [lo, hi] (REPA's guidance_low / high count t the other way: low = 1 - hi, high = 1 - lo);
        guide: a model of the same latent space and objective as the base of the guidance (autoguidance,
        both conditional)."""
        guidance = Guidance(scale=cfg_scale, channels=guidance_channels, null_class=getattr(model, "null_class", None),
                            interval=guidance_interval, t_interval=guidance_t, guide=guide)
        return self.generate(model, noise, y, steps=steps, sampler=sampler, guidance=guidance, generator=generator,
                             progress=progress, clip_denoised=clip_denoised)  # fmt: skip

    def generate(self, model: ModelFn, noise: torch.Tensor, y: torch.Tensor | None = None, *, steps: int,
                 sampler: str, guidance: Guidance, generator: Generators = None,
                 progress: bool = False, clip_denoised: bool = False) -> torch.Tensor:  # fmt: skip
        """`sample` with the guidance as a value (its null_class None: the model's own)."""
        x = self._integrate(model, noise, y, steps, sampler, guidance, generator, progress)
        return x.clamp(-1, 1) if clip_denoised else x

    def _integrate(self, model: ModelFn, noise: torch.Tensor, y: torch.Tensor | None, steps: int, sampler: str,
                   guidance: Guidance, generator: Generators, progress: bool) -> torch.Tensor:  # fmt: skip
        self._check(model, noise, y, steps, sampler, guidance)
        N, C = noise.shape[:2]
        if guidance.null_class is None:
            guidance = dataclasses.replace(guidance, null_class=getattr(model, "null_class", None))
        x = noise.to(torch.promote_types(noise.dtype, torch.float32))
        fields = _ModelFields(GuidedModel(model, y, guidance, C), guidance, self.path, self.prediction, C)
        t0, t1 = self.sample_interval(sampler)
        with torch.no_grad():
            if sampler == "dopri5":
                return flow_samplers.dopri5(fields, x, t0, t1, self.atol, self.rtol, points=steps + 1)
            grid = flow_samplers.time_grid(t0, t1, steps, self.time_shift)
            if sampler == "euler":
                return flow_samplers.euler_ode(fields, x, grid, progress)
            if sampler == "heun":
                return flow_samplers.heun_ode(fields, x, grid, progress)
            sde = flow_samplers.SDE(fields, self.diffusion_form, self.diffusion_norm)
            integrate = flow_samplers.sde_euler if sampler == "sde-euler" else flow_samplers.sde_heun
            x = integrate(sde, x, grid, noise_source(x, generator), progress)
            return flow_samplers.last_step(self.last_step, sde, x, t1, self.last_step_size)

    def _check(self, model: ModelFn, noise: torch.Tensor, y: torch.Tensor | None, steps: int, sampler: str,
               guidance: Guidance) -> None:  # fmt: skip
        if sampler not in SAMPLERS:
            raise UserError(f"unknown flow sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not isinstance(steps, int) or steps < 1:
            raise UserError(f"steps must be an integer >= 1, got {steps}")
        t0, t1 = self.sample_interval(sampler)
        if sampler.startswith("sde-") and self.diffusion_form == "sbdm" and t0 == 0:
            raise UserError("diffusion form 'sbdm' is infinite at t = 0 (SiT's code returns inf there for velocity "
                            "prediction): set sample_eps > 0 or use diffusion form 'sigma'")
        if sampler == "sde-heun" and t1 == 1 and self.prediction == "velocity":
            raise UserError("sampler 'sde-heun' with last step 'none' ends on t = 1, where the score is infinite "
                            "(SiT's code gives NaN there): use a last step or sample_eps > 0")
        check_sample_inputs(model, noise, y, guidance, stacklevel=4)


class _ModelFields:
    """The velocity and score of a guided model (x (N, C, ...), t (N,), guided) -> (N, C or 2C, ...) at a
    time; guided where `guidance` applies at the deciding time `at` (default t): its EDM noise level
    `guidance.flow_sigma` and t itself."""

    def __init__(self, step_model: GuidedModel, guidance: Guidance, path: str, prediction: str, channels: int):
        self.step_model, self.guidance, self.path = step_model, guidance, path
        self.prediction, self.channels = prediction, channels

    def _output(self, x: torch.Tensor, t: float, at: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        at = t if at is None else at
        guided = self.guidance.applies(flow_sigma(self.path, at), at)
        t_model = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)  # (N,)
        out = self.step_model(x, t_model, guided)[:, : self.channels].to(x.dtype)  # (N, C, ...)
        return out, torch.full((1,) * x.ndim, t, dtype=x.dtype, device=x.device)  # t broadcastable

    def velocity(self, x: torch.Tensor, t: float, at: float | None = None) -> torch.Tensor:
        out, t_ = self._output(x, t, at)
        return flow.velocity_field(self.prediction, self.path, out, x, t_)

    def velocity_and_score(self, x: torch.Tensor, t: float,
                           at: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        out, t_ = self._output(x, t, at)
        return (flow.velocity_field(self.prediction, self.path, out, x, t_),
                flow.score_field(self.prediction, self.path, out, x, t_))  # fmt: skip
