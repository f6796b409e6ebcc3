"""Shared by the data benchmarks: the SD VAE architecture with random weights, and a folder of
synthetic ImageNet-sized JPEGs. Run the benchmarks from the repository root with PYTHONPATH=src."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

# The AutoencoderKL config of stabilityai/sd-vae-ft-ema (its config.json on the hub): 4 stages of
# 128, 256, 512, 512 channels, 2 ResNet blocks each, 4 latent channels, downsampling by 8.
SD_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
}
IMAGENET_SIZES = [(500, 375), (500, 333), (375, 500), (640, 480), (500, 400), (333, 500)]  # common ImageNet shapes


def make_sd_vae_folder(path: str, seed: int = 0) -> str:
    """Save a randomly initialised AutoencoderKL with SD_VAE_CONFIG to `path` (as save_pretrained does)."""
    from diffusers import AutoencoderKL

    if not os.path.isfile(os.path.join(path, "config.json")):
        torch.manual_seed(seed)
        AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(path)
    return path


def make_jpeg_folder(root: str, n: int, classes: int = 4, seed: int = 0) -> str:
    """n JPEGs (quality 90) of ImageNet-like sizes and smooth content, spread over `classes` folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = os.path.join(root, f"class{i % classes:03d}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"img{i:06d}.jpg")
        if os.path.exists(path):
            continue
        w, h = IMAGENET_SIZES[i % len(IMAGENET_SIZES)]
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        arr = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3))  # texture on smooth colour
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return root


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo where there is one."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from ditlab.runtime.cpu_facts import cpu_model

    return cpu_model()
