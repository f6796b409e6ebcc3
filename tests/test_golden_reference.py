"""ditlab against golden values from the authors' code (facebookresearch/DiT: models.py and its
diffusion/ package, which is ADM's), stored in tests/data/golden_dit_reference.npz by
scripts/make_golden.py (which does not import ditlab): the network, guided forwards, respacing,
p_mean_variance, training losses, and guided DDIM / DDPM samples with the reference's step noise.

The reference does its diffusion maths in float32 (tables in float64, cast per use), as ditlab does
for float32 inputs, so the comparisons are tolerances, not bitwise equality: the diffusion maths on
the same (stored) model output agree to 1e-5 of each array's scale, the network to 1e-5 of its O(1)
output, samples to 1e-4 of their scale."""

import json

import numpy as np
import pytest
import torch
from helpers import golden_tensor, read_golden

import ditlab
from ditlab.diffusion import samplers

NETWORK_TOL = 1e-5  # of the O(1) network output
MATH_TOL = 1e-5  # of each array's scale: float32 maths on the same model output
SAMPLE_TOL = 1e-4  # of the samples' scale: network differences carried through the steps


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    return read_golden("golden_dit_reference.npz")


@pytest.fixture(scope="module")
def config(golden) -> dict:
    return json.loads(str(golden["config"]))


def tensor(golden, key: str) -> torch.Tensor:
    return golden_tensor(golden, key, float32=False)  # float64 arrays stay float64


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str, floor: float = 0.0) -> None:
    """Elementwise |actual - expected| <= tol * (|expected| + scale), scale = max(max |expected|, floor)."""
    actual, expected = actual.detach().double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(expected.abs().max().item(), floor)
    err = (actual - expected).abs()
    bad = err > tol * (expected.abs() + scale)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} elements differ, max difference {err.max().item():.3g} "
        f"(scale {scale:.3g}, tolerance {tol:g} of it)"
    )


def load_model(golden, config, sigma: int) -> ditlab.DiT:
    model = ditlab.DiT(**config["model"], learn_sigma=bool(sigma)).eval()
    prefix = f"model_sigma{sigma}/"
    state = {k[len(prefix) :]: tensor(golden, k).float() for k in golden if k.startswith(prefix)}
    model.load_state_dict(state, strict=True)
    return model


@pytest.fixture(scope="module")
def models(golden, config) -> dict[int, ditlab.DiT]:
    return {sigma: load_model(golden, config, sigma) for sigma in (1, 0)}


def process(golden, n: int, sigma: int) -> ditlab.Diffusion:
    """ditlab's process over the reference's kept timesteps of spacing n (the respacing algorithm itself
    is checked by test_respaced_timesteps, so that the maths here does not depend on it)."""
    base = ditlab.Diffusion(learn_sigma=bool(sigma))
    return base if n == base.num_timesteps else base.respace_to(golden[f"timesteps_{n}"].tolist())


# ---- the network ---------------------------------------------------------------------------------------


def test_pos_embed_is_the_references(golden, config):
    fresh = ditlab.DiT(**config["model"])
    assert_close(fresh.pos_embed, tensor(golden, "model_sigma1/pos_embed"), 1e-6, "pos_embed", floor=1.0)


@pytest.mark.parametrize("sigma", [1, 0])
def test_forward(golden, models, sigma):
    with torch.no_grad():
        out = models[sigma](tensor(golden, "net_x"), tensor(golden, "net_t"), tensor(golden, "net_y"))
    assert_close(out, tensor(golden, f"net_out_sigma{sigma}"), NETWORK_TOL, f"forward sigma{sigma}", floor=1.0)


@pytest.mark.parametrize("channels", [3, 4])
def test_guided_forward(golden, config, models, channels):
    """The reference's forward_with_cfg (3 channels) and its all-channel variant: the conditional half."""
    step = samplers.guided_model(models[1], tensor(golden, "cfg_y"), config["cfg_scale"],
                                 3 if channels == 3 else None, channels=4, null_class=models[1].null_class)  # fmt: skip
    with torch.no_grad():
        out = step(tensor(golden, "net_x"), tensor(golden, "net_t"))
    assert_close(out, tensor(golden, f"cfg_out_channels{channels}"), NETWORK_TOL, f"cfg {channels}", floor=1.0)


# ---- respacing -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [10, 20, 21, 23, 25, 27, 35, 50, 100, 250, 500, 1000])
def test_respaced_timesteps(golden, n):
    ours = ditlab.Diffusion().respace(n).timesteps.tolist()
    ref = golden[f"timesteps_{n}"].tolist()
    moved = [(a, b) for a, b in zip(ours, ref) if a != b]
    assert ours == ref, f"respace({n}): {len(moved)} kept timesteps differ from the reference's, (ours, ref): {moved}"


@pytest.mark.parametrize("n", [1000, 250, 27, 10])
def test_respaced_betas(golden, n):
    betas = process(golden, n, 1).betas
    assert_close(betas, tensor(golden, f"betas_{n}"), 1e-9, f"betas of {n} steps")


# ---- the diffusion maths on a stored model output ------------------------------------------------------


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("sigma", [1, 0])
@pytest.mark.parametrize("n", [1000, 250, 27, 10])
def test_p_mean_variance(golden, n, sigma, clip):
    output = tensor(golden, "math_out")
    C = output.shape[1] // 2
    out = process(golden, n, sigma).p_mean_variance(output if sigma else output[:, :C], tensor(golden, "math_xt"),
                                                    tensor(golden, f"math_t_{n}"), clip_denoised=clip)  # fmt: skip
    key = f"pmv_{n}_sigma{sigma}"
    what = f"p_mean_variance {n} steps, sigma{sigma}, clip{int(clip)}"
    assert_close(out["mean"], tensor(golden, f"{key}_clip{int(clip)}_mean"), MATH_TOL, f"{what}: mean")
    assert_close(out["pred_x0"], tensor(golden, f"{key}_clip{int(clip)}_pred_xstart"), MATH_TOL, f"{what}: pred_x0")
    log_variance = out["log_variance"].expand_as(out["mean"])
    assert_close(log_variance, tensor(golden, f"{key}_log_variance"), MATH_TOL, f"{what}: log_variance")
    assert_close(log_variance.exp(), tensor(golden, f"{key}_variance"), MATH_TOL, f"{what}: variance")


@pytest.mark.parametrize("sigma", [1, 0])
@pytest.mark.parametrize("n", [1000, 250, 27, 10])
def test_training_losses(golden, n, sigma):
    """On the stored model output; the model must be called with the reference's x_t and original steps."""
    output = tensor(golden, "math_out")
    C = output.shape[1] // 2
    calls = []

    def model(x_t, t, y):
        calls.append(t)
        assert_close(x_t, tensor(golden, f"losses_{n}_xt"), MATH_TOL, f"x_t of {n} steps")
        return output if sigma else output[:, :C]

    terms = process(golden, n, sigma).training_losses(model, tensor(golden, "math_x0"), tensor(golden, f"math_t_{n}"),
                                                      noise=tensor(golden, "math_noise"))  # fmt: skip
    assert len(calls) == 1 and calls[0].tolist() == golden[f"math_called_t_{n}"].tolist()
    for k in ("loss", "mse") + (("vb",) if sigma else ()):
        assert_close(terms[k], tensor(golden, f"losses_{n}_sigma{sigma}_{k}"), MATH_TOL, f"{k} of {n} steps")


@pytest.mark.parametrize("sigma", [1, 0])
@pytest.mark.parametrize("n", [1000, 250])
def test_training_losses_with_the_network(golden, models, n, sigma):
    with torch.no_grad():
        terms = process(golden, n, sigma).training_losses(models[sigma], tensor(golden, "e2e_x0"),
                                                          tensor(golden, f"e2e_t_{n}"), y=tensor(golden, "cfg_y"),
                                                          noise=tensor(golden, "e2e_noise"))  # fmt: skip
    for k in ("loss", "mse") + (("vb",) if sigma else ()):
        assert_close(terms[k], tensor(golden, f"e2e_losses_{n}_sigma{sigma}_{k}"), SAMPLE_TOL, f"{k} of {n} steps")


# ---- sampling ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("steps", [10, 250])
def test_guided_ddim(golden, config, models, steps, channels):
    out = ditlab.Diffusion().sample(models[1], tensor(golden, "sample_noise"), y=tensor(golden, "cfg_y"), steps=steps,
                                    sampler="ddim", cfg_scale=config["cfg_scale"],
                                    guidance_channels=3 if channels == 3 else None)  # fmt: skip
    assert_close(out, tensor(golden, f"ddim_{steps}_channels{channels}"), SAMPLE_TOL, f"ddim {steps}", floor=1.0)


def replay(monkeypatch, rows: torch.Tensor) -> list[int]:
    """Make the samplers draw the stored step noise rows (steps - 1, N, ...) in order; returns [draws]."""
    drawn = [0]

    def noise_source(like, generator):
        def draw():
            assert drawn[0] < len(rows), "more step noise drawn than the reference used"
            drawn[0] += 1
            return rows[drawn[0] - 1].to(like.dtype)

        return draw

    monkeypatch.setattr(samplers, "noise_source", noise_source)
    return drawn


@pytest.mark.parametrize("steps, channels", [(10, 3), (10, 4), (25, 3), (25, 4), (10, None)])
def test_ddpm(golden, config, models, monkeypatch, steps, channels):
    """Guided on 3 or 4 channels (learned variance), and unguided with fixed variance (channels None)."""
    rows = tensor(golden, f"ddpm_step_noise_{steps}").float()
    drawn = replay(monkeypatch, rows)
    guided = channels is not None
    out = ditlab.Diffusion(learn_sigma=guided).sample(
        models[1 if guided else 0], tensor(golden, "sample_noise"), y=tensor(golden, "cfg_y"), steps=steps,
        sampler="ddpm", cfg_scale=config["ddpm_cfg_scale"] if guided else 1.0,
        guidance_channels=3 if channels == 3 else None)  # fmt: skip
    assert drawn[0] == len(rows) == steps - 1
    key = f"ddpm_{steps}_channels{channels}" if guided else f"ddpm_{steps}_unguided_sigma0"
    assert_close(out, tensor(golden, key), SAMPLE_TOL, key, floor=1.0)
