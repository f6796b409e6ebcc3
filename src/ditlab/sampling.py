"""Generation: per-image seeds, decoding, image grids and ADM's .npz sample format.

Image i of a run is a function of (seed, i) alone: its initial noise and every ancestral step
draw from its own generator, so results do not depend on batch size or the number of ranks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

SEED_STRIDE = 1_000_003  # separates the per-image seed streams of different run seeds


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index` in a run seeded with `seed`."""
    return seed * SEED_STRIDE + index


def image_generators(seed: int, indices: list[int] | range, device: torch.device | str) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(image_seed(seed, i)) for i in indices]


def initial_noise(shape: tuple[int, ...], generators: list[torch.Generator],
                  device: torch.device | str) -> torch.Tensor:
    """(N, *shape) standard normal, row i drawn from generators[i]."""
    return torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])


@torch.no_grad()
def generate(model: torch.nn.Module, diffusion: Any, labels: torch.Tensor | None, seed: int, indices: list[int] | range,
             *, latent_shape: tuple[int, int, int], codec: Any = None, device: torch.device | str = "cpu",
             **sample_kwargs: Any) -> torch.Tensor:
    """Images (N, C, H, W) in about [-1, 1] for `labels` (N,) (None: unconditional).

    sample_kwargs go to `diffusion.sample` (steps, sampler, cfg_scale, guidance_channels, eta, ...)."""
    gens = image_generators(seed, indices, device)
    noise = initial_noise(latent_shape, gens, device)  # (N, C, h, w)
    y = labels.to(device) if labels is not None else None
    latents = diffusion.sample(model, noise, y=y, generator=gens, **sample_kwargs)
    return codec.decode(latents) if codec is not None else latents


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, as the reference: clamp(127.5 x + 128)."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()


def make_grid(images: np.ndarray, nrow: int, pad: int = 2) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows * (H + pad) + pad, nrow * (W + pad) + pad, C) image."""
    n, h, w, c = images.shape
    rows = -(-n // nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = images[i]
    return grid


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_grid(images: np.ndarray, path: str | Path, nrow: int) -> None:
    """Write (N, H, W, C) uint8 images as one PNG grid, `nrow` images per row."""
    from PIL import Image

    grid = make_grid(images, nrow)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    _atomic_write(Path(path), lambda tmp: img.save(tmp, format="PNG"))


def save_npz(images: np.ndarray, labels: np.ndarray | None, path: str | Path) -> None:
    """ADM's sample format: arr_0 (N, H, W, C) uint8, arr_1 (N,) labels when conditional."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{path}: samples must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    arrays = [images] if labels is None else [images, np.asarray(labels, dtype=np.int64)]
    _atomic_write(Path(path), lambda tmp: np.savez(tmp, *arrays))
