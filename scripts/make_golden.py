"""Write tests/data/golden_dit_reference.npz: inputs, weights and outputs of the authors' DiT code
(github.com/facebookresearch/DiT: its models.py and its diffusion/ package, which is ADM's), for
tests/test_golden_reference.py to compare ditlab with, without the reference installed.

    python scripts/make_golden.py --dit-repo PATH/TO/facebookresearch/DiT [--out FILE] [--ref-commit SHA]

Run it once, in an environment with the reference's imports (torch, numpy, timm). timm imports
torchvision, which this script never uses: an empty stand-in module is put in its place, so a
missing or broken torchvision does not matter. This script does not import ditlab, so the fixture
is independent of it.

What is stored (float32 unless said otherwise; the reference computes its diffusion maths in float32,
its tables and respaced betas in float64; kept timesteps are int16):
- two tiny DiTs (8x8x4 input, patch 2, hidden 32, depth 2, 4 heads, 10 classes; learned sigma and
  fixed variance), their state_dicts under "model_sigma1/" and "model_sigma0/". Every trainable
  weight is random (std 0.05, so adaLN-Zero is not the identity) and rounded to float16 (stored
  as float16; the reference ran with exactly these values in float32);
- the network: forward outputs, and guided forwards (cfg on 3 channels as the reference does it,
  and on all 4 channels computed the same way);
- the diffusion maths, on a fixed synthetic model output (eps ~ N(0, 1), v ~ U(-1, 1)) that does
  not depend on the network: the kept timesteps and betas of several spacings, p_mean_variance
  (with and without clipping, learned and fixed variance), training_losses, and the original
  timesteps and x_t the model was called with;
- training_losses with the real networks (1000 and 250 steps);
- guided DDIM (eta 0) and guided DDPM samples from given x_T, with the DDPM step noise stored
  (rounded to float16) so that a sampler can replay it; one unguided DDPM with fixed variance."""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch

NULL = 10  # the tiny models' null label (= num_classes)
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=NULL)
C = TINY["in_channels"]
N = 4  # batch of the network checks and samples
M = 6  # batch of the diffusion-maths checks (shape (M, C, 4, 4))
MATH_SHAPE = (M, C, 4, 4)
WEIGHT_STD = 0.05
SPACINGS = (1000, 250, 27, 10)  # p_mean_variance and training losses on the synthetic output
NETWORK_LOSS_SPACINGS = (1000, 250)
TIMESTEP_COUNTS = (10, 20, 21, 23, 25, 27, 35, 50, 100, 250, 500, 1000)  # kept timesteps stored for each
CFG_SCALE = 4.0
DDIM_STEPS = (10, 250)
DDPM_CFG_SCALE = 1.5
DDPM_STEPS = (10, 25)
SEED = 0
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "golden_dit_reference.npz"


# ---- stand-ins for packages the references import but never call (torchvision, fairscale) ----------
# The other golden scripts (make_golden_*.py) take these helpers from here.


class _Anything(type):
    """Metaclass of the placeholders: any attribute of one is another, distinct and kept, placeholder
    (so that InterpolationMode.BILINEAR and InterpolationMode.BICUBIC are different dictionary keys)."""

    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        placeholder = _Anything(name, (), {})
        setattr(cls, name, placeholder)
        return placeholder


def _module_getattr(module: types.ModuleType):
    """A module __getattr__ (PEP 562) making each missing name a placeholder class, kept in the module."""

    def getattr_(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        placeholder = _Anything(name, (), {})
        setattr(module, name, placeholder)
        return placeholder

    return getattr_


class _StubPackages(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves each package of `names` and its submodules as an empty package whose names are placeholders."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _module_getattr(module)
        module.__version__ = "0.0.0"
        return module

    def exec_module(self, module) -> None:
        pass


def stub_packages(*names: str) -> None:
    """Replace the packages `names` (and any already imported) by stand-ins for the rest of the process."""
    for name in [m for m in sys.modules if m.split(".")[0] in names]:
        del sys.modules[name]
    sys.meta_path.insert(0, _StubPackages(names))


def stub_torchvision() -> None:
    stub_packages("torchvision")


# ---- helpers -----------------------------------------------------------------------------------------


def half_rounded(t: torch.Tensor) -> torch.Tensor:
    """t rounded to float16 and back: values that float16 storage keeps exactly."""
    return t.half().float()


def randomized(model: torch.nn.Module, seed: int, std: float = WEIGHT_STD) -> torch.nn.Module:
    """Every trainable parameter random (std `std`), rounded to float16 values; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(half_rounded(torch.randn(p.shape, generator=g) * std))
    return model.eval()


def randomized_with_norms(model: torch.nn.Module, seed: int, std: float, qkv_std: float) -> torch.nn.Module:
    """Trainable weights random and float16-rounded: norm weights 1 + noise, attention's qkv std
    `qkv_std` (peaked attention), everything else std `std`; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g) * (qkv_std if "attn.qkv" in name else std)
                is_norm_weight = "norm" in name.split(".")[-2] and name.endswith("weight")
                p.copy_(half_rounded(noise + 1.0 if is_norm_weight else noise))
    return model.eval()


def all_channels_cfg(model: torch.nn.Module):
    """The reference's guided forward (2N batch, the first half conditional), guiding all C eps channels:
    what its forward_with_cfg computes with its commented-out alternative line."""

    def forward(x, t, y, cfg_scale):
        half = x[: len(x) // 2]
        out = model(torch.cat([half, half]), t, y)  # (2N, 2C, H, W)
        cond, uncond = out[:, :C].chunk(2)  # (N, C, H, W) each
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), out[:, C:]], dim=1)  # (2N, 2C, H, W)

    return forward


class SyntheticModel:
    """A stand-in network returning a fixed output (M, 2C or C, ...); records what it was called with."""

    def __init__(self, output: torch.Tensor):
        self.output = output
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x, t, **kwargs):
        self.calls.append((x.detach().clone(), t.detach().clone()))
        return self.output


class StepNoise:
    """A replacement for torch.randn_like that hands out stored rows (n, N, ...) in order, for a batch of
    N or 2N (the 2N state of guided sampling gets the same rows for its null half)."""

    def __init__(self, rows: torch.Tensor):
        self.rows, self.used = rows, 0

    def __call__(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        rows = self.rows[self.used]  # (N, C, H, W)
        self.used += 1
        return rows if x.shape[0] == rows.shape[0] else torch.cat([rows, rows])


def numpy_of(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def reference_commit(repo: str) -> str:
    try:
        out = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_fixture(out: str | Path, store: dict[str, np.ndarray]) -> Path:
    """`store` as a compressed .npz at `out` (its folder made)."""
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_path, **store)
    print(f"wrote {out_path} ({out_path.stat().st_size / 1024:.0f} KiB, {len(store)} arrays)")
    return out_path


# ---- the fixture -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dit-repo", required=True, help="a checkout of github.com/facebookresearch/DiT")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"where to write the fixture (default {DEFAULT_OUT})")
    parser.add_argument("--ref-commit", default=None, help="the checkout's commit, recorded in the fixture")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(SEED)  # only the reference's unused draws (DDIM's eta-0 noise) come from here
    stub_torchvision()
    sys.path.insert(0, args.dit_repo)
    from diffusion import create_diffusion  # the reference
    from diffusion import gaussian_diffusion as reference_gd
    from models import DiT

    store: dict[str, np.ndarray] = {}
    g = torch.Generator().manual_seed(SEED)

    # the networks
    models = {}
    for sigma in (1, 0):
        model = randomized(DiT(**TINY, learn_sigma=bool(sigma)), seed=1 + sigma)
        models[sigma] = model
        for k, v in model.state_dict().items():
            trainable = k != "pos_embed"  # the fixed sin-cos table keeps its float32 values
            store[f"model_sigma{sigma}/{k}"] = numpy_of(v.half() if trainable else v)

    x = torch.randn(N, C, 8, 8, generator=g)
    t = torch.tensor([0, 999, *torch.randint(1, 999, (N - 2,), generator=g).tolist()])
    y = torch.randint(0, NULL, (N,), generator=g)
    y_with_null = y.clone()
    y_with_null[1] = NULL
    store.update(net_x=numpy_of(x), net_t=numpy_of(t), net_y=numpy_of(y_with_null), cfg_y=numpy_of(y))
    x2, t2, y2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL)])
    with torch.no_grad():
        for sigma, model in models.items():
            store[f"net_out_sigma{sigma}"] = numpy_of(model(x, t, y_with_null))
        store["cfg_out_channels3"] = numpy_of(models[1].forward_with_cfg(x2, t2, y2, CFG_SCALE)[:N])
        store["cfg_out_channels4"] = numpy_of(all_channels_cfg(models[1])(x2, t2, y2, CFG_SCALE)[:N])

    # respacing
    for n in TIMESTEP_COUNTS:
        ref = create_diffusion("" if n == 1000 else str(n))
        store[f"timesteps_{n}"] = np.array(sorted(ref.timestep_map), dtype=np.int16)
        if n in SPACINGS:
            store[f"betas_{n}"] = np.asarray(ref.betas, dtype=np.float64)

    # the diffusion maths on a synthetic model output
    x0 = torch.randn(MATH_SHAPE, generator=g).clamp(-1.2, 1.2)  # beyond +-0.999: the open-ended bins
    noise = torch.randn(MATH_SHAPE, generator=g)
    x_t = torch.randn(MATH_SHAPE, generator=g)
    eps = torch.randn(MATH_SHAPE, generator=g)
    v = torch.rand(MATH_SHAPE, generator=g) * 2 - 1
    output = torch.cat([eps, v], dim=1)  # (M, 2C, 4, 4)
    store.update(math_x0=numpy_of(x0), math_noise=numpy_of(noise), math_xt=numpy_of(x_t), math_out=numpy_of(output))
    for n in SPACINGS:
        ts = torch.tensor([0, 1, *torch.randint(2, n - 2, (M - 4,), generator=g).tolist(), n - 2, n - 1])
        store[f"math_t_{n}"] = numpy_of(ts)
        for sigma in (1, 0):
            ref = create_diffusion("" if n == 1000 else str(n), learn_sigma=bool(sigma))
            fake = SyntheticModel(output if sigma else eps)
            variance = None
            for clip in (False, True):
                out = ref.p_mean_variance(fake, x_t, ts, clip_denoised=clip, model_kwargs={})
                key = f"pmv_{n}_sigma{sigma}"
                store[f"{key}_clip{int(clip)}_mean"] = numpy_of(out["mean"])
                store[f"{key}_clip{int(clip)}_pred_xstart"] = numpy_of(out["pred_xstart"])
                if variance is None:
                    variance = (out["variance"], out["log_variance"])
                    store[f"{key}_variance"] = numpy_of(out["variance"])
                    store[f"{key}_log_variance"] = numpy_of(out["log_variance"])
                assert torch.equal(variance[1], out["log_variance"]), "the variance must not depend on clipping"
            store[f"math_called_t_{n}"] = numpy_of(fake.calls[0][1])
            fake.calls.clear()
            losses = ref.training_losses(fake, x0, ts, model_kwargs={}, noise=noise)
            for k in ("loss", "mse") + (("vb",) if sigma else ()):
                store[f"losses_{n}_sigma{sigma}_{k}"] = numpy_of(losses[k])
            store[f"losses_{n}_xt"] = numpy_of(fake.calls[0][0])

    # training losses with the real networks
    e2e_x0 = torch.randn(N, C, 8, 8, generator=g).clamp(-1.2, 1.2)
    e2e_noise = torch.randn(N, C, 8, 8, generator=g)
    store.update(e2e_x0=numpy_of(e2e_x0), e2e_noise=numpy_of(e2e_noise))
    for n in NETWORK_LOSS_SPACINGS:
        ts = torch.tensor([0, *torch.randint(1, n - 1, (N - 2,), generator=g).tolist(), n - 1])
        store[f"e2e_t_{n}"] = numpy_of(ts)
        for sigma, model in models.items():
            ref = create_diffusion("" if n == 1000 else str(n), learn_sigma=bool(sigma))
            with torch.no_grad():
                losses = ref.training_losses(model, e2e_x0, ts, model_kwargs=dict(y=y), noise=e2e_noise)
            for k in ("loss", "mse") + (("vb",) if sigma else ()):
                store[f"e2e_losses_{n}_sigma{sigma}_{k}"] = numpy_of(losses[k])

    # sampling
    z = torch.randn(N, C, 8, 8, generator=g)
    store["sample_noise"] = numpy_of(z)
    z2 = torch.cat([z, z])
    guided = {3: models[1].forward_with_cfg, 4: all_channels_cfg(models[1])}
    for steps in DDIM_STEPS:
        ref = create_diffusion(str(steps))
        for channels, forward in guided.items():
            out = ref.ddim_sample_loop(forward, z2.shape, z2, clip_denoised=False, eta=0.0, device="cpu",
                                       model_kwargs=dict(y=y2, cfg_scale=CFG_SCALE))  # fmt: skip
            store[f"ddim_{steps}_channels{channels}"] = numpy_of(out[:N])
    original_randn_like = reference_gd.th.randn_like
    try:
        for steps in DDPM_STEPS:
            rows = half_rounded(torch.randn(steps, N, C, 8, 8, generator=g))  # one a step; the last is masked
            store[f"ddpm_step_noise_{steps}"] = numpy_of(rows[: steps - 1].half())
            runs = {}  # key -> (process, model, x_T, model_kwargs)
            for channels, forward in guided.items():
                kwargs = dict(y=y2, cfg_scale=DDPM_CFG_SCALE)
                runs[f"ddpm_{steps}_channels{channels}"] = (create_diffusion(str(steps)), forward, z2, kwargs)
            if steps == DDPM_STEPS[0]:  # unguided, with fixed variance
                fixed = create_diffusion(str(steps), learn_sigma=False)
                runs[f"ddpm_{steps}_unguided_sigma0"] = (fixed, models[0], z, dict(y=y))
            for key, (process, forward, start, kwargs) in runs.items():
                reference_gd.th.randn_like = step_noise = StepNoise(rows)
                with torch.no_grad():
                    out = process.p_sample_loop(forward, start.shape, start, clip_denoised=False,
                                                model_kwargs=kwargs, device="cpu")  # fmt: skip
                assert step_noise.used == steps, f"{key}: {step_noise.used} step noises drawn for {steps} steps"
                store[key] = numpy_of(out[:N])
    finally:
        reference_gd.th.randn_like = original_randn_like

    config = dict(model=TINY, weight_std=WEIGHT_STD, cfg_scale=CFG_SCALE, ddpm_cfg_scale=DDPM_CFG_SCALE,
                  spacings=SPACINGS, network_loss_spacings=NETWORK_LOSS_SPACINGS, timestep_counts=TIMESTEP_COUNTS,
                  ddim_steps=DDIM_STEPS, ddpm_steps=DDPM_STEPS, torch=torch.__version__,
                  reference="github.com/facebookresearch/DiT",
                  reference_commit=args.ref_commit or reference_commit(args.dit_repo))  # fmt: skip
    store["config"] = np.array(json.dumps(config))
    write_fixture(args.out, store)


if __name__ == "__main__":
    main()
