"""Extraction throughput: `extract_latents` with the real SD VAE architecture (random weights)
on synthetic ImageNet-sized JPEGs, beside the bare VAE encoder on ready-made tensors (the peer:
what the encoder alone costs for the same images and their flips). JSON on stdout.

    PYTHONPATH=src python benchmarks/extract_latents.py [--images 64 --batch-size 16 --precision auto]

On a CPU that advertises AMX but faults on it, set ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 for bf16.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from data_common import SD_VAE_CONFIG, device_name, make_jpeg_folder, make_sd_vae_folder  # noqa: E402
from dit_common import sync, write_result  # noqa: E402

from ditlab.data.codecs import load_codec  # noqa: E402
from ditlab.data.extract import extract_latents  # noqa: E402
from ditlab.options import PRECISIONS  # noqa: E402
from ditlab.runtime.precision import vae_dtype  # noqa: E402


def bare_encoder_rate(vae_dir: str, device: torch.device, dtype: torch.dtype, images: int, batch_size: int,
                      image_size: int) -> float:
    """Images/s of codec.encode alone on random tensors, each image with its flip (2 encodes)."""
    codec = load_codec(vae_dir, device=device, dtype=dtype)
    x = torch.rand(2 * batch_size, 3, image_size, image_size, device=device) * 2 - 1  # images and flips
    codec.encode(x[:2])  # warm-up
    batches = max(1, images // batch_size)
    sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        mean, std = codec.encode(x)
        mean.cpu(), std.cpu()
    sync(device)
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--workdir", default=None, help="keep images and VAE here between runs (default: a temp dir)")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or tmp
        data = make_jpeg_folder(os.path.join(work, "images"), args.images)
        vae_dir = make_sd_vae_folder(os.path.join(work, "sd-vae-random"))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = vae_dtype(args.precision, device)
        out = os.path.join(tmp, "cache")  # always fresh, so every image is encoded
        summary = extract_latents(data, out, image_size=args.image_size, vae=vae_dir, batch_size=args.batch_size,
                                  num_workers=args.num_workers, precision=args.precision, progress=False,
                                  log=lambda s: None)
        peer = bare_encoder_rate(vae_dir, device, dtype, args.images, args.batch_size, args.image_size)

    result = {
        "benchmark": "extract_latents",
        "device": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "vae": "AutoencoderKL, stabilityai/sd-vae-ft-ema config, random weights",
        "vae_config": SD_VAE_CONFIG,
        "image_size": args.image_size,
        "images": summary["encoded"],
        "batch_size": args.batch_size,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "extract_images_per_s": summary["images_per_s"],
        "peer_bare_encoder_images_per_s": peer,
        "ratio_extract_to_bare_encoder": summary["images_per_s"] / peer,
        "note": "each image is encoded with its horizontal flip (2 VAE passes); the ratio is the share of the "
                "encoder's speed that the whole pipeline (JPEG decode, ADM crop, encode, float16 shards) keeps",
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
