"""REPA's frozen encoder: the network whose patch features the DiT's projector learns to predict
(`models.repa`, `training.repa`). It takes images as ditlab's data gives them, (N, C, H, W) in
[-1, 1] (one or three channels), clean and already flipped as the training example was, and returns
patch features (N, S, Dz) on a square grid of S tokens.

- DINOv2 (by released name or a local weight file in the official layout, any size): the images
  are mapped to [0, 1], one channel repeated to RGB, resized bicubically (antialiased) to 224 px per
  256 px of input (REPA's rule, at least 224), normalised with ImageNet's mean and std, and the
  final LayerNorm's patch tokens are returned: DINOv2-B/14 at 224 px gives 16 x 16 x 768.
- A denoising autoencoder ditlab trains on a named dataset's training images without labels
  (`fashion-mnist-dae`, `digits-dae`; `evaluation.dae_encoder`): one-channel images resized to its
  training size; Fashion's gives 16 x 16 x 32, the digits' 4 x 4 x 64.
- Any torch module (the Python API, for one's own data): called on the images as they are, it
  must return (N, S, Dz).

The encoder is frozen (eval mode, no gradients) and deterministic, so its features of a fixed image
can be computed once (`extract-latents --repa-encoder`) instead of at every step."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ditlab.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_RESOLUTION = 224  # REPA's: 224 px per 256 px of image
REPA_INPUT_PER = 256
MODULE_PREFIX = "module:"  # the recorded --repa-encoder of an encoder given through the Python API


class RepaEncoder(nn.Module):
    """A frozen encoder behind one call: images (N, C, H, W) in [-1, 1] -> patch features (N, S, Dz).

    `network` is a DINOv2 (`dinov2=True`: DINOv2's preprocessing and its patch tokens) or any module
    mapping the images as given to (N, S, Dz). `name` is what a run records (--repa-encoder)."""

    mean: torch.Tensor  # (1, 3, 1, 1) ImageNet's
    std: torch.Tensor  # (1, 3, 1, 1)

    def __init__(self, network: nn.Module, name: str, dinov2: bool = False):
        super().__init__()
        self.network = network.eval().requires_grad_(False)
        self.name, self.dinov2 = name, dinov2
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> RepaEncoder:
        """Always in eval mode: the encoder is frozen."""
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """DINOv2's input: (N, C, H, W) in [-1, 1] -> (N, 3, R, R) ImageNet-normalised, R = 224 x max(1, H // 256)."""
        x = (images.float() + 1) / 2  # [0, 1]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # one channel repeated to RGB
        elif x.shape[1] != 3:
            raise UserError(f"REPA's DINOv2 encoder takes 1- or 3-channel images, got {x.shape[1]} channels")
        size = DINOV2_RESOLUTION * max(1, x.shape[-1] // REPA_INPUT_PER)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, C, H, W) in [-1, 1] -> features (N, S, Dz), float32."""
        if self.dinov2:
            return self.network.patch_tokens(self.preprocess(images)).float()  # type: ignore[operator]
        out = self.network(images)
        if not isinstance(out, torch.Tensor) or out.ndim != 3:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UserError(f"REPA encoder {self.name}: must return patch features (N, S, Dz), returned {shape}")
        return out.float()

    def feature_shape(self, channels: int, size: int, device: torch.device) -> tuple[int, int]:
        """(S, Dz) of the features of one (channels, size, size) image (one forward of a blank image)."""
        out = self(torch.zeros(1, channels, size, size, device=device))
        return int(out.shape[1]), int(out.shape[2])


def resolve_dinov2(spec: str) -> str:
    """A local weights file, or a released DINOv2 name (`dinov2_vitb14_pretrain.pth`, also `dinov2_vitb14`)
    fetched into $DITLAB_HOME."""
    from ditlab.evaluation.fd_dinov2 import dinov2_weights
    from ditlab.hub import RELEASED

    if not os.path.exists(spec) and f"{spec}_pretrain.pth" in RELEASED:
        spec = f"{spec}_pretrain.pth"
    try:
        return dinov2_weights(spec)
    except UserError as e:
        raise UserError(str(e).replace("--dinov2", "--repa-encoder")) from e


def load_repa_encoder(spec: str | nn.Module, device: torch.device | str = "cpu") -> RepaEncoder:
    """--repa-encoder: a released DINOv2 name, a DINOv2 weights file (official layout, any size), a named
    denoising autoencoder (fashion-mnist-dae, digits-dae: trained and cached on first use), or (Python API)
    any torch module mapping images (N, C, H, W) in [-1, 1] to (N, S, Dz)."""
    if isinstance(spec, RepaEncoder):
        return spec.to(device)
    if isinstance(spec, nn.Module):
        return RepaEncoder(spec, MODULE_PREFIX + type(spec).__name__).to(device)
    if spec.startswith(MODULE_PREFIX):
        raise UserError(f"--repa-encoder {spec}: this run's encoder was a Python module; resume it through "
                        "ditlab.train(config, repa_encoder=module)")
    from ditlab.evaluation.dae_encoder import RECIPES, load_dae_encoder

    if spec in RECIPES:
        return RepaEncoder(load_dae_encoder(RECIPES[spec], progress=True), spec).to(device)
    from ditlab.evaluation.dinov2 import load_dinov2

    path = resolve_dinov2(spec)
    return RepaEncoder(load_dinov2(path, device), spec, dinov2=True).to(device)
