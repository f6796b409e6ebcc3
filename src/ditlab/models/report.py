"""The `ditlab flops` table: parameters, tokens and Gflops of every named config."""

from __future__ import annotations

import torch

from ditlab.errors import UserError
from ditlab.models.configs import MODEL_CONFIGS, create_model
from ditlab.models.flops import count_gflops


def flops_rows(image_size: int = 256, block: str = "adaln-zero", latent_factor: int = 8,
               in_channels: int = 4) -> list[dict]:
    """One row per named config, counted on the meta device (no weights allocated)."""
    if image_size % latent_factor:
        raise UserError(f"--image-size {image_size} is not a multiple of the latent factor {latent_factor}")
    input_size = image_size // latent_factor
    rows = []
    for name in MODEL_CONFIGS:
        with torch.device("meta"):
            model = create_model(name, input_size=input_size, in_channels=in_channels, block=block)
        rows.append({
            "model": name,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "tokens": model.x_embedder.num_patches,
            "gflops": count_gflops(model),
        })  # fmt: skip
    return rows


def flops_table(image_size: int = 256, block: str = "adaln-zero", latent_factor: int = 8,
                in_channels: int = 4) -> str:
    rows = flops_rows(image_size, block, latent_factor, in_channels)
    lines = [f"# {image_size}x{image_size} images, {block} blocks; Gflops = multiply-accumulates / 1e9 per image",
             f"{'model':<10} {'params':>9} {'tokens':>7} {'Gflops':>8}"]
    lines += [f"{r['model']:<10} {r['params_m']:>8.1f}M {r['tokens']:>7d} {r['gflops']:>8.2f}" for r in rows]
    return "\n".join(lines)
