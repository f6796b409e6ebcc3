"""The Gaussian process: schedules, respacing, q_sample, the posterior, p_mean_variance, the KL and
decoder terms and the training losses, each against an independent closed form or torch.distributions."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

import ditlab
from ditlab.diffusion import gaussian
from ditlab.diffusion.schedule import cosine_betas, linear_betas, spaced_timesteps

COMMON_STEPS = (10, 20, 25, 50, 100, 250, 500, 1000)


def numpy_alphas_cumprod(T=1000):
    """The linear schedule of Ho et al. written with NumPy."""
    scale = 1000 / T
    return np.cumprod(1 - np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64))


def adm_space_timesteps(T, section_counts):
    """ADM's space_timesteps (guided-diffusion respace.py), written out independently: the process
    split into len(counts) sections (the first T % k one longer), a float stride accumulated in each
    and every partial sum rounded with Python's round; "ddimN" is range(0, T, s) for the first s."""
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        want = int(section_counts[4:])
        return next(set(range(0, T, s)) for s in range(1, T) if len(range(0, T, s)) == want)
    counts = [int(c) for c in section_counts.split(",")] if isinstance(section_counts, str) else section_counts
    size_per, extra, start, taken = T // len(counts), T % len(counts), 0, set()
    for i, count in enumerate(counts):
        size = size_per + (i < extra)
        stride, cur = (size - 1) / (count - 1) if count > 1 else 1, 0.0
        for _ in range(count):
            taken.add(start + round(cur))
            cur += stride
        start += size
    return taken


# ---- schedules and respacing -----------------------------------------------------------------


def test_linear_schedule():
    b = linear_betas(1000)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4, rel=1e-12) and b[-1].item() == pytest.approx(0.02, rel=1e-12)
    b = linear_betas(250)  # scaled by 1000 / T
    assert b[0].item() == pytest.approx(4e-4, rel=1e-12) and b[-1].item() == pytest.approx(0.08, rel=1e-12)
    d = ditlab.Diffusion()
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), numpy_alphas_cumprod(), rtol=1e-12)


def test_cosine_schedule():
    T, s = 1000, 0.008
    b = cosine_betas(T)
    assert b.dtype == torch.float64 and (b > 0).all() and b.max() <= 0.999
    f = np.cos((np.arange(1, T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
    ab = np.cumprod(1 - b.numpy())
    # alpha_bar_t = f(t) / f(0) wherever beta was not clipped at 0.999 (only the very last steps)
    np.testing.assert_allclose(ab[:-2], (f / np.cos(s / (1 + s) * np.pi / 2) ** 2)[:-2], rtol=1e-9)
    assert ditlab.Diffusion(schedule="cosine").betas.equal(b)


def test_respaced_timesteps_are_adms_for_every_step_count():
    """Every n of 1..1000 keeps exactly the steps ADM's float-stride accumulation keeps (a closed
    round(i * 999 / (n - 1)) differs for 283 of them, 21, 23, 27, ... and 999, at ties)."""
    base = ditlab.Diffusion()
    closed_form_differs = 0
    for n in range(1, 1001):
        spaced = base.respace(n)
        assert spaced.timesteps.tolist() == sorted(adm_space_timesteps(1000, [n])), n
        assert spaced.num_timesteps == n and spaced.timesteps.dtype == torch.long
        if n > 1:
            closed_form_differs += spaced.timesteps.tolist() != [round(Fraction(i * 999, n - 1)) for i in range(n)]
    assert closed_form_differs == 283
    assert base.respace(21).timesteps[10] == 499 and base.respace(1).timesteps.tolist() == [0]


@pytest.mark.parametrize("T,spacing", [(1000, "10,15,20"), (1000, "1,1,1"), (1000, "3,500"), (1000, [7, 9]),
                                       (1000, "ddim50"), (1000, "ddim7"), (1000, "ddim1000"), (1000, "250"),
                                       (250, "10,15,20"), (250, "4,4,4,4,4,4,4"), (250, "ddim25"), (999, "2,2")])
def test_respacing_in_adms_section_and_ddim_forms(T, spacing):
    spaced = ditlab.Diffusion(num_timesteps=T).respace(spacing)
    assert spaced.timesteps.tolist() == sorted(adm_space_timesteps(T, spacing))


def test_one_step_process_and_sampling():
    d = ditlab.Diffusion().respace(1)
    assert d.timesteps.tolist() == [0] and d.betas.tolist() == pytest.approx([1e-4], rel=1e-12)
    assert torch.isfinite(d.tables.posterior_log_variance_clipped).all()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    out = torch.cat([x, torch.zeros_like(x)], 1)  # eps = x_T, v = 0
    x0 = ditlab.Diffusion().sample(lambda x, t, y: out.to(x.dtype), x, steps=1, sampler="ddim")
    ab = 1 - 1e-4  # one DDIM step from t = 0 lands on the x_0 prediction
    assert torch.allclose(x0, (x - math.sqrt(1 - ab) * x) / math.sqrt(ab), rtol=1e-12)


@pytest.mark.parametrize("n", [10, 250])
def test_respace_keeps_marginals_and_recomputes_betas(n):
    base = ditlab.Diffusion()
    spaced = base.respace(n)
    kept = spaced.timesteps
    ab = numpy_alphas_cumprod()[kept.numpy()]
    np.testing.assert_allclose(spaced.alphas_cumprod.numpy(), ab, rtol=1e-12)
    expected_betas = 1 - ab / np.concatenate([[1.0], ab[:-1]])
    np.testing.assert_allclose(spaced.betas.numpy(), expected_betas, rtol=1e-10)
    assert base.respace(n) is spaced  # cached
    assert base.respace(1000) is base and base.respace("ddim1000") is base and base.timesteps.equal(torch.arange(1000))
    twice = base.respace(250).respace(n)  # respacing a respaced process keeps original indices
    assert twice.timesteps.equal(base.respace(250).timesteps[spaced_timesteps(250, n)])


def test_respace_to_and_errors():
    d = ditlab.Diffusion().respace_to([0, 100, 900])
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), numpy_alphas_cumprod()[[0, 100, 900]], rtol=1e-12)
    assert ditlab.Diffusion().respace_to([5]).timesteps.tolist() == [5]
    for bad in ([], [3, 3, 9], [0, 1000], [-1, 4]):
        with pytest.raises(ValueError, match="strictly ascending"):
            ditlab.Diffusion().respace_to(bad)
    for n in (0, -3, 1001, "500,501", [0, 5]):
        with pytest.raises(ValueError, match="between 1 and the process length 1000"):
            ditlab.Diffusion().respace(n)
    with pytest.raises(ValueError, match="section 0 has 333 steps, fewer than 334"):
        ditlab.Diffusion(num_timesteps=999).respace("334,1,1")
    for bad in ("ddim600", "ten", "ddimx", "10,,5"):
        with pytest.raises(ValueError, match=f"spacing {bad!r}"):
            ditlab.Diffusion().respace(bad)
    with pytest.raises(ValueError, match="unknown noise schedule 'quad'"):
        ditlab.Diffusion(schedule="quad")
    with pytest.raises(ValueError, match="unknown fixed variance"):
        ditlab.Diffusion(learn_sigma=False, fixed_variance="medium")


# ---- the forward process and the posterior ------------------------------------------------------


def test_q_sample_closed_form_and_moments():
    d = ditlab.Diffusion()
    ab = numpy_alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 10, 500, 999])
    x0 = torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=torch.float64).reshape(4, 1, 1, 1).expand(4, 1, 200, 200)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    xt = d.q_sample(x0, t, noise)
    a, s = np.sqrt(ab[t])[:, None, None, None], np.sqrt(1 - ab[t])[:, None, None, None]
    expected = a * x0.numpy() + s * noise.numpy()
    np.testing.assert_allclose(xt.numpy(), expected, rtol=1e-12, atol=1e-12)
    drawn = d.q_sample(x0, t).reshape(4, -1)  # its own noise: check the moments (40000 draws each)
    mean, var = drawn.mean(1).numpy(), drawn.var(1).numpy()
    assert (np.abs(mean - np.sqrt(ab[t]) * x0[:, 0, 0, 0].numpy()) < 5 * np.sqrt((1 - ab[t]) / 4e4)).all()  # 5 s.e.
    assert (np.abs(var / (1 - ab[t]) - 1) < 5 * np.sqrt(2 / 4e4)).all()


@pytest.mark.parametrize("steps", [1000, 10])
def test_posterior_against_bayes_rule(steps):
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0): product of two Gaussians in x_{t-1}."""
    d = ditlab.Diffusion().respace(steps)
    ab = d.alphas_cumprod.numpy()
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    alpha = ab / ab_prev
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([1, 2, steps // 2, steps - 1])
    x0 = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    xt = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    a, ap = alpha[t][:, None, None, None], ab_prev[t][:, None, None, None]
    precision = a / (1 - a) + 1 / (1 - ap)  # (1 - a) is beta_t
    mean = (np.sqrt(a) / (1 - a) * xt.numpy() + np.sqrt(ap) / (1 - ap) * x0.numpy()) / precision
    got_mean, got_log_var = d.q_posterior(x0, xt, t)
    np.testing.assert_allclose(got_mean.numpy(), mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got_log_var.numpy().reshape(4), np.log(1 / precision).reshape(4), rtol=1e-9)
    # at t = 0 the variance is 0 and its log is clipped to that of t = 1
    _, log_var0 = d.q_posterior(x0[:1], xt[:1], torch.tensor([0]))
    assert log_var0.item() == pytest.approx(np.log((1 - alpha[1]) * (1 - ab[0]) / (1 - ab[1])), rel=1e-9)


def test_p_mean_variance_learned_range_and_fixed():
    d = ditlab.Diffusion().respace(250)
    tab = d.tables
    g = torch.Generator().manual_seed(2)
    xt = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 7, 249])
    for v, table in ((-1.0, tab.posterior_log_variance_clipped), (1.0, tab.log_betas)):
        out = d.p_mean_variance(torch.cat([eps, torch.full_like(eps, v)], 1), xt, t)
        assert out["log_variance"].shape == xt.shape
        assert torch.allclose(out["log_variance"], table[t].reshape(3, 1, 1, 1).expand_as(xt), rtol=1e-12)
    out = d.p_mean_variance(torch.cat([eps, torch.zeros_like(eps)], 1), xt, t)
    mid = (tab.posterior_log_variance_clipped[t] + tab.log_betas[t]) / 2
    assert torch.allclose(out["log_variance"][:, 0, 0, 0], mid, rtol=1e-12)
    ab = d.alphas_cumprod[t].reshape(3, 1, 1, 1)
    assert torch.allclose(out["pred_x0"], (xt - (1 - ab).sqrt() * eps) / ab.sqrt(), rtol=1e-10)
    mean, _ = d.q_posterior(out["pred_x0"], xt, t)
    assert torch.allclose(out["mean"], mean, rtol=1e-12)
    clipped = d.p_mean_variance(torch.cat([eps, eps], 1), xt, t, clip_denoised=True)["pred_x0"]
    assert clipped.abs().max() <= 1 and torch.equal(clipped, out["pred_x0"].clamp(-1, 1))
    for fixed, expected in (("large", torch.cat([tab.posterior_log_variance_clipped[1:2], tab.log_betas[1:]])),
                            ("small", tab.posterior_log_variance_clipped)):  # fmt: skip
        df = ditlab.Diffusion(learn_sigma=False, fixed_variance=fixed).respace(250)
        got = df.p_mean_variance(eps, xt, t)["log_variance"]
        assert torch.allclose(got[:, 0, 0, 0], expected[t], rtol=1e-12)
    with pytest.raises(ValueError, match="must have 8 channels"):
        d.p_mean_variance(eps, xt, t)


# ---- the variational bound terms ----------------------------------------------------------------


def test_normal_kl_against_torch_distributions():
    g = torch.Generator().manual_seed(3)
    m1, m2, lv1, lv2 = torch.randn(4, 100, generator=g, dtype=torch.float64)
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(gaussian.normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-10, atol=1e-12)


def test_discretized_log_likelihood_against_torch_distributions():
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (4000,), generator=g).double() / 127.5 - 1  # 8-bit levels in [-1, 1]
    x[:5], x[5:10] = -1.0, 1.0
    means = x + 0.05 * torch.randn(4000, generator=g, dtype=torch.float64)
    log_scales = torch.empty(4000, dtype=torch.float64).uniform_(math.log(0.005), math.log(0.3), generator=g)
    normal = Normal(means, log_scales.exp())
    upper, lower = normal.cdf(x + 1 / 255), normal.cdf(x - 1 / 255)
    expected = torch.where(x < -0.999, upper.log(), torch.where(x > 0.999, (1 - lower).log(), (upper - lower).log()))
    got = gaussian.discretized_gaussian_log_likelihood(x, means, log_scales)
    # ADM uses a tanh approximation of the normal CDF: probabilities agree within 2e-4
    exact_cdf = Normal(0.0, 1.0).cdf(torch.linspace(-6, 6, 10001, dtype=torch.float64))
    approx_cdf = gaussian.approx_standard_normal_cdf(torch.linspace(-6, 6, 10001, dtype=torch.float64))
    assert (approx_cdf - exact_cdf).abs().max() < 2e-4
    assert ((got.exp() - expected.exp()).abs() < 4e-4).all()  # a difference of two CDFs
    likely = expected.exp() > 0.05  # where the bin is likely, the logs agree within 4e-4 / 0.05
    assert likely.sum() > 500 and likely[:5].any() and likely[5:10].any()  # open-ended edge bins included
    assert torch.allclose(got[likely], expected[likely], rtol=0, atol=8e-3)


def vb_in_bits(d, x0, xt, t, mean, log_variance):
    """vb written with torch.distributions: KL of the posterior at t > 0, exact decoder NLL at t = 0."""
    true_mean, true_log_var = d.q_posterior(x0, xt, t)
    kl = kl_divergence(Normal(true_mean, (0.5 * true_log_var).exp()), Normal(mean, (0.5 * log_variance).exp()))
    normal = Normal(mean, (0.5 * log_variance).exp())
    upper, lower = normal.cdf(x0 + 1 / 255), normal.cdf(x0 - 1 / 255)
    nll = -torch.where(x0 < -0.999, upper.log(), torch.where(x0 > 0.999, (1 - lower).log(), (upper - lower).log()))
    per_sample = torch.where(t.reshape(-1, 1, 1, 1) == 0, nll, kl)
    return per_sample.mean(dim=(1, 2, 3)) / math.log(2)


def test_training_losses_against_independent_computation():
    d = ditlab.Diffusion().respace(100)
    g = torch.Generator().manual_seed(5)
    x0 = (torch.randint(0, 256, (4, 3, 6, 6), generator=g).double() / 127.5 - 1)
    noise = torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 50, 99])
    weights = torch.randn(6, 3, generator=g, dtype=torch.float64) * 0.3
    seen = {}

    def model(x, ts, y):  # a linear map over channels, output [eps, v]
        seen["t"], seen["y"] = ts, y
        return torch.einsum("oc,nchw->nohw", weights, x).tanh()

    terms = d.training_losses(model, x0, t, y=torch.arange(4), noise=noise)
    assert seen["t"].equal(d.timesteps[t]) and seen["y"].equal(torch.arange(4))  # original indices
    xt = d.q_sample(x0, t, noise)
    out = model(xt, None, None)
    pmv = d.p_mean_variance(out, xt, t)
    assert torch.allclose(terms["mse"], ((out[:, :3] - noise) ** 2).mean(dim=(1, 2, 3)), rtol=1e-12)
    expected_vb = vb_in_bits(d, x0, xt, t, pmv["mean"], pmv["log_variance"])
    assert torch.allclose(terms["vb"][1:], expected_vb[1:], rtol=1e-9)  # the KL terms: exact
    assert terms["vb"][0].item() == pytest.approx(expected_vb[0].item(), rel=0.02)  # decoder: approximate CDF
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"], rtol=1e-12)


def test_vb_trains_only_the_variance_and_mse_only_the_mean():
    d = ditlab.Diffusion()
    g = torch.Generator().manual_seed(6)
    x0, noise = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    raw = torch.randn(2, 6, 4, 4, generator=g).tanh().requires_grad_()
    t = torch.tensor([3, 600])
    terms = d.training_losses(lambda x, ts, y: raw * 1.0, x0, t, noise=noise)
    (g_vb,) = torch.autograd.grad(terms["vb"].sum(), raw, retain_graph=True)
    (g_mse,) = torch.autograd.grad(terms["mse"].sum(), raw)
    assert g_vb[:, :3].abs().max() == 0 and g_vb[:, 3:].abs().max() > 0
    assert g_mse[:, 3:].abs().max() == 0 and g_mse[:, :3].abs().max() > 0


def test_perfect_noise_prediction():
    """A model that returns the true noise: mse is exactly 0 and x_0 is recovered."""
    d = ditlab.Diffusion()
    g = torch.Generator().manual_seed(7)
    x0, noise = torch.randn(5, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 750, 999])
    for learn_sigma in (True, False):
        dd = ditlab.Diffusion(learn_sigma=learn_sigma)

        def oracle(x, ts, y, learn_sigma=learn_sigma):
            return torch.cat([noise, torch.zeros_like(noise)], 1) if learn_sigma else noise

        terms = dd.training_losses(oracle, x0, t, noise=noise)
        assert terms["mse"].abs().max() == 0
        if not learn_sigma:
            assert torch.equal(terms["loss"], terms["mse"]) and terms["vb"].isfinite().all()
    xt = d.q_sample(x0, t, noise)
    pred = d.p_mean_variance(torch.cat([noise.double(), torch.zeros_like(xt)], 1), xt, t)["pred_x0"]
    assert torch.allclose(pred, x0, atol=1e-9)


def test_losses_float32_under_bf16_model_output():
    d = ditlab.Diffusion()
    g = torch.Generator().manual_seed(8)
    x0, noise = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    out = torch.randn(3, 8, 4, 4, generator=g).tanh()
    t = torch.tensor([0, 10, 900])
    full = d.training_losses(lambda x, ts, y: out, x0, t, noise=noise)
    half = d.training_losses(lambda x, ts, y: out.bfloat16(), x0, t, noise=noise)
    assert all(v.dtype == torch.float32 and v.shape == (3,) for v in half.values())
    assert torch.allclose(half["mse"], full["mse"], rtol=2e-2)


def test_timestep_sampler_and_device_tables():
    d = ditlab.Diffusion().respace(50)
    a = d.sample_timesteps(1000, "cpu", generator=torch.Generator().manual_seed(0))
    b = d.sample_timesteps(1000, "cpu", generator=torch.Generator().manual_seed(0))
    assert a.equal(b) and a.dtype == torch.long and a.min() == 0 and a.max() == 49
    assert d.tables_on("cpu") is d.tables_on(torch.device("cpu"))
    assert d.tables_on("cpu").betas.dtype == torch.float64


def test_with_a_dit_model():
    model = ditlab.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=4, num_classes=10)
    d = ditlab.Diffusion()
    g = torch.Generator().manual_seed(9)
    x0 = torch.randn(4, 4, 8, 8, generator=g)
    terms = d.training_losses(model, x0, d.sample_timesteps(4, "cpu", g), y=torch.arange(4))
    assert set(terms) == {"loss", "mse", "vb"} and all(v.shape == (4,) and v.isfinite().all() for v in terms.values())
    terms["loss"].mean().backward()
    assert model.blocks[0].adaLN_modulation[-1].weight.grad is not None


@pytest.mark.gpu
def test_training_losses_no_host_sync_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = ditlab.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=4,
                       num_classes=10).cuda()  # fmt: skip
    d = ditlab.Diffusion()
    x0 = torch.randn(4, 4, 8, 8, device="cuda")
    y = torch.arange(4, device="cuda")
    t = d.sample_timesteps(4, "cuda")
    cpu_terms = d.training_losses(model.cpu(), x0.cpu(), t.cpu(), y=y.cpu(), noise=torch.ones_like(x0.cpu()))
    model.cuda()
    d.training_losses(model, x0, t, y=y)  # warm-up: the tables are copied to the GPU once
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            terms = d.training_losses(model, x0, t, y=y, noise=torch.ones_like(x0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert terms["loss"].dtype == torch.float32
    assert torch.allclose(terms["mse"].cpu(), cpu_terms["mse"], rtol=5e-2)
