"""Write tests/data/golden_sit_reference.npz: inputs, weights and outputs of SiT's own code
(github.com/willisma/SiT: its models.py and transport/ package), for tests/test_golden_sit.py to compare
ditlab's flow matching with, without the reference installed.

    python scripts/make_golden_sit.py --sit-repo PATH/TO/willisma/SiT [--out FILE] [--ref-commit SHA]

Run it once, in an environment with the reference's imports (torch, numpy, timm, torchdiffeq); the
stand-in for torchvision of scripts/make_golden.py is used (timm imports it, nothing here calls it).
This script does not import ditlab, so the fixture is independent of it.

What is stored (float32 unless said otherwise):
- a tiny SiT (8x8x4 input, patch 2, hidden 32, depth 2, 4 heads, 10 classes, learn_sigma=True as the
  released weights), its state_dict under "model/" (random weights, std 0.2, rounded to float16);
- the interpolant (x_t, u_t) of both paths at fixed (t, x_0, x_1);
- training losses of the network for fixed (t, x_0, x_1) (the reference's draws replaced): both paths,
  velocity prediction, and noise / score prediction with each loss weight;
- fixed-grid ODE end points (torchdiffeq's euler and heun2, as SiT's sample_ode calls them), guided
  on 3 channels through the reference's forward_with_cfg, unguided, and with noise / score prediction;
- SDE samples (SiT's Euler-Maruyama and Heun, every diffusion form and last step it runs), with the
  step noise the reference draws replaced by float16-exact rows, stored ("sde_noise_*", (steps, N, C,
  H, W)) so that a sampler can replay it (a guided run draws for its doubled state; the rows of its null
  half never reach the first half, which is the output, and are not stored);
- dopri5 end points, unguided and guided, at SiT's tolerances (atol 1e-6, rtol 1e-3) and at tight ones
  (1e-7, 1e-6) where the end point is the ODE's solution to float32 accuracy.
SiT's `num_steps` is stored per run; the reference's own names are kept in the keys."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_golden import (  # noqa: E402
    half_rounded,
    numpy_of,
    randomized,
    reference_commit,
    stub_torchvision,
    write_fixture,
)

NULL = 10  # the tiny model's null label (= num_classes)
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=NULL)
C = TINY["in_channels"]
N = 2  # images per sample run
M = 6  # batch of the interpolant and loss checks
WEIGHT_STD = 0.2  # a velocity of O(1) (1.5 on average) on which the labels act (0.5)
CFG_SCALE = 4.0
ODE_NUM_STEPS = 11  # grid points: 10 intervals
SDE_NUM_STEPS = 11
DOPRI5_TOLERANCES = {"default": (1e-6, 1e-3), "tight": (1e-7, 1e-6)}  # (atol, rtol); default: SiT's sample.py
SEED = 0
PATHS = {"linear": "Linear", "gvp": "GVP"}  # ditlab's names -> the reference's
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "golden_sit_reference.npz"

# SDE runs: (key, path, prediction, sampling method, diffusion form, norm, last step, guided)
SDE_RUNS = [
    ("linear_euler_sigma_mean", "linear", "velocity", "Euler", "sigma", 1.0, "Mean", True),
    ("gvp_euler_sigma_mean", "gvp", "velocity", "Euler", "sigma", 1.0, "Mean", True),
    ("linear_heun_sigma_mean", "linear", "velocity", "Heun", "sigma", 1.0, "Mean", True),
    ("gvp_heun_sigma_mean", "gvp", "velocity", "Heun", "sigma", 1.0, "Mean", False),
    ("linear_euler_linear_tweedie", "linear", "velocity", "Euler", "linear", 1.0, "Tweedie", False),
    ("gvp_euler_decreasing_euler", "gvp", "velocity", "Euler", "decreasing", 1.0, "Euler", False),
    ("linear_euler_incdec_none", "linear", "velocity", "Euler", "inccreasing-decreasing", 1.0, None, False),
    ("linear_euler_sigma2_mean", "linear", "velocity", "Euler", "sigma", 2.0, "Mean", False),
    ("linear_euler_sbdm_mean_noise", "linear", "noise", "Euler", "SBDM", 1.0, "Mean", False),
    ("gvp_euler_sbdm_tweedie_score", "gvp", "score", "Euler", "SBDM", 0.5, "Tweedie", False),
]


class NoiseRecorder:
    """A stand-in for torch.randn during an SDE run: hands out float16-exact standard normal rows from
    its own generator and keeps them (the reference draws th.randn(x.size()) once a step)."""

    def __init__(self, original, seed: int):
        self.original, self.g, self.rows = original, torch.Generator().manual_seed(seed), []

    def __call__(self, *size, **kwargs):
        shape = size[0] if len(size) == 1 and not isinstance(size[0], int) else size
        row = half_rounded(self.original(tuple(shape), generator=self.g))
        self.rows.append(row)
        return row


def forward_fn(model, guided: bool):
    """The network as the reference's samplers call it: forward_with_cfg on the doubled state, or forward."""
    return model.forward_with_cfg if guided else model.forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sit-repo", required=True, help="a checkout of github.com/willisma/SiT")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"where to write the fixture (default {DEFAULT_OUT})")
    parser.add_argument("--ref-commit", default=None, help="the checkout's commit, recorded in the fixture")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    stub_torchvision()
    sys.path.insert(0, args.sit_repo)
    from models import SiT  # the reference
    from transport import Sampler, create_transport

    store: dict[str, np.ndarray] = {}
    g = torch.Generator().manual_seed(SEED)
    model = randomized(SiT(**TINY, learn_sigma=True), seed=1, std=WEIGHT_STD)
    for k, v in model.state_dict().items():
        store[f"model/{k}"] = numpy_of(v if k == "pos_embed" else v.half())

    # the interpolant
    t = torch.cat([torch.tensor([0.0, 1.0]), torch.rand(M - 2, generator=g)])
    x0, x1 = torch.randn(M, C, 4, 4, generator=g), torch.randn(M, C, 4, 4, generator=g)
    store.update(path_t=numpy_of(t), path_x0=numpy_of(x0), path_x1=numpy_of(x1))
    for name, ref_name in PATHS.items():
        _, xt, ut = create_transport(ref_name).path_sampler.plan(t, x0, x1)
        store[f"path_{name}_xt"], store[f"path_{name}_ut"] = numpy_of(xt), numpy_of(ut)

    # training losses with the network, (t, x0) fixed by replacing the reference's draw
    lx0, lx1 = torch.randn(M, C, 8, 8, generator=g), torch.randn(M, C, 8, 8, generator=g)
    ly = torch.randint(0, NULL, (M,), generator=g)
    t_inside = 1e-3 + (1 - 2e-3) * torch.rand(M, generator=g)  # the non-velocity interval [eps, 1 - eps]
    store.update(loss_x0=numpy_of(lx0), loss_x1=numpy_of(lx1), loss_y=numpy_of(ly), loss_t_inside=numpy_of(t_inside))
    for name, ref_name in PATHS.items():
        for prediction, weights in (("velocity", (None,)), ("noise", (None, "velocity", "likelihood")),
                                    ("score", (None, "velocity", "likelihood"))):  # fmt: skip
            for weight in weights:
                ref = create_transport(ref_name, prediction, weight)
                lt = t if prediction == "velocity" else t_inside
                ref.sample = lambda x, lt=lt: (lt, lx0, x)
                with torch.no_grad():
                    loss = ref.training_losses(model, lx1, model_kwargs=dict(y=ly))["loss"]
                store[f"loss_{name}_{prediction}_{weight}"] = numpy_of(loss)

    # samplers: one start, labels, and the doubled state of the reference's guided runs
    z = torch.randn(N, C, 8, 8, generator=g)
    y = torch.randint(0, NULL, (N,), generator=g)
    store.update(sample_noise=numpy_of(z), sample_y=numpy_of(y))
    z2, y2 = torch.cat([z, z]), torch.cat([y, torch.full_like(y, NULL)])

    def run(fn, guided: bool) -> torch.Tensor:
        kwargs = dict(y=y2, cfg_scale=CFG_SCALE) if guided else dict(y=y)
        with torch.no_grad():
            out = fn(z2 if guided else z, forward_fn(model, guided), **kwargs)[-1]
        return out[:N]

    # fixed-grid ODEs (torchdiffeq's euler / heun2, as SiT's sample_ode calls them)
    for name, ref_name in PATHS.items():
        for method, guided in (("euler", True), ("heun2", True), ("euler", False)):
            fn = Sampler(create_transport(ref_name)).sample_ode(sampling_method=method, num_steps=ODE_NUM_STEPS)
            store[f"ode_{name}_{method}_{'cfg3' if guided else 'plain'}"] = numpy_of(run(fn, guided))
    for prediction in ("noise", "score"):
        transport = create_transport("Linear", prediction)
        fn = Sampler(transport).sample_ode(sampling_method="heun2", num_steps=ODE_NUM_STEPS)
        store[f"ode_linear_heun2_plain_{prediction}"] = numpy_of(run(fn, False))

    # SDEs with the reference's noise recorded
    original_randn = torch.randn
    sde_config = {}
    for i, (key, path, prediction, method, form, norm, last, guided) in enumerate(SDE_RUNS):
        fn = Sampler(create_transport(PATHS[path], prediction)).sample_sde(
            sampling_method=method, diffusion_form=form, diffusion_norm=norm, last_step=last,
            num_steps=SDE_NUM_STEPS)  # fmt: skip
        recorder = NoiseRecorder(original_randn, seed=100 + i)
        torch.randn = recorder
        try:
            out = run(fn, guided)
        finally:
            torch.randn = original_randn
        assert torch.isfinite(out).all(), f"{key}: the reference's sample is not finite"
        store[f"sde_{key}"] = numpy_of(out)
        store[f"sde_noise_{key}"] = numpy_of(torch.stack(recorder.rows)[:, :N].half())  # (steps, N, C, H, W)
        sde_config[key] = dict(path=path, prediction=prediction, method=method, form=form, norm=norm,
                               last_step=last, guided=guided)  # fmt: skip

    # SBDM with velocity prediction: the reference's interval starts at t = 0, where SBDM's coefficient
    # is 1/t; record what it returns
    fn = Sampler(create_transport("Linear")).sample_sde(diffusion_form="SBDM", num_steps=SDE_NUM_STEPS)
    with torch.no_grad():
        sbdm = fn(z, model.forward, y=y)[0]
    store["sde_sbdm_velocity_first_step_finite"] = np.array(bool(torch.isfinite(sbdm).all()))

    # dopri5 (the velocity ODE does not depend on the path): at SiT's tolerances, and at tight ones where
    # the end point is the ODE's solution to float32 accuracy
    for tol_name, (atol, rtol) in DOPRI5_TOLERANCES.items():
        for guided in (False, True):
            fn = Sampler(create_transport("Linear")).sample_ode(sampling_method="dopri5", num_steps=ODE_NUM_STEPS,
                                                                atol=atol, rtol=rtol)  # fmt: skip
            store[f"dopri5_{tol_name}_{'cfg3' if guided else 'plain'}"] = numpy_of(run(fn, guided))

    config = dict(model=TINY, weight_std=WEIGHT_STD, cfg_scale=CFG_SCALE, ode_num_steps=ODE_NUM_STEPS,
                  sde_num_steps=SDE_NUM_STEPS, sde_runs=sde_config, dopri5=DOPRI5_TOLERANCES,
                  torch=torch.__version__, reference="github.com/willisma/SiT",
                  reference_commit=args.ref_commit or reference_commit(args.sit_repo))  # fmt: skip
    store["config"] = np.array(json.dumps(config))
    write_fixture(args.out, store)


if __name__ == "__main__":
    main()
