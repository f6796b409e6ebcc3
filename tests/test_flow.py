"""Flow matching beyond the golden values: the samplers against the exact flow of Gaussian data (ODE
end points, SDE marginals), training-time sampling, the time shift, per-image generators, the learned
sigma half, the record, and one-line errors."""

import importlib.util
import json
import math

import pytest
import torch
from helpers import randomize

import ditlab
from ditlab.diffusion import flow, flow_samplers
from ditlab.diffusion.samplers import Guidance
from ditlab.errors import UserError

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)


def assert_close(actual, expected, tol=1e-6):
    """Elementwise within tol of the expected scale (torch.testing's version imports torch.distributed)."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= tol * max(expected.abs().max().item(), 1.0)


def seeded(seed, n=None):
    if n is None:
        return torch.Generator().manual_seed(seed)
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


class GaussianVelocity:
    """The exact velocity (and nothing else) for data x_1 ~ N(m, s^2) elementwise on `path`: with
    x_t = a x_1 + b x_0, mean a m and variance V = a^2 s^2 + b^2, v = a' m + (a a' s^2 + b b') / V (x - a m).
    Its ODE maps the noise z to m + s z exactly. Optionally 2C outputs (the second half garbage)."""

    def __init__(self, path, m=0.7, s=0.5, learn_sigma=False):
        self.path, self.m, self.s, self.learn_sigma = path, m, s, learn_sigma

    def __call__(self, x, t, y):
        c = flow.coefficients(self.path, flow.expand(t.double(), x))
        var = c.alpha**2 * self.s**2 + c.sigma**2
        v = c.d_alpha * self.m + (c.alpha * c.d_alpha * self.s**2 + c.sigma * c.d_sigma) / var * (x - c.alpha * self.m)
        v = v.to(x.dtype)
        return torch.cat([v, torch.full_like(v, 1e3)], dim=1) if self.learn_sigma else v


@pytest.mark.parametrize("path", flow.PATHS)
def test_ode_samplers_reach_the_exact_flow_of_gaussian_data(path):
    model = GaussianVelocity(path, learn_sigma=True)
    z = torch.randn(3, 2, 4, 4, generator=seeded(0), dtype=torch.float64)
    exact = model.m + model.s * z
    fm = ditlab.FlowMatching(path, atol=1e-9, rtol=1e-8)
    errors = {s: (fm.sample(model, z, steps=40, sampler=s) - exact).abs().max().item() for s in ("euler", "heun")}
    assert errors["heun"] < 1e-3 < errors["euler"] < 0.1  # first against second order
    if importlib.util.find_spec("torchdiffeq"):
        assert (fm.sample(model, z, sampler="dopri5") - exact).abs().max().item() < 1e-6


@pytest.mark.parametrize("path, sampler, form, last_step", [
    ("linear", "sde-euler", "sigma", "mean"), ("gvp", "sde-heun", "linear", "tweedie"),
    ("linear", "sde-euler", "constant", "euler"), ("gvp", "sde-euler", "sbdm", "mean"),
    ("linear", "sde-euler", "increasing-decreasing", "none"),
])  # fmt: skip
def test_sde_samplers_reach_the_data_distribution(path, sampler, form, last_step):
    """The SDE's marginals are the ODE's: the samples have the data's mean and standard deviation (within
    5 standard errors of 8192 draws, plus the discretisation's bias). sbdm needs sample_eps > 0."""
    model = GaussianVelocity(path)
    eps = 1e-3 if form == "sbdm" else None
    fm = ditlab.FlowMatching(path, diffusion_form=form, last_step=last_step, sample_eps=eps)
    z = torch.randn(8192, 1, 1, 1, generator=seeded(1), dtype=torch.float64)
    x = fm.sample(model, z, steps=100, sampler=sampler, generator=seeded(2))
    n = x.numel()
    assert abs(x.mean().item() - model.m) < 5 * model.s / math.sqrt(n) + 0.01
    assert abs(x.std().item() - model.s) < 5 * model.s / math.sqrt(2 * n) + 0.01
    assert (x - (model.m + model.s * z)).abs().mean() > 0.05  # the noise moved it: not the ODE


def test_sde_with_zero_diffusion_is_the_euler_ode():
    model = GaussianVelocity("linear")
    z = torch.randn(2, 1, 2, 2, generator=seeded(3), dtype=torch.float64)
    sde = ditlab.FlowMatching(diffusion_form="constant", diffusion_norm=0.0, last_step="euler", last_step_size=0.1)
    ode = ditlab.FlowMatching()
    grid = flow_samplers.time_grid(0.0, 0.9, 9) + [1.0]  # the SDE's 9 steps to 0.9, then the last step of 0.1
    expected = flow_samplers.euler_ode(flow_matching_fields(ode, model, z), z, grid)
    assert_close(sde.sample(model, z, steps=9, sampler="sde-euler", generator=seeded(4)), expected)


def flow_matching_fields(fm, model, x):
    from ditlab.diffusion.flow_matching import _ModelFields

    return _ModelFields(lambda x, t, guided: model(x, t, None), Guidance(), fm.path, fm.prediction, x.shape[1])


def test_time_shift_moves_the_grid_toward_the_noise():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    s = 3.0
    sd3 = s * (1 - t) / (1 + (s - 1) * (1 - t))  # SD3's shifted noise level of 1 - t
    assert_close(flow.shift_time(t, s), 1 - sd3)
    grid = flow_samplers.time_grid(0.0, 0.96, 10, shift=s)
    assert grid[0] == 0.0 and grid[-1] == pytest.approx(0.96) and all(b > a for a, b in zip(grid, grid[1:]))
    assert grid[5] < 0.48  # more of the grid at high noise
    assert flow_samplers.time_grid(0.0, 1.0, 4) == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    # Euler on the shifted grid integrates v = 2t as sum(dt_i 2 t_i)
    model = lambda x, t, y: (2 * flow.expand(t, x)).expand_as(x)  # noqa: E731
    z = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    shifted = 1 - s * (1 - torch.linspace(0, 1, 5, dtype=torch.float64)) / (1 + (s - 1) * (1 - torch.linspace(0, 1, 5)))
    expected = (2 * shifted[:-1] * shifted.diff()).sum()
    got = ditlab.FlowMatching(time_shift=s).sample(model, z, steps=4, sampler="euler")
    assert_close(got.flatten()[0], expected)


def test_training_time_sampling():
    uniform = ditlab.FlowMatching().sample_timesteps(4096, generator=seeded(5))
    assert uniform.dtype == torch.float32 and 0 <= uniform.min() < 0.01 and 0.99 < uniform.max() < 1
    noise_pred = ditlab.FlowMatching(prediction="noise").sample_timesteps(4096, generator=seeded(5))
    assert_close(noise_pred, uniform * (1 - 2e-3) + 1e-3)  # SiT's [eps, 1 - eps]
    assert ditlab.FlowMatching(prediction="noise", train_eps=0.1).sample_timesteps(512).min() >= 0.1
    ln = ditlab.FlowMatching(time_sampling="logit-normal", time_location=0.5, time_scale=0.8)
    t = ln.sample_timesteps(4096, generator=seeded(6))
    assert_close(t, torch.sigmoid(0.5 + 0.8 * torch.randn(4096, generator=seeded(6))))
    assert abs(t.median().item() - torch.sigmoid(torch.tensor(0.5)).item()) < 0.02


def test_training_loss_is_zero_for_the_conditional_velocity():
    """A model that knows x_0 and x_1 predicts u_t exactly: loss 0; the learned-sigma half is ignored."""
    x0, x1 = torch.randn(2, 2, 3, 2, 2, generator=seeded(7)).unbind(0)
    t = torch.tensor([0.2, 0.9])
    for path in flow.PATHS:
        u = flow.interpolant(path, t, x0, x1)[1]
        model = lambda x, t, y, u=u: torch.cat([u, torch.full_like(u, 5.0)], dim=1)  # noqa: E731
        fm = ditlab.FlowMatching(path)
        assert fm.training_losses(model, x1, t, noise=x0)["loss"].abs().max() < 1e-6
        shifted = lambda x, t, y, u=u: u + 1.0  # noqa: E731
        assert_close(fm.training_losses(shifted, x1, t, noise=x0)["loss"], torch.ones(2))


def tiny_model(seed=0):
    return randomize(ditlab.DiT(**TINY).eval(), seed, std=0.1)


@pytest.mark.parametrize("sampler, cfg_scale", [("sde-euler", 1.0), ("sde-heun", 3.0)])
def test_per_image_generators_make_images_independent_of_the_batch(sampler, cfg_scale):
    model = tiny_model()
    fm = ditlab.FlowMatching()
    noise, y = torch.randn(3, 4, 8, 8, generator=seeded(8)), torch.tensor([0, 4, 7])
    kw = dict(steps=5, sampler=sampler, cfg_scale=cfg_scale)
    together = fm.sample(model, noise, y=y, generator=seeded(100, 3), **kw)
    scale = together.abs().max().item()
    assert 0.5 < scale < 20
    for i in range(3):
        alone = fm.sample(model, noise[i : i + 1], y=y[i : i + 1], generator=[seeded(100 + i)], **kw)
        assert (together[i : i + 1] - alone).abs().max().item() <= 1e-5 * scale
    again = fm.sample(model, noise, y=y, generator=seeded(100, 3), **kw)
    other = fm.sample(model, noise, y=y, generator=seeded(200, 3), **kw)
    assert torch.equal(together, again) and (together - other).abs().max() > 1e-2


def test_guidance_scale_one_is_the_conditional_model_and_all_channels_differ_from_three():
    model = tiny_model(1)
    fm, noise, y = ditlab.FlowMatching(), torch.randn(2, 4, 8, 8, generator=seeded(9)), torch.tensor([1, 2])
    plain = fm.sample(model, noise, y=y, steps=4)
    assert torch.equal(fm.sample(lambda x, t, y: model(x, t, y), noise, y=y, steps=4), plain)
    three = fm.sample(model, noise, y=y, steps=4, cfg_scale=4.0, guidance_channels=3)
    four = fm.sample(model, noise, y=y, steps=4, cfg_scale=4.0)
    assert (three - plain).abs().max() > 1e-3 and (four - three)[:, :3].abs().max() > 1e-3
    as_value = fm.generate(model, noise, y, steps=4, sampler="euler", guidance=Guidance(scale=4.0, channels=3))
    assert torch.equal(as_value, three)  # the guidance's null class defaults to the model's
    clipped = fm.generate(model, noise, y, steps=4, sampler="euler", guidance=Guidance(), clip_denoised=True)
    assert plain.abs().max() > 1 and torch.equal(clipped, plain.clamp(-1, 1))


def test_record_round_trip():
    fm = ditlab.FlowMatching("gvp", prediction="noise", loss_weight="likelihood", time_sampling="logit-normal",
                             time_location=-0.3, time_shift=2.0, diffusion_form="sbdm",
                             last_step="tweedie")  # fmt: skip
    record = json.loads(json.dumps(fm.to_record()))
    assert record["objective"] == "flow" and record["path"] == "gvp" and record["time_shift"] == 2.0
    back = ditlab.FlowMatching.from_record(record)
    assert back.to_record() == fm.to_record() and back.config == fm.config
    assert ditlab.FlowMatching.from_record({"objective": "flow"}).config == ditlab.FlowMatching().config
    assert fm.objective == "flow" and fm.sampler_names[0] == "euler" and fm.default_steps == 250
    assert "gvp" in repr(fm) and fm.diffusion_form == "sbdm"
    with pytest.raises(UserError, match="objective 'ddpm', not 'flow'"):
        ditlab.FlowMatching.from_record({"objective": "ddpm"})
    run_config = {"objective": "flow", "path": "gvp", "lr": 1e-4, "global_batch_size": 256}  # a run's config
    assert ditlab.FlowMatching.from_record(run_config).config == ditlab.FlowMatching("gvp").config
    with pytest.raises(UserError, match="unknown path 'vp'"):
        ditlab.FlowMatching.from_record({"objective": "flow", "path": "vp"})


@pytest.mark.parametrize("settings, message", [
    (dict(path="vp"), "unknown path 'vp'; choose one of linear, gvp"),
    (dict(prediction="eps"), "unknown prediction 'eps'"),
    (dict(diffusion_form="SBDM"), "unknown diffusion_form 'SBDM'; choose one of sigma, sbdm"),
    (dict(last_step="Mean"), "unknown last_step 'Mean'"),
    (dict(time_sampling="lognorm"), "unknown time_sampling 'lognorm'"),
    (dict(time_scale=0.0), "time_scale must be > 0"),
    (dict(time_shift=-1.0), "time_shift must be > 0"),
    (dict(train_eps=0.7), "train_eps must be in \\[0, 0.5\\)"),
    (dict(last_step_size=1.5), "last_step_size must be in \\[0, 1\\)"),
])  # fmt: skip
def test_bad_settings_one_line_errors(settings, message):
    with pytest.raises(UserError, match=message) as err:
        ditlab.FlowMatching(**settings)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sampler="ddpm"), "unknown flow sampler 'ddpm'; choose one of euler, heun, sde-euler, sde-heun, dopri5"),
    (dict(steps=0), "steps must be an integer >= 1, got 0"),
    (dict(y=None), "class-conditional \\(10 classes\\): pass labels y"),
    (dict(y=torch.tensor([1, 2, 3])), "y must have shape \\(2,\\)"),
    (dict(cfg_scale=4.0, guidance_channels=5), "guidance_channels must be between 1 and 4"),
    (dict(sampler="sde-euler", generator=[torch.Generator()]), "got 1 generators for a batch of 2"),
])  # fmt: skip
def test_bad_input_one_line_errors(kwargs, message):
    kwargs = {"y": torch.tensor([1, 2]), "steps": 2, **kwargs}
    with pytest.raises(UserError, match=message) as err:
        ditlab.FlowMatching().sample(tiny_model(), torch.randn(2, 4, 8, 8), **kwargs)
    assert "\n" not in str(err.value)


def test_singular_sde_settings_are_refused_and_dopri5_without_torchdiffeq_says_how(monkeypatch):
    model, noise, y = tiny_model(), torch.randn(1, 4, 8, 8), torch.tensor([3])
    with pytest.raises(UserError, match="'sbdm' is infinite at t = 0.*sample_eps > 0"):
        ditlab.FlowMatching(diffusion_form="sbdm").sample(model, noise, y=y, steps=2, sampler="sde-euler")
    with pytest.raises(UserError, match="'sde-heun' with last step 'none' ends on t = 1"):
        ditlab.FlowMatching(last_step="none").sample(model, noise, y=y, steps=2, sampler="sde-heun")
    monkeypatch.setitem(__import__("sys").modules, "torchdiffeq", None)
    with pytest.raises(UserError, match="sampler 'dopri5' needs torchdiffeq"):
        ditlab.FlowMatching().sample(model, noise, y=y, sampler="dopri5")


def test_progress_bar(capsys):
    model, noise = GaussianVelocity("linear"), torch.randn(1, 1, 2, 2, generator=seeded(10))
    x = ditlab.FlowMatching().sample(model, noise, steps=3, sampler="sde-heun", generator=seeded(1), progress=True)
    assert "sampling" in capsys.readouterr().err
    assert torch.equal(x, ditlab.FlowMatching().sample(model, noise, steps=3, sampler="sde-heun", generator=seeded(1)))


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["sde-heun", "heun"])
def test_cuda_sampling_matches_cpu_with_cpu_generators(sampler):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, fm = tiny_model(), ditlab.FlowMatching(last_step="tweedie")
    noise, y = torch.randn(2, 4, 8, 8, generator=seeded(18)), torch.tensor([1, 2])
    cpu = fm.sample(model, noise, y=y, steps=10, sampler=sampler, cfg_scale=2.0, generator=seeded(0, 2))
    gpu = fm.sample(model.cuda(), noise.cuda(), y=y.cuda(), steps=10, sampler=sampler, cfg_scale=2.0,
                    generator=seeded(0, 2))  # fmt: skip
    assert gpu.device.type == "cuda" and (gpu.cpu() - cpu).abs().max().item() <= 1e-3 * cpu.abs().max().item()
