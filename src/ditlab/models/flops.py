"""Analytic compute of one DiT forward pass, counted as the paper counts "Gflops":
multiply-accumulates for one image, every Linear and the patch convolution, plus the two
attention matmuls (QK^T and AV). Elementwise work (norms, activations, softmax) is not counted,
so of the modern block options only SwiGLU changes the count (its three matrices: w12 holds two);
RMSNorm, QK-norm and RoPE add no multiply-accumulates.

Each block design counts its own extra work (`models.blocks`); everything is derived from the
config, so a model built on the meta device (e.g. DiT-XL/2 at 512x512) is counted without
allocating a weight. Also the `ditlab flops` table."""

from __future__ import annotations

import torch

from ditlab.errors import UserError
from ditlab.models.blocks import block_macs, final_macs
from ditlab.models.configs import MODEL_CONFIGS, create_model
from ditlab.models.dit import DiT
from ditlab.models.layers import mlp_hidden

# Bounds of the `ditlab flops` table: 32x the paper's 256 px, and far more channels than any VAE has.
MAX_IMAGE_SIZE = 8192
MAX_IN_CHANNELS = 1024


def count_macs(model: DiT) -> int:
    """Multiply-accumulates of one forward pass of one image through `model`."""
    cfg, block = model.cfg, model.block_type
    D, p, C = cfg.hidden_size, cfg.patch_size, cfg.in_channels
    T = (cfg.input_size // p) ** 2
    n_cond = 2 if cfg.num_classes else 1  # conditioning tokens: [t, y] or [t]
    macs = T * p * p * C * D  # patch embedding
    macs += model.t_embedder.frequency_size * D + D * D  # timestep MLP
    tokens = T + n_cond if block.extra_tokens else T
    hidden = mlp_hidden(cfg.mlp, D, cfg.mlp_ratio)
    per_block = block_macs(tokens, D, hidden, cfg.mlp) + block.extra_macs(T, n_cond, D)
    macs += cfg.depth * per_block
    return macs + final_macs(T, D, p, cfg.out_channels, block.adaptive_final)


def count_gflops(model: DiT) -> float:
    """The paper's "Gflops": multiply-accumulates of one forward of one image / 1e9."""
    return count_macs(model) / 1e9


def flops_rows(image_size: int = 256, block: str = "adaln-zero", latent_factor: int = 8,
               in_channels: int = 4, **options: str) -> list[dict]:
    """One row per named config, counted on the meta device (no weights allocated); `options` are the
    modern block options (norm, qk_norm, mlp, pos)."""
    if image_size < 1 or latent_factor < 1 or in_channels < 1:
        raise UserError(f"--image-size {image_size}, --latent-factor {latent_factor} and --in-channels "
                        f"{in_channels} must be positive")
    if image_size > MAX_IMAGE_SIZE or in_channels > MAX_IN_CHANNELS or latent_factor > image_size:
        raise UserError(f"--image-size {image_size} (at most {MAX_IMAGE_SIZE}), --in-channels {in_channels} "
                        f"(at most {MAX_IN_CHANNELS}), --latent-factor {latent_factor} (at most the image size): "
                        "out of range")
    if image_size % latent_factor:
        raise UserError(f"--image-size {image_size} is not a multiple of the latent factor {latent_factor}")
    input_size = image_size // latent_factor
    rows = []
    for name in MODEL_CONFIGS:
        with torch.device("meta"):
            model = create_model(name, input_size=input_size, in_channels=in_channels, block=block, **options)
        rows.append({
            "model": name,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "tokens": model.x_embedder.num_patches,
            "gflops": count_gflops(model),
        })  # fmt: skip
    return rows


def flops_table(image_size: int = 256, block: str = "adaln-zero", latent_factor: int = 8,
                in_channels: int = 4, **options: str) -> str:
    rows = flops_rows(image_size, block, latent_factor, in_channels, **options)
    chosen = "".join(f", {k.replace('_', '-')} {v}" for k, v in options.items() if v is not None)
    lines = [f"# {image_size}x{image_size} images, {block} blocks{chosen}; Gflops = multiply-accumulates / 1e9 "
             "per image",
             f"{'model':<10} {'params':>9} {'tokens':>7} {'Gflops':>8}"]
    lines += [f"{r['model']:<10} {r['params_m']:>8.1f}M {r['tokens']:>7d} {r['gflops']:>8.2f}" for r in rows]
    return "\n".join(lines)
