"""Samplers: single steps against diffusers' schedulers, DPM-Solver++(2M) against diffusers and against
the exact probability-flow ODE solution for Gaussian data, guidance, per-image generators, errors."""

import math

import numpy as np
import pytest
import torch
from helpers import NearlyExact, randomize

import ditlab
from ditlab.diffusion.samplers import ddim_step, ddpm_step

diffusers = pytest.importorskip("diffusers")

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4)


def tiny_dit(num_classes=10, seed=0, **overrides):
    """A tiny DiT with small random weights (the zero init would make every output 0), in eval mode."""
    return randomize(ditlab.DiT(**{**TINY, "num_classes": num_classes, **overrides}).eval(), seed, std=0.05)


class GaussianData:
    """The exact noise predictor for data x_0 ~ N(m_y, s^2) elementwise (m = 0 unconditionally):
    eps = sqrt(1 - ab) (x - sqrt(ab) m) / (ab s^2 + 1 - ab), plus v = tanh(x) / 2 with learned sigma."""

    def __init__(self, s=0.5, num_classes=0, learn_sigma=True):
        self.ab = ditlab.Diffusion().alphas_cumprod
        self.s, self.learn_sigma, self.num_classes = s, learn_sigma, num_classes
        self.null_class = num_classes if num_classes else None
        self.means = torch.linspace(-0.5, 0.5, num_classes + 1, dtype=torch.float64)  # the null class: the last
        self.batches = []

    def __call__(self, x, t, y):
        self.batches.append(x.shape[0])
        ab = self.ab[t].reshape(-1, 1, 1, 1)
        m = 0.0 if y is None else self.means[y].reshape(-1, 1, 1, 1)
        eps = ((1 - ab).sqrt() * (x - ab.sqrt() * m) / (ab * self.s**2 + 1 - ab)).to(x.dtype)
        return torch.cat([eps, 0.5 * x.tanh()], dim=1) if self.learn_sigma else eps


def exact_ode_sample(diffusion, steps, noise, s, m=0.0):
    """Where the probability-flow ODE takes x at the last kept step for Gaussian data, followed by the
    final denoising at the first kept step: the standardised value z is preserved along the ODE."""
    ab = diffusion.respace(steps).alphas_cumprod
    a_T, a_0 = ab[-1].sqrt(), ab[0].sqrt()
    z = (noise.double() - a_T * m) / (a_T**2 * s**2 + 1 - ab[-1]).sqrt()
    return m + a_0 * s**2 * z / (a_0**2 * s**2 + 1 - ab[0]).sqrt()


def seeded(seed, n=None):
    if n is None:
        return torch.Generator().manual_seed(seed)
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


# ---- single steps against diffusers -------------------------------------------------------------


def step_inputs(seed=0):
    """x_t and a learned-sigma model output [eps, v], float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    return x, torch.cat([eps, torch.rand(2, 4, 6, 6, generator=g, dtype=torch.float64) * 2 - 1], 1)


def float64_peer(scheduler):
    """diffusers keeps its tables in float32, which costs ~1e-4 near t = 0 (1 - alpha_bar cancels):
    give it the linear schedule in float64, computed with NumPy, so the comparison can be tight."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    scheduler.betas = torch.from_numpy(betas)
    scheduler.alphas = 1 - scheduler.betas
    scheduler.alphas_cumprod = torch.from_numpy(np.cumprod(1 - betas))
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("steps,indices", [(1000, [999, 500, 1]), (250, [249, 100, 1])])
def test_ddpm_step_against_diffusers(steps, indices, clip):
    process = ditlab.Diffusion().respace(steps)
    peer = float64_peer(diffusers.DDPMScheduler(variance_type="learned_range", clip_sample=clip))
    if steps != 1000:
        peer.set_timesteps(timesteps=process.timesteps.flip(0).tolist())
    x, model_out = step_inputs()
    for i in indices:
        t_orig = int(process.timesteps[i])
        expected = peer.step(model_out, t_orig, x, generator=seeded(i)).prev_sample
        out = process.p_mean_variance(model_out, x, torch.full((2,), i), clip_denoised=clip)
        got = ddpm_step(out, torch.randn(x.shape, generator=seeded(i), dtype=torch.float64))
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10), (i, (got - expected).abs().max())


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_against_diffusers(eta, clip):
    """With clipping, both re-derive eps from the clipped x_0 (ADM's ddim_sample; diffusers'
    use_clipped_model_output)."""
    x, model_out = step_inputs(1)
    noise = torch.randn(x.shape, generator=seeded(3), dtype=torch.float64)
    for process, n_peer, indices in ((ditlab.Diffusion(), 1000, [999, 400, 0]),
                                     (ditlab.Diffusion().respace_to(range(0, 1000, 100)), 10, [9, 5, 0])):  # fmt: skip
        peer = float64_peer(diffusers.DDIMScheduler(clip_sample=clip))  # "leading" spacing: 900, 800, ..., 0
        peer.set_timesteps(n_peer)
        tab = process.tables_on("cpu")
        for i in indices:
            expected = peer.step(model_out[:, :4], int(process.timesteps[i]), x, eta=eta, variance_noise=noise,
                                 use_clipped_model_output=clip)  # fmt: skip
            t = torch.full((2,), i)
            got = ddim_step(tab, process.p_mean_variance(model_out, x, t, clip_denoised=clip), x, t, eta, noise)
            assert torch.allclose(got, expected.prev_sample, rtol=1e-10, atol=1e-10), (i, eta)


def test_dpm_solver_against_diffusers():
    """The 20-step trajectory against DPMSolverMultistepScheduler on the same timesteps: the states
    the model sees agree up to t_1; our step t_1 -> t_0 is first order (DDIM), and the result is the
    x_0 prediction at t_0."""
    d = ditlab.Diffusion(learn_sigma=False)
    noise = torch.randn(2, 4, 6, 6, generator=seeded(4))
    ours, theirs = GaussianData(learn_sigma=False), GaussianData(learn_sigma=False)
    seen_ours, seen_theirs = [], []

    def record(model, seen):
        return lambda x, t, y: seen.append(x) or model(x, t, y)

    result = d.sample(record(ours, seen_ours), noise, steps=20, sampler="dpm++2m")
    process = d.respace(20)
    peer = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                 final_sigmas_type="zero")  # fmt: skip
    peer.set_timesteps(timesteps=process.timesteps.flip(0).tolist())
    x = noise
    for t in peer.timesteps:
        x = peer.step(record(theirs, seen_theirs)(x, t.repeat(2), None), t, x).prev_sample
    assert len(seen_ours) == len(seen_theirs) == 20
    for mine, peers in zip(seen_ours[:-1], seen_theirs[:-1]):  # the states at t_19, ..., t_1
        assert torch.allclose(mine, peers, rtol=1e-4, atol=1e-4), (mine - peers).abs().max()
    tab, t1, t0 = process.tables_on("cpu"), torch.full((2,), 1), torch.full((2,), 0)
    at_t1 = process.p_mean_variance(ours(seen_ours[-2], process.timesteps[t1], None), seen_ours[-2], t1)
    assert torch.allclose(seen_ours[-1], ddim_step(tab, at_t1, seen_ours[-2], t1), rtol=1e-5, atol=1e-5)
    at_t0 = process.p_mean_variance(ours(seen_ours[-1], process.timesteps[t0], None), seen_ours[-1], t0)
    assert torch.equal(result, at_t0["pred_x0"])


def test_solvers_against_the_exact_ode_solution():
    d = ditlab.Diffusion()
    model = GaussianData(s=0.5)
    noise = torch.randn(4, 4, 8, 8, generator=seeded(5))

    def rms_error(steps, sampler):
        x = d.sample(model, noise, steps=steps, sampler=sampler)
        return (x.double() - exact_ode_sample(d, steps, noise, 0.5)).pow(2).mean().sqrt().item()

    err = {(n, s): rms_error(n, s) for n in (20, 25, 250) for s in ("ddim", "dpm++2m")}
    # measured: ddim 0.067, 0.054, 0.0054; dpm++2m 0.023, 0.011, 0.0003 (data std 0.5)
    assert err[20, "dpm++2m"] < err[20, "ddim"] / 2.5
    assert err[25, "dpm++2m"] < err[25, "ddim"] / 4 and err[25, "dpm++2m"] < 0.015
    assert err[250, "dpm++2m"] < err[250, "ddim"] / 10  # second order against first


def test_ddpm_reaches_the_data_distribution():
    d = ditlab.Diffusion()
    model = GaussianData(s=0.5, num_classes=3)
    y = torch.full((64,), 2)
    x = d.sample(model, torch.randn(64, 4, 8, 8, generator=seeded(6)), y=y, steps=50, generator=seeded(7))
    assert abs(x.mean().item() - model.means[2].item()) < 0.02  # 16384 draws of N(m, 0.25)
    assert abs(x.std().item() - 0.5) < 0.02


# ---- guidance -----------------------------------------------------------------------------------


def reference_cfg(model, cfg_scale, channels):
    """DiT's forward_with_cfg written out: a 2N state whose first half is conditional, guidance on the
    first `channels` output channels, the remaining channels taken from each half."""

    def forward(x, t, y):
        half = x[: len(x) // 2]
        out = model(torch.cat([half, half]), t, y)
        eps, rest = out[:, :channels], out[:, channels:]
        cond, uncond = eps.chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)

    return forward


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
@pytest.mark.parametrize("channels", [3, None])
def test_guidance_equals_the_doubled_state_of_the_reference(sampler, channels):
    model = tiny_dit()
    d = ditlab.Diffusion()
    noise = torch.randn(3, 4, 8, 8, generator=seeded(8))
    y = torch.tensor([1, 5, 9])
    kw = dict(steps=6, sampler=sampler, eta=0.7 if sampler == "ddim" else 0.0)
    ours = d.sample(model, noise, y=y, cfg_scale=4.0, guidance_channels=channels, generator=seeded(10, 3), **kw)
    ref_model = reference_cfg(model, 4.0, channels or 4)
    y2 = torch.cat([y, torch.full_like(y, model.null_class)])
    doubled = d.sample(ref_model, torch.cat([noise, noise]), y=y2, generator=seeded(10, 3) + seeded(50, 3), **kw)
    assert torch.allclose(ours, doubled[:3], rtol=1e-5, atol=1e-5)
    plain = d.sample(model, noise, y=y, generator=seeded(10, 3), **kw)
    assert not torch.allclose(ours, plain, atol=1e-3)  # guidance changed something


def test_guidance_channels_three_leaves_the_fourth_unguided():
    model = GaussianData(num_classes=3)
    d = ditlab.Diffusion()
    noise = torch.randn(2, 4, 4, 4, generator=seeded(9))
    y = torch.tensor([0, 2])
    three = d.sample(model, noise, y=y, steps=10, sampler="ddim", cfg_scale=3.0, guidance_channels=3)
    every = d.sample(model, noise, y=y, steps=10, sampler="ddim", cfg_scale=3.0)
    plain = d.sample(model, noise, y=y, steps=10, sampler="ddim")
    assert torch.equal(three[:, :3], every[:, :3]) and torch.equal(three[:, 3], plain[:, 3])
    assert not torch.allclose(every[:, 3], plain[:, 3], atol=1e-3)


def test_cfg_scale_one_is_the_conditional_model():
    model = GaussianData(num_classes=3)
    d = ditlab.Diffusion()
    noise, y = torch.randn(2, 4, 4, 4, generator=seeded(11)), torch.tensor([0, 1])
    x = d.sample(model, noise, y=y, steps=10, cfg_scale=1.0, generator=seeded(12))
    assert set(model.batches) == {2}  # never doubled
    conditional = d.sample(lambda x, t, y: model(x, t, y), noise, y=y, steps=10, generator=seeded(12))
    assert torch.equal(x, conditional)
    almost = d.sample(model, noise, y=y, steps=10, cfg_scale=1.0 + 1e-9, generator=seeded(12))
    assert 4 in model.batches and torch.allclose(almost, x, atol=1e-5)  # the guided formula at s = 1


# ---- generators, determinism, unconditional models, clipping ----------------------------------


def test_ddpm_reproducible_with_a_seed_and_different_across_seeds():
    model, d = tiny_dit(), ditlab.Diffusion()
    noise, y = torch.randn(2, 4, 8, 8, generator=seeded(13)), torch.tensor([3, 4])
    a = d.sample(model, noise, y=y, steps=10, generator=seeded(0))
    b = d.sample(model, noise, y=y, steps=10, generator=seeded(0))
    c = d.sample(model, noise, y=y, steps=10, generator=seeded(1))
    assert torch.equal(a, b) and not torch.allclose(a, c, atol=1e-3)


@pytest.mark.parametrize("sampler,cfg_scale", [("ddpm", 1.0), ("ddpm", 4.0), ("ddim", 1.5)])
def test_per_image_generators_make_images_independent_of_the_batch(sampler, cfg_scale):
    """To rounding relative to the samples' scale: the network's rows may round differently in
    other batch sizes on some BLAS builds (the step noise itself is bitwise: see test_sample.py)."""
    model, d = NearlyExact(tiny_dit()), ditlab.Diffusion()
    noise, y = torch.randn(3, 4, 8, 8, generator=seeded(14)), torch.tensor([0, 4, 7])
    kw = dict(steps=6, sampler=sampler, cfg_scale=cfg_scale, eta=1.0 if sampler == "ddim" else 0.0)
    together = d.sample(model, noise, y=y, generator=seeded(100, 3), **kw)
    scale = together.abs().max().item()
    assert 0.5 < scale < 10  # O(1) samples, so that the tolerance means something
    for i in range(3):
        alone = d.sample(model, noise[i : i + 1], y=y[i : i + 1], generator=[seeded(100 + i)], **kw)
        assert (together[i : i + 1] - alone).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
def test_unconditional_model(sampler):
    model, d = tiny_dit(num_classes=0), ditlab.Diffusion()
    x = d.sample(model, torch.randn(2, 4, 8, 8, generator=seeded(15)), steps=5, sampler=sampler)
    assert x.shape == (2, 4, 8, 8) and x.isfinite().all()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
def test_clip_denoised_keeps_pixels_in_range(sampler):
    model, d = GaussianData(s=2.0), ditlab.Diffusion()
    noise = torch.randn(2, 4, 8, 8, generator=seeded(16))
    x = d.sample(model, noise, steps=10, sampler=sampler, clip_denoised=True, generator=seeded(1))
    assert x.abs().max() <= 1 and d.sample(model, noise, steps=10, sampler=sampler).abs().max() > 1


def test_progress_bar(capsys):
    model, d = GaussianData(), ditlab.Diffusion()
    noise = torch.randn(1, 4, 4, 4, generator=seeded(17))
    x = d.sample(model, noise, steps=3, sampler="ddim", progress=True)
    assert "sampling" in capsys.readouterr().err and torch.equal(x, d.sample(model, noise, steps=3, sampler="ddim"))


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    (dict(steps=1001), "between 1 and the process length 1000, got 1001"),
    (dict(sampler="euler"), "unknown sampler 'euler'; choose one of ddpm, ddim, dpm\\+\\+2m"),
    (dict(y=None), "class-conditional \\(10 classes\\): pass labels y"),
    (dict(y=None, cfg_scale=4.0), "class-conditional"),
    (dict(eta=0.5), "only meaningful for sampler 'ddim'"),
    (dict(cfg_scale=4.0, guidance_channels=5), "guidance_channels must be between 1 and 4"),
    (dict(y=torch.tensor([1, 2, 3])), "y must have shape \\(2,\\)"),
    (dict(generator=[torch.Generator()]), "got 1 generators for a batch of 2"),
])  # fmt: skip
def test_bad_input_one_line_errors(kwargs, message):
    kwargs = {"y": torch.tensor([1, 2]), **kwargs}
    with pytest.raises(ValueError, match=message) as err:
        ditlab.Diffusion().sample(tiny_dit(), torch.randn(2, 4, 8, 8), **kwargs)
    assert "\n" not in str(err.value)


def test_guidance_needs_labels_and_a_null_class():
    d, noise = ditlab.Diffusion(), torch.randn(2, 4, 4, 4)
    with pytest.raises(ValueError, match="needs class labels y"):
        d.sample(GaussianData(num_classes=0), noise, cfg_scale=2.0)
    no_null = tiny_dit(class_dropout_prob=0.0)
    assert no_null.null_class is None
    with pytest.raises(ValueError, match="needs a model with a null class"):
        d.sample(no_null, torch.randn(2, 4, 8, 8), y=torch.tensor([1, 2]), cfg_scale=2.0)


@pytest.mark.gpu
def test_cuda_sampling_matches_cpu_with_cpu_generators():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, d = tiny_dit(), ditlab.Diffusion()
    noise, y = torch.randn(2, 4, 8, 8, generator=seeded(18)), torch.tensor([1, 2])
    cpu = d.sample(model, noise, y=y, steps=10, cfg_scale=2.0, generator=seeded(0, 2))
    gpu = d.sample(model.cuda(), noise.cuda(), y=y.cuda(), steps=10, cfg_scale=2.0, generator=seeded(0, 2))
    assert math.isclose((gpu.cpu() - cpu).abs().max().item(), 0.0, abs_tol=1e-3)
