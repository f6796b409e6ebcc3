"""REPA's alignment loss (Yu et al. 2025, sihyun-yu/REPA, its loss.py): the negative cosine
similarity between the projector's prediction from the DiT's tokens after block K
(`DiT(..., return_projection=True)`) and a frozen encoder's patch features of the same clean image,
averaged over tokens; the training loss adds REPA_COEFF times its batch mean to the diffusion or
flow loss. Where the encoder's patch grid differs from the DiT's token grid, the encoder's feature
map is resized to the DiT's grid by area interpolation (REPA itself pairs grids of equal size:
DINOv2-B/14 at 224 px and DiT-XL/2 at 256 px are both 16 x 16)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ditlab.errors import UserError

REPA_COEFF = 0.5  # REPA's proj_coeff (lambda)


def grid_of(tokens: int, what: str) -> int:
    """The side of a square grid of `tokens` tokens."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise UserError(f"{what}: {tokens} tokens do not form a square grid")
    return side


def resize_features(features: torch.Tensor, grid: int) -> torch.Tensor:
    """Encoder patch features (N, S, Dz) in row-major order on a sqrt(S) x sqrt(S) grid -> (N, grid**2, Dz),
    resized by area interpolation (each target cell averages the source cells it covers); unchanged
    where the grids agree."""
    N, S, Dz = features.shape
    side = grid_of(S, "encoder features")
    if side == grid:
        return features
    # einops: "n (h w) d -> n d h w"
    fmap = features.transpose(1, 2).reshape(N, Dz, side, side)  # (N, Dz, s, s)
    fmap = F.interpolate(fmap.float(), size=(grid, grid), mode="area").to(features.dtype)  # (N, Dz, G, G)
    return fmap.flatten(2).transpose(1, 2)  # (N, G * G, Dz)


def projection_loss(projection: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Per image (N,): the mean over the T tokens of -cos(projection, features), where the projector's
    prediction is (N, T, Dz) and the encoder's patch features (N, S, Dz) are resized to T tokens first.
    REPA's proj_loss is the batch mean of this; multiply by REPA_COEFF (or --repa-coeff) and add."""
    if projection.shape[-1] != features.shape[-1]:
        raise UserError(f"REPA: the projector predicts {projection.shape[-1]} features per token, the encoder gives "
                        f"{features.shape[-1]}")
    target = resize_features(features, grid_of(projection.shape[1], "DiT tokens"))  # (N, T, Dz)
    # in float32 whatever the autocast: the loss is a small reduction over (N, T, Dz)
    cos = (F.normalize(projection.float(), dim=-1) * F.normalize(target.float(), dim=-1)).sum(dim=-1)  # (N, T)
    return -cos.mean(dim=1)  # (N,)


class Alignment:
    """REPA in a training run: the frozen encoder (None when the data carries cached features) and lambda.

    `targets(clean)` turns what the data gives for REPA (clean images (N, C, H, W) in [-1, 1], flipped as
    the example was; or cached features (N, S, Dz)) into the encoder's features (N, S, Dz)."""

    def __init__(self, encoder: torch.nn.Module | None, coeff: float):
        self.encoder, self.coeff = encoder, coeff

    def targets(self, clean: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            return clean.float()
        with torch.no_grad():
            return self.encoder(clean)
