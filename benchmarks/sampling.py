"""Sampling throughput with the real architectures: DiT-S/2 and DiT-XL/2 at 256x256 (random
weights), timed per sampling step (our DDPM step with per-image generators: the guided forward of
2B images, the diffusion maths, the step noise), beside the network's bare forward and the peer,
diffusers' DiTTransformer2DModel with the same weights, on the same batch; and the SD VAE decoder
(its architecture, random weights) per image. Images/s for the paper's 250 DDPM steps are DERIVED
from these rates (a full guided XL/2 image takes many minutes on a CPU); for DiT-S/2 a short
`ditlab sample` run end to end is MEASURED and set beside what the rates predict for it. JSON out.

    PYTHONPATH=src python benchmarks/sampling.py [--models DiT-S/2 DiT-XL/2 --batch-size 1 --out FILE]

On a CPU that advertises AMX but faults on it, set ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 for bf16.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from data_common import SD_VAE_CONFIG, device_name, make_sd_vae_folder  # noqa: E402
from dit_common import make_peer, sync, write_result  # noqa: E402

import ditlab  # noqa: E402
from ditlab.runtime.precision import AMP_DTYPES  # noqa: E402
from ditlab.sampling.generate import image_generators  # noqa: E402

LATENT = 32  # 256x256 images through the SD VAE (downsampling by 8)


def timed(fn, repeats: int, device: torch.device) -> float:
    """Seconds per call of fn(), after one warm-up call."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def random_dit(name: str, seed: int = 0) -> ditlab.DiT:
    """The named DiT at 256x256 with random weights everywhere (not the zero-initialised gates)."""
    model = ditlab.create_model(name, input_size=LATENT).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def step_rates(name: str, batch: int, cfg_scale: float, timed_steps: int, repeats: int, device: torch.device,
               amp: torch.dtype | None) -> dict:
    """Seconds per sampling step of `batch` images, and per forward of ours and of diffusers' DiT."""
    model = random_dit(name).to(device)
    diffusion = ditlab.Diffusion()
    y = torch.arange(batch, device=device) % 1000
    noise = torch.randn(batch, 4, LATENT, LATENT, device=device)
    rows = 2 * batch if cfg_scale != 1 else batch  # guidance batches the null label with the labels
    x, t = torch.randn(rows, 4, LATENT, LATENT, device=device), torch.full((rows,), 500, device=device)
    y_rows = torch.cat([y, torch.full_like(y, 1000)]) if cfg_scale != 1 else y
    autocast = torch.autocast(device.type, dtype=amp, enabled=amp is not None)

    def sample() -> None:
        gens = image_generators(0, range(batch), device)
        diffusion.sample(model, noise, y=y, steps=timed_steps, cfg_scale=cfg_scale, generator=gens)

    with torch.inference_mode(), autocast:
        step_s = timed(sample, 1, device) / timed_steps
        forward_s = timed(lambda: model(x, t, y_rows), repeats, device)
        peer = make_peer(model).to(device)
        peer_s = timed(lambda: peer(x, t, y_rows), repeats, device)
    gflops = ditlab.count_gflops(model)
    return {"model": name, "gflops_per_image_forward": round(gflops, 2), "images_per_batch": batch,
            "cfg_scale": cfg_scale, "forward_rows": rows,
            "step_s": step_s, "our_forward_s": forward_s, "peer_diffusers_forward_s": peer_s,
            "ratio_step_to_our_forward": step_s / forward_s, "ratio_our_to_diffusers_forward": forward_s / peer_s}


def decode_rate(vae_dir: str, batch: int, repeats: int, device: torch.device) -> float:
    """Seconds per image of the SD VAE decoder (its architecture, random weights) at 256x256."""
    from ditlab.data.codecs import load_codec

    codec = load_codec(vae_dir, device=device)
    z = torch.randn(batch, 4, LATENT, LATENT, device=device)
    with torch.inference_mode():
        return timed(lambda: codec.decode(z), repeats, device) / batch


def end_to_end(vae_dir: str, work: str, images: int, steps: int, batch: int, cfg_scale: float,
               device: torch.device) -> dict:
    """`ditlab sample` on a DiT-S/2 in the authors' format (random weights) through the SD VAE architecture."""
    from ditlab.sampling.run import sample_to_files

    ckpt = os.path.join(work, "DiT-S-2-random.pt")
    torch.save(random_dit("DiT-S/2").state_dict(), ckpt)
    summary = sample_to_files(ckpt, os.path.join(work, "e2e.npz"), num_samples=images, model="DiT-S/2",
                              image_size=256, vae=vae_dir, steps=steps, cfg_scale=cfg_scale, batch_size=batch,
                              device=device.type, progress=False)
    return {"model": "DiT-S/2", "images": images, "steps": steps, "cfg_scale": cfg_scale, "batch_size": batch,
            "seconds": summary["seconds"], "measured_images_per_s": summary["images_per_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["DiT-S/2", "DiT-XL/2"])
    p.add_argument("--batch-size", type=int, default=1, help="images per batch (guided: 2x forward rows)")
    p.add_argument("--cfg-scales", type=float, nargs="+", default=[1.5, 1.0],
                   help="1.5: the paper's FID-50K setting (guided); 1.0: unguided")
    p.add_argument("--timed-steps", type=int, default=2, help="sampler steps timed per configuration")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per network")
    p.add_argument("--real-steps", type=int, default=250, help="steps of the derived figures (the paper's 250)")
    p.add_argument("--e2e-images", type=int, default=2, help="DiT-S/2 end-to-end images (0: skip)")
    p.add_argument("--e2e-steps", type=int, default=20)
    p.add_argument("--precision", default="fp32", choices=list(AMP_DTYPES))
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = AMP_DTYPES[args.precision]
    with tempfile.TemporaryDirectory() as work:
        vae_dir = make_sd_vae_folder(os.path.join(work, "sd-vae-random"))
        decode_s = decode_rate(vae_dir, args.batch_size, 1, device)
        rows = []
        for name in args.models:
            for cfg_scale in args.cfg_scales:
                r = step_rates(name, args.batch_size, cfg_scale, args.timed_steps, args.repeats, device, amp)
                per_image = (args.real_steps * r["step_s"] + args.batch_size * decode_s) / args.batch_size
                r[f"derived_images_per_s_{args.real_steps}_ddpm_steps"] = 1 / per_image
                r[f"derived_seconds_per_image_{args.real_steps}_ddpm_steps"] = per_image
                rows.append(r)
        e2e = None
        if args.e2e_images:
            cfg = args.cfg_scales[0]
            e2e = end_to_end(vae_dir, work, args.e2e_images, args.e2e_steps, args.batch_size, cfg, device)
            s2 = next((r for r in rows if r["model"] == "DiT-S/2" and r["cfg_scale"] == cfg), None)
            if s2 is not None:
                batches = math.ceil(args.e2e_images / args.batch_size)
                predicted = args.e2e_images / (batches * args.e2e_steps * s2["step_s"] + args.e2e_images * decode_s)
                e2e.update(predicted_images_per_s=predicted, ratio_measured_to_predicted=e2e[
                    "measured_images_per_s"] / predicted)
    result = {
        "benchmark": "sampling",
        "device": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "precision": args.precision,
        "image_size": 256,
        "vae": "AutoencoderKL, stabilityai/sd-vae-ft-ema config, random weights",
        "vae_config_block_out_channels": SD_VAE_CONFIG["block_out_channels"],
        "vae_decode_s_per_image": decode_s,
        "steps": rows,
        "end_to_end": e2e,
        "note": f"step_s is measured; derived_* = batch / ({args.real_steps} x step_s + batch x decode) are computed "
                "from it, not run. The peer is diffusers' DiTTransformer2DModel forward with the same weights "
                "(timestep frequencies set to the reference's) on the same rows.",
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
