"""The Gaussian diffusion process of DDPM / Improved DDPM / ADM as small pure functions.

Every function takes a `ProcessTables` (per-step constants precomputed in float64) and
gathers the rows it needs for a batch of timesteps t (N,), cast to the working dtype (float32,
or float64 for float64 inputs). Equations cite Ho et al. (2020) "DDPM" and Nichol & Dhariwal
(2021) "Improved DDPM"; the conventions (clipped posterior log-variance, learned range,
bits per dimension, the discretised decoder) are those of ADM, which DiT trains with."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from ditlab.errors import UserError

BIN_WIDTH = 1.0 / 255.0  # half the spacing of 256 pixel levels rescaled to [-1, 1]
EDGE = 0.999  # data beyond +-EDGE is the first / last pixel level: the open-ended bins
LOG_FLOOR = 1e-12  # probabilities are clamped here before the log
FIXED_VARIANCES = ("large", "small")

# model(x (N, C, ...), t (N,) original step index, y (N,) labels or None) -> (N, 2C or C, ...)
ModelFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class ProcessTables:
    """Per-step constants of a T-step process, each (T,), float64 (float32 on MPS)."""

    timesteps: torch.Tensor  # (T,) long: the original index of each step, passed to the model
    betas: torch.Tensor
    log_betas: torch.Tensor
    alphas_cumprod: torch.Tensor  # alpha_bar_t
    alphas_cumprod_prev: torch.Tensor  # alpha_bar_{t-1}, with alpha_bar_{-1} = 1
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_mean_coef1: torch.Tensor  # of x_0, DDPM eq. 7
    posterior_mean_coef2: torch.Tensor  # of x_t
    posterior_log_variance_clipped: torch.Tensor  # log beta~_t, with beta~_0 := beta~_1 (beta~_0 = 0)
    fixed_large_log_variance: torch.Tensor  # log beta_t, with beta_0 := beta~_1 (ADM's "fixed large")

    @classmethod
    def from_betas(cls, betas: torch.Tensor, timesteps: torch.Tensor) -> ProcessTables:
        """Tables of the process with betas (T,) whose steps carry original indices timesteps (T,)."""
        betas = betas.to(torch.float64)
        alphas = 1.0 - betas
        ab = torch.cumprod(alphas, dim=0)
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        posterior_variance = betas * (1.0 - ab_prev) / (1.0 - ab)  # DDPM eq. 7
        # beta~_0 = 0 is replaced by beta~_1 (ADM); a one-step process has no beta~_1: its beta_0 then
        first = posterior_variance[1:2] if len(betas) > 1 else betas[:1]
        return cls(
            timesteps=timesteps.to(torch.long),
            betas=betas,
            log_betas=torch.log(betas),
            alphas_cumprod=ab,
            alphas_cumprod_prev=ab_prev,
            sqrt_alphas_cumprod=torch.sqrt(ab),
            sqrt_one_minus_alphas_cumprod=torch.sqrt(1.0 - ab),
            sqrt_recip_alphas_cumprod=torch.sqrt(1.0 / ab),
            sqrt_recipm1_alphas_cumprod=torch.sqrt(1.0 / ab - 1.0),
            posterior_mean_coef1=betas * torch.sqrt(ab_prev) / (1.0 - ab),
            posterior_mean_coef2=(1.0 - ab_prev) * torch.sqrt(alphas) / (1.0 - ab),
            posterior_log_variance_clipped=torch.log(torch.cat([first, posterior_variance[1:]])),
            fixed_large_log_variance=torch.log(torch.cat([first, betas[1:]])),
        )

    def to(self, device: torch.device) -> ProcessTables:
        """A copy on `device` (float64 tables become float32 on MPS, which lacks float64)."""
        real = torch.float32 if torch.device(device).type == "mps" else torch.float64
        moved = {
            f.name: getattr(self, f.name).to(device=device, dtype=None if f.name == "timesteps" else real)
            for f in fields(self)
        }
        return ProcessTables(**moved)


def working_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half / bfloat16 / float32 inputs, float64 for float64 ones."""
    return torch.promote_types(x.dtype, torch.float32)


def extract(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] for t (N,), in like's dtype, shaped (N, 1, ..., 1) to broadcast against like (N, ...)."""
    return table[t].to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))  # (N, 1, ..., 1)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: (N, ...) -> (N,)."""
    return x.mean(dim=list(range(1, x.ndim)))


def q_sample(tab: ProcessTables, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (DDPM eq. 4): (N, ...) -> (N, ...)."""
    return extract(tab.sqrt_alphas_cumprod, t, x0) * x0 + extract(tab.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def q_posterior(
    tab: ProcessTables, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (N, ...) and clipped log-variance (N, 1, ..., 1) of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7)."""
    mean = extract(tab.posterior_mean_coef1, t, x_t) * x0 + extract(tab.posterior_mean_coef2, t, x_t) * x_t
    return mean, extract(tab.posterior_log_variance_clipped, t, x_t)


def predict_x0_from_eps(tab: ProcessTables, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_0 = x_t / sqrt(alpha_bar_t) - sqrt(1 / alpha_bar_t - 1) eps: (N, ...)."""
    return extract(tab.sqrt_recip_alphas_cumprod, t, x_t) * x_t - extract(tab.sqrt_recipm1_alphas_cumprod, t, x_t) * eps


def predict_eps_from_x0(tab: ProcessTables, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The inverse of predict_x0_from_eps: (N, ...)."""
    recip = extract(tab.sqrt_recip_alphas_cumprod, t, x_t)
    return (recip * x_t - x0) / extract(tab.sqrt_recipm1_alphas_cumprod, t, x_t)


def p_mean_variance(
    tab: ProcessTables,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    learn_sigma: bool = True,
    fixed_variance: str = "large",
    clip_denoised: bool = False,
) -> dict[str, torch.Tensor]:
    """The model's Gaussian p(x_{t-1} | x_t) from its raw output.

    model_output (N, 2C, ...) = [eps, v] with learned sigma, else (N, C, ...) = eps; x_t (N, C, ...);
    t (N,) indexes the tables. With learned sigma, v in [-1, 1] interpolates the log-variance
    between the clipped log posterior variance (v = -1) and log beta_t (v = +1) (Improved DDPM
    eq. 15). Returns "mean", "log_variance" and "pred_x0" (clamped to [-1, 1] if clip_denoised),
    each (N, C, ...) in the working dtype."""
    C = x_t.shape[1]
    dtype = working_dtype(x_t)
    x_t, model_output = x_t.to(dtype), model_output.to(dtype)
    if learn_sigma:
        if model_output.shape != (x_t.shape[0], 2 * C, *x_t.shape[2:]):
            raise UserError(
                f"with learned sigma the model output must have {2 * C} channels (eps and v) for an input of "
                f"shape {tuple(x_t.shape)}, got {tuple(model_output.shape)}"
            )
        eps, v = model_output[:, :C], model_output[:, C:]
        min_log = extract(tab.posterior_log_variance_clipped, t, x_t)
        max_log = extract(tab.log_betas, t, x_t)
        frac = (v + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
    else:
        if model_output.shape != x_t.shape:
            raise UserError(
                f"the model output must have the input's shape {tuple(x_t.shape)}, got {tuple(model_output.shape)}"
            )
        if fixed_variance not in FIXED_VARIANCES:
            raise UserError(f"unknown fixed variance {fixed_variance!r}; choose one of {', '.join(FIXED_VARIANCES)}")
        eps = model_output
        table = tab.fixed_large_log_variance if fixed_variance == "large" else tab.posterior_log_variance_clipped
        log_variance = extract(table, t, x_t).expand_as(x_t)  # (N, C, ...)
    pred_x0 = predict_x0_from_eps(tab, x_t, t, eps)
    if clip_denoised:
        pred_x0 = pred_x0.clamp(-1, 1)
    mean, _ = q_posterior(tab, pred_x0, x_t, t)
    return {"mean": mean, "log_variance": log_variance, "pred_x0": pred_x0}


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats (broadcasting)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """ADM's tanh approximation of the standard normal CDF (within 2e-4 of the exact one)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) in nats, elementwise, of a Gaussian (means, e^log_scales) integrated over the 8-bit
    bin of x in [-1, 1] (the first and last bins extend to -inf and +inf): DDPM section 3.3."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + BIN_WIDTH))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - BIN_WIDTH))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=LOG_FLOOR))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=LOG_FLOOR))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=LOG_FLOOR))
    return torch.where(x < -EDGE, log_cdf_plus, torch.where(x > EDGE, log_one_minus_cdf_min, log_delta))


def vb_terms_bpd(
    tab: ProcessTables, out: dict[str, torch.Tensor], x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """One term of the variational bound in bits per dimension, (N,): KL(q(x_{t-1} | x_t, x_0) ||
    p(x_{t-1} | x_t)) for t > 0 and the decoder's -log p(x_0 | x_1) for t = 0 (Improved DDPM eq. 4-5).
    `out` is p_mean_variance's result for (x_t, t)."""
    true_mean, true_log_variance = q_posterior(tab, x0, x_t, t)
    kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def training_losses(
    tab: ProcessTables,
    model: ModelFn,
    x0: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    learn_sigma: bool = True,
    fixed_variance: str = "large",
) -> dict[str, torch.Tensor]:
    """Per-sample losses at steps t (N,) for data x0 (N, C, ...): "mse" of the predicted noise,
    "vb" (vb_terms_bpd with the predicted mean detached, so it trains only the variance) and
    "loss" = mse + vb with learned sigma, else mse; each (N,), float32 (float64 for float64 x0).

    The model is called once with the original timestep indices; no host-device sync."""
    dtype = working_dtype(x0)
    x0 = x0.to(dtype)
    noise = torch.randn_like(x0) if noise is None else noise.to(dtype)
    if noise.shape != x0.shape:
        raise UserError(f"noise of shape {tuple(noise.shape)} does not match x0 of shape {tuple(x0.shape)}")
    x_t = q_sample(tab, x0, t, noise)
    model_output = model(x_t, tab.timesteps[t], y).to(dtype)  # (N, 2C or C, ...)
    C = x0.shape[1]
    eps = model_output[:, :C]
    if learn_sigma:
        frozen = torch.cat([eps.detach(), model_output[:, C:]], dim=1)  # (N, 2C, ...)
    else:
        frozen = model_output.detach()
    out = p_mean_variance(tab, frozen, x_t, t, learn_sigma=learn_sigma, fixed_variance=fixed_variance)
    mse = mean_flat((noise - eps) ** 2)
    vb = vb_terms_bpd(tab, out, x0, x_t, t)
    return {"loss": mse + vb if learn_sigma else mse, "mse": mse, "vb": vb}
