"""Guidance interval and autoguidance through every sampler of both processes: an empty interval is
unguided sampling and a full one constant CFG, bit for bit; a guide equal to the main model is
unguided sampling; the per-step rule against REPA's own samplers (golden values) and against the
interval paper's sigma rule (re-implemented here from its definitions); model calls; one-line errors."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import randomize

import ditlab
from ditlab.diffusion.guidance import Guidance

TINY = dict(input_size=4, patch_size=2, in_channels=2, hidden_size=16, depth=1, num_heads=2, num_classes=5)
GOLDEN_REPA = Path(__file__).parent / "data" / "golden_repa_interval.npz"
HAS_TORCHDIFFEQ = importlib.util.find_spec("torchdiffeq") is not None
DDPM_SAMPLERS = ("ddpm", "ddim", "dpm++2m")
FLOW_SAMPLERS = ("euler", "heun", "sde-euler", "sde-heun") + (("dopri5",) if HAS_TORCHDIFFEQ else ())


class Counted(torch.nn.Module):
    """A model that records each call's batch size and first time."""

    def __init__(self, model):
        super().__init__()
        self.model, self.num_classes, self.null_class = model, model.num_classes, model.null_class
        self.calls: list[tuple[int, float]] = []
        self.eval()

    def forward(self, x, t, y=None):
        self.calls.append((x.shape[0], float(t[0])))
        return self.model(x, t, y)


def tiny(seed=0, learn_sigma=True, **overrides):
    model = ditlab.DiT(**{**TINY, "learn_sigma": learn_sigma, **overrides}).eval()
    return Counted(randomize(model, seed, std=0.1))  # smooth enough for dopri5 to take few steps


def setup(objective):
    """(process, samplers, sample keyword arguments) of each process, with few steps."""
    if objective == "ddpm":
        return ditlab.Diffusion(), DDPM_SAMPLERS, {"steps": 6}
    return ditlab.FlowMatching(atol=1e-3, rtol=1e-2), FLOW_SAMPLERS, {"steps": 5}  # dopri5: few evaluations


def draw(sampler, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, TINY["in_channels"], TINY["input_size"], TINY["input_size"], generator=g)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(n)]
    return noise, torch.tensor([1, 3, 0][:n]), gens


def run(process, model, sampler, kw, **guidance):
    noise, y, gens = draw(sampler)
    extra = {"eta": 1.0} if sampler == "ddim" else {}
    return process.sample(model, noise, y=y, sampler=sampler, generator=gens, **kw, **extra, **guidance)


CASES = [(o, s) for o in ("ddpm", "flow") for s in setup(o)[1]]


@pytest.mark.parametrize("objective, sampler", CASES)
def test_empty_interval_is_unguided_and_full_is_constant_cfg(objective, sampler):
    process, _, kw = setup(objective)
    model = tiny(learn_sigma=objective == "ddpm")
    unguided = run(process, model, sampler, kw)
    cfg = run(process, model, sampler, kw, cfg_scale=3.0)
    assert not torch.equal(unguided, cfg)
    assert torch.equal(run(process, model, sampler, kw, cfg_scale=3.0, guidance_interval=(0.0, 0.0)), unguided)
    assert torch.equal(run(process, model, sampler, kw, cfg_scale=3.0, guidance_t=(1e6, 2e6)), unguided)
    # every step's sigma is finite and > 0 except the flow's first (t = 0: inf) and dopri5's last stage (t = 1: 0)
    assert torch.equal(run(process, model, sampler, kw, cfg_scale=3.0, guidance_interval=(0.0, math.inf)),
                       cfg) == (sampler != "dopri5")
    full_t = (0.0, 999.0) if objective == "ddpm" else (-1e6, 1e6)  # dopri5 steps past t = 1 and interpolates
    assert torch.equal(run(process, model, sampler, kw, cfg_scale=3.0, guidance_t=full_t), cfg)


@pytest.mark.parametrize("objective, sampler", CASES)
def test_a_guide_equal_to_the_main_model_is_unguided_sampling(objective, sampler):
    process, _, kw = setup(objective)
    model = tiny(learn_sigma=objective == "ddpm")
    unguided = run(process, model, sampler, kw)
    assert torch.equal(run(process, model, sampler, kw, cfg_scale=2.5, guide=model), unguided)


@pytest.mark.parametrize("objective, sampler", [("ddpm", "ddpm"), ("ddpm", "dpm++2m"), ("flow", "heun"),
                                                ("flow", "sde-euler")])  # fmt: skip
def test_autoguidance_is_the_guide_plus_w_times_the_difference(objective, sampler):
    """Against a model that computes D_guide + w (D_main - D_guide) on the latent channels itself, the
    learned variance from the main model (as DiT takes it from the conditional half)."""
    process, _, kw = setup(objective)
    main, guide = tiny(0, learn_sigma=objective == "ddpm"), tiny(7, learn_sigma=False)
    C, w = TINY["in_channels"], 2.0

    def combined(x, t, y):
        m, g = main(x, t, y), guide(x, t, y)
        return torch.cat([g + w * (m[:, :C] - g), m[:, C:]], dim=1)

    combined.num_classes, combined.null_class = main.num_classes, main.null_class
    expected = run(process, combined, sampler, kw)
    actual = run(process, main, sampler, kw, cfg_scale=w, guide=guide)
    assert (actual - expected).abs().max().item() <= 1e-6 * expected.abs().max().item()
    assert not torch.allclose(actual, run(process, main, sampler, kw), atol=1e-3)


def calls_per_step(model, n):
    """Each call's (kind, time): 'u' a batch of n, 'g' of 2n (classifier-free guidance)."""
    return [("g" if b == 2 * n else "u", t) for b, t in model.calls]


def test_model_calls_ddpm():
    """One call of N per unguided step, one of 2N per CFG step; autoguidance: main and guide, N each."""
    process, kw = ditlab.Diffusion(), {"steps": 8}
    spaced = process.respace(8)
    sigma = torch.sqrt((1 - spaced.alphas_cumprod) / spaced.alphas_cumprod).tolist()
    lo, hi = sigma[2], sigma[5]  # guide steps 3, 4, 5: (lo, hi]
    main, guide = tiny(), tiny(3)
    run(process, main, "ddpm", kw, cfg_scale=2.0, guidance_interval=(lo, hi))
    kinds = [k for k, _ in calls_per_step(main, 3)]
    assert kinds == ["u", "u", "g", "g", "g", "u", "u", "u"]  # steps visited from last to first
    main.calls.clear()
    run(process, main, "ddpm", kw, cfg_scale=2.0, guidance_interval=(lo, hi), guide=guide)
    assert [b for b, _ in main.calls] == [3] * 8 and len(guide.calls) == 3
    assert [t for _, t in guide.calls] == [float(spaced.timesteps[i]) for i in (5, 4, 3)]


def test_model_calls_flow_heun_decide_once_per_step():
    """Heun's second evaluation follows its step's decision (the interval paper's EDM code and REPA's)."""
    fm, main = ditlab.FlowMatching(), tiny(learn_sigma=False)
    run(fm, main, "heun", {"steps": 4}, cfg_scale=2.0, guidance_t=(0.5, 1.0))  # steps at t = 0, .25, .5, .75
    assert [k for k, _ in calls_per_step(main, 3)] == ["u", "u", "u", "u", "g", "g", "g", "g"]


def linear_alphas_cumprod():
    """DiT's schedule from its definition (linear betas 1e-4 .. 0.02 over 1000 steps), in numpy."""
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))


@pytest.mark.parametrize("steps, lo, hi", [(25, 0.28, 5.42), (50, 0.5, 2.0), (10, 0.0, 1.0)])
def test_ddpm_interval_follows_the_papers_sigma_rule(steps, lo, hi):
    """Kynkaanniemi et al. 2024: guided where sigma in (lo, hi], sigma = sqrt((1 - ab) / ab) at the step's
    original timestep (EDM2-S's (0.28, 5.42] among them)."""
    ab = linear_alphas_cumprod()
    model = tiny()
    run(ditlab.Diffusion(), model, "ddim", {"steps": steps}, cfg_scale=2.0, guidance_interval=(lo, hi))
    observed = [(k == "g", int(t)) for k, t in calls_per_step(model, 3)]
    expected = [(lo < math.sqrt((1 - ab[t]) / ab[t]) <= hi, t) for _, t in observed]
    assert observed == expected and any(g for g, _ in observed) and not all(g for g, _ in observed)


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_flow_interval_follows_the_papers_sigma_rule(path):
    """sigma = sigma_t / alpha_t of the path: (1 - t) / t, and cos / sin for gvp."""
    model = tiny(learn_sigma=False)
    run(ditlab.FlowMatching(path), model, "euler", {"steps": 20}, cfg_scale=2.0, guidance_interval=(0.3, 2.0))
    for kind, t in calls_per_step(model, 3):
        sigma = math.inf if t == 0 else ((1 - t) / t if path == "linear" else 1 / math.tan(math.pi * t / 2))
        assert (kind == "g") == (0.3 < sigma <= 2.0), (t, sigma)


def test_flow_t_interval_against_repas_samplers():
    """REPA's samplers (golden values from its own code, scripts/make_golden_repa_interval.py) guide where
    low <= t <= high in its time (1 noise, 0 data), decided at each step's first time. ditlab's
    --guidance-t takes the same interval in the flow's own t: (1 - high, 1 - low)."""
    golden = np.load(GOLDEN_REPA)
    for sampler, steps, low, high in json.loads(str(golden["cases"])):
        key = f"{sampler}_{steps}_{low}_{high}"
        ref_t, ref_guided = golden[f"{key}/t"], golden[f"{key}/guided"]
        model = tiny(learn_sigma=False)
        if sampler == "sde":  # REPA: steps - 1 Euler-Maruyama steps to t = 0.04, then the last step
            fm = ditlab.FlowMatching(last_step="mean", last_step_size=0.04)
            run(fm, model, "sde-euler", {"steps": steps - 1}, cfg_scale=1.8, guidance_t=(1 - high, 1 - low))
        else:
            run(ditlab.FlowMatching(), model, sampler, {"steps": steps}, cfg_scale=1.8, guidance_t=(1 - high, 1 - low))
        ours = calls_per_step(model, 3)
        if sampler == "heun":  # REPA's last step is an Euler step: one call fewer
            ours = ours[:-1]
        assert np.allclose([1 - t for _, t in ours], ref_t, rtol=0, atol=1e-6), key  # the same evaluations
        assert [k == "g" for k, _ in ours] == ref_guided.tolist(), key


@pytest.mark.parametrize("kwargs, message", [
    (dict(guidance_interval=(2.0, 1.0)), "needs 0 <= LO <= HI, got 2.0 1.0"),
    (dict(guidance_interval=(-1.0, 1.0)), "needs 0 <= LO <= HI"),
    (dict(guidance_interval=(float("nan"), 1.0)), "must be two numbers LO HI"),
    (dict(guidance_interval=(1.0,)), "must be two numbers LO HI"),
    (dict(guidance_t=(0.7, 0.2)), "needs finite LO <= HI"),
    (dict(guidance_t=(0.0, 1.0), guidance_interval=(0.0, 1.0)), "in sigma or in t, not both"),
    (dict(guide=ditlab.DiT(**{**TINY, "in_channels": 3})), "guide model takes 3-channel 4x4 latents"),
    (dict(guide=ditlab.DiT(**{**TINY, "input_size": 8})), "guide model takes 2-channel 8x8 latents"),
    (dict(guide=ditlab.DiT(**{**TINY, "num_classes": 7})), "guide model has 7 classes, the main model 5"),
])  # fmt: skip
@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_bad_guidance_one_line_errors(objective, kwargs, message):
    process, samplers, kw = setup(objective)
    with pytest.raises(ValueError, match=message) as err:
        run(process, tiny(), samplers[0], kw, cfg_scale=2.0, **kwargs)
    assert "\n" not in str(err.value)


def test_guidance_value_normalises():
    g = Guidance(scale=2, interval=[0, 5])
    assert g.interval == (0.0, 5.0) and g == Guidance(scale=2.0, interval=(0.0, 5.0))
    assert not Guidance(interval=(0, 5)).applies(1.0, 0.5)  # scale 1: nothing guided
