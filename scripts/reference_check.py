"""Compare ditlab.Diffusion with the original DiT code (its `diffusion/` package, which is ADM's)
on the same model, inputs and noise, and print the largest differences as JSON.

    PYTHONPATH=src python scripts/reference_check.py --dit-repo PATH/TO/facebookresearch/DiT

The reference is imported from the given checkout at run time (it needs only numpy and torch).
Covered: training losses (1000 and 250 steps), p_mean_variance over 1000, 250 and 10 steps (with
and without clipping, learned and fixed variance), guided DDIM (eta 0) and guided DDPM with shared
step noise, guidance on 3 and on all 4 channels (the reference's forward_with_cfg)."""

from __future__ import annotations

import argparse
import json
import sys

import torch

import ditlab

NULL = 10  # the tiny model's null label


def tiny_model(learn_sigma: bool) -> torch.nn.Module:
    model = ditlab.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4,
                       num_classes=NULL, learn_sigma=learn_sigma).eval()  # fmt: skip
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def forward_with_cfg(model, channels: int):
    """The reference's guided forward on a 2N batch whose first half is conditional."""

    def forward(x, t, y, cfg_scale):
        half = x[: len(x) // 2]
        out = model(torch.cat([half, half]), t, y)
        cond, uncond = out[:, :channels].chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), out[:, channels:]], dim=1)

    return forward


def half_batch_noise(gen: torch.Generator):
    """randn_like for a 2N state: N rows from `gen` (as ours draws them), repeated for the null half."""

    def randn_like(x: torch.Tensor) -> torch.Tensor:
        rows = torch.randn(x.shape[0] // 2, *x.shape[1:], generator=gen)  # (N, C, H, W)
        return torch.cat([rows, rows])  # (2N, C, H, W)

    return randn_like


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dit-repo", required=True, help="a checkout of github.com/facebookresearch/DiT")
    args = parser.parse_args()
    sys.path.insert(0, args.dit_repo)
    from diffusion import create_diffusion  # the reference
    from diffusion import gaussian_diffusion as reference_gd

    g = torch.Generator().manual_seed(0)
    N = 6
    x0 = torch.randn(N, 4, 8, 8, generator=g).clamp(-1.2, 1.2)
    noise = torch.randn(N, 4, 8, 8, generator=g)
    y = torch.randint(0, NULL, (N,), generator=g)
    report: dict[str, float] = {}

    for learn_sigma in (True, False):
        model, ours = tiny_model(learn_sigma), ditlab.Diffusion(learn_sigma=learn_sigma)
        for n in (1000, 250, 10):
            ref = create_diffusion("" if n == 1000 else str(n), learn_sigma=learn_sigma)
            spaced = ours.respace(n)
            report[f"timesteps_{n}"] = float(spaced.timesteps.tolist() != sorted(ref.timestep_map))
            t = torch.randint(0, n, (N,), generator=g)
            t[0], t[-1] = 0, n - 1  # the decoder term and the last step
            r = ref.training_losses(model, x0, t, dict(y=y), noise=noise)
            o = spaced.training_losses(model, x0, t, y=y, noise=noise)
            for k in ("loss", "mse") + (("vb",) if learn_sigma else ()):
                report[f"training_losses_{n}_{k}_sigma{int(learn_sigma)}"] = max_diff(r[k], o[k])
            for clip in (False, True):
                r = ref.p_mean_variance(model, noise, t, clip_denoised=clip, model_kwargs=dict(y=y))
                o = spaced.p_mean_variance(model(noise, spaced.timesteps[t], y), noise, t, clip_denoised=clip)
                for k, ko in (("mean", "mean"), ("log_variance", "log_variance"), ("pred_xstart", "pred_x0")):
                    report[f"p_mean_variance_{n}_clip{int(clip)}_{ko}_sigma{int(learn_sigma)}"] = max_diff(r[k], o[ko])

    model, ours = tiny_model(True), ditlab.Diffusion()
    z2, y2 = torch.cat([noise, noise]), torch.cat([y, torch.full_like(y, NULL)])
    for steps in (10, 250):
        ref = create_diffusion(str(steps))
        for channels in (3, 4):
            kwargs = dict(y=y2, cfg_scale=4.0)
            r = ref.ddim_sample_loop(forward_with_cfg(model, channels), z2.shape, z2, clip_denoised=False,
                                     model_kwargs=kwargs, eta=0.0, device="cpu")[:N]  # fmt: skip
            o = ours.sample(model, noise, y=y, steps=steps, sampler="ddim", cfg_scale=4.0,
                            guidance_channels=3 if channels == 3 else None)  # fmt: skip
            report[f"guided_ddim_{steps}_channels{channels}"] = max_diff(r, o)
            # DDPM: the reference draws its step noise with randn_like over 2N rows; feed it ours
            original = reference_gd.th.randn_like
            reference_gd.th.randn_like = half_batch_noise(torch.Generator().manual_seed(7))
            try:
                r = ref.p_sample_loop(forward_with_cfg(model, channels), z2.shape, z2, clip_denoised=False,
                                      model_kwargs=dict(y=y2, cfg_scale=1.5), device="cpu")[:N]  # fmt: skip
            finally:
                reference_gd.th.randn_like = original
            o = ours.sample(model, noise, y=y, steps=steps, sampler="ddpm", cfg_scale=1.5,
                            guidance_channels=3 if channels == 3 else None,
                            generator=torch.Generator().manual_seed(7))  # fmt: skip
            report[f"guided_ddpm_{steps}_channels{channels}"] = max_diff(r, o)
    report["max"] = max(report.values())
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
