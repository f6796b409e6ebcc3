"""Generation: per-image seeds, decoding, image grids and ADM's .npz sample format.

Image i of a run is a function of (seed, i) alone: its initial noise and every ancestral step
draw from its own generator, and a random class label from its own stream, so results do not
depend on batch size or the number of ranks (bitwise wherever the kernels give each row the same
arithmetic whatever the batch; see README, "Sampling and checkpoints")."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditlab.data.codecs import Codec
from ditlab.diffusion.gaussian import ModelFn
from ditlab.diffusion.guidance import Guidance
from ditlab.diffusion.protocol import Process
from ditlab.errors import UserError
from ditlab.runtime.files import atomic_write
from ditlab.runtime.seeds import BALANCED_LABELS, IMAGE_LABELS, IMAGE_NOISE, derive_seed
from ditlab.sampling.config import check_balanced


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index` in a run seeded with `seed`."""
    return derive_seed(IMAGE_NOISE, seed, index)


def image_generators(seed: int, indices: list[int] | range, device: torch.device | str) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(image_seed(seed, i)) for i in indices]


def random_labels(seed: int, indices: list[int] | range, num_classes: int) -> torch.Tensor:
    """(N,) long: image i's class, uniform over [0, num_classes), drawn from a stream of its own
    keyed by (seed, i), so it depends on nothing else (and not on the noise generators)."""
    if seed < 0:
        raise UserError(f"--seed {seed} must be non-negative")
    draws = [np.random.default_rng([IMAGE_LABELS, seed, i]).integers(num_classes) for i in indices]
    return torch.tensor(draws, dtype=torch.long)


def balanced_labels(seed: int, n: int, classes: list[int]) -> torch.Tensor:
    """(N,) long: exactly N / K images of each of the K `classes`, in a fixed shuffled order (a
    permutation drawn from a stream keyed by (seed, N) alone, so every rank and batch size sees the
    same labels). N must be a multiple of K; the error names the nearest valid N."""
    k = len(classes)
    if seed < 0:
        raise UserError(f"--seed {seed} must be non-negative")
    check_balanced(n, k)
    order = np.random.default_rng([BALANCED_LABELS, seed, n]).permutation(n)  # (N,)
    return torch.from_numpy(np.repeat(np.asarray(classes, dtype=np.int64), n // k)[order])


def initial_noise(shape: tuple[int, ...], generators: list[torch.Generator],
                  device: torch.device | str) -> torch.Tensor:
    """(N, *shape) standard normal, row i drawn from generators[i]."""
    return torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])


@torch.no_grad()
def generate(model: ModelFn, process: Process, labels: torch.Tensor | None, seed: int | list[int],
             indices: list[int] | range, *, latent_shape: tuple[int, int, int], codec: Codec | None = None,
             device: torch.device | str = "cpu", steps: int | None = None, sampler: str | None = None,
             guidance: Guidance | None = None, cfg_scale: float = 1.0, guidance_channels: int | None = None,
             progress: bool = False, clip_denoised: bool = False, **options: Any) -> torch.Tensor:  # fmt: skip
    """Images (N, C, H, W) in about [-1, 1] for `labels` (N,) (None: unconditional), drawn by
    `process.generate` and decoded by `codec` (None: the latents themselves).

    `seed`: the run's seed, or one per image (N,) when images of several runs share a batch
    (image j is then image indices[j] of the run seeded seed[j]). `steps` and `sampler` default to
    the process's; `guidance` (or its keyword form cfg_scale, guidance_channels) is classifier-free
    guidance; `options` go to the process's `generate` as they are (e.g. DDIM's eta)."""
    if isinstance(seed, int):
        gens = image_generators(seed, indices, device)
    else:
        gens = [g for s, i in zip(seed, indices, strict=True) for g in image_generators(s, [i], device)]
    noise = initial_noise(latent_shape, gens, device)  # (N, C, h, w)
    y = labels.to(device) if labels is not None else None
    guidance = guidance if guidance is not None else Guidance(scale=cfg_scale, channels=guidance_channels)
    latents = process.generate(model, noise, y, steps=process.default_steps if steps is None else steps,
                               sampler=sampler or process.sampler_names[0], guidance=guidance, generator=gens,
                               progress=progress, clip_denoised=clip_denoised, **options)
    return codec.decode(latents) if codec is not None else latents


def quantize(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 on the same device, as the reference:
    clamp(127.5 x + 128, 0, 255), truncated."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 numpy (see `quantize`)."""
    return quantize(images).cpu().numpy()


def make_grid(images: np.ndarray, nrow: int, pad: int = 2) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows * (H + pad) + pad, nrow * (W + pad) + pad, C) image."""
    n, h, w, c = images.shape
    rows = -(-n // nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = images[i]
    return grid


def save_grid(images: np.ndarray, path: str | Path, nrow: int, captions: list[str] | None = None,
              text: dict[str, str] | None = None) -> None:
    """Write (N, H, W, C) uint8 images as one PNG grid, `nrow` images per row, with one caption
    under each image if `captions` are given, and PNG text chunks `text` (e.g. the record)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    if captions is not None:
        from ditlab.sampling.captions import captioned

        images = captioned(images, captions)
    grid = make_grid(images, nrow)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    atomic_write(path, lambda f: img.save(f, format="PNG", pnginfo=info))


def save_pngs(images: np.ndarray, indices: list[int] | range, folder: str | Path) -> None:
    """Write (N, H, W, C) uint8 images as folder/{index:06d}.png, each atomically."""
    from PIL import Image

    for image, i in zip(images, indices, strict=True):
        img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        atomic_write(Path(folder) / f"{i:06d}.png", functools.partial(img.save, format="PNG"))
