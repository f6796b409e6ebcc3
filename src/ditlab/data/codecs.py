"""Latent codecs: the Stable Diffusion VAE (diffusers' `AutoencoderKL`) and the pixel identity.

A codec maps images (N, 3, H, W) in [-1, 1] to a diagonal Gaussian posterior over latents
(N, C, H / downsample, W / downsample), returned as (mean, std) already multiplied by the
latent scale, and maps latents back to images. diffusers is imported only when a VAE is loaded.
"""

from __future__ import annotations

import os
import re
from typing import Protocol

import torch

from ditlab.errors import UserError, UserFileNotFoundError, one_line

LATENT_SCALE = 0.18215  # SD VAE latents times this have roughly unit variance (LDM paper, D.1)
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
PIXEL = "pixel"  # the codec spec of pixel space


class Codec(Protocol):
    """What the training engine, the latent cache and sampling need from a codec."""

    spec: str
    latent_channels: int
    downsample: int
    image_channels: int

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def to(self, device: torch.device | str) -> Codec: ...


class PixelCodec:
    """Pixel space: the latent is the image itself, with a posterior of zero width."""

    spec = PIXEL
    downsample = 1

    def __init__(self, channels: int = 3):
        self.latent_channels = self.image_channels = channels  # 3 for RGB, 1 for the digits

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, C, H, W) in [-1, 1] -> mean = the images as float32 (no copy if already), std zeros."""
        mean = images.float()
        return mean, torch.zeros_like(mean)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (N, C, H, W) -> the same tensor as float32 images (not clamped)."""
        return latents.float()

    def to(self, device: torch.device | str) -> PixelCodec:
        return self


class VAECodec:
    """A diffusers `AutoencoderKL`, frozen, with latents scaled by `LATENT_SCALE`.

    `encode` runs the VAE in the dtype it was loaded in (fp16/bf16 on a GPU halves the cost) and
    returns float32; `decode` returns float32 images that are NOT clamped to [-1, 1]."""

    def __init__(self, vae: torch.nn.Module, spec: str):
        self.vae = vae.eval().requires_grad_(False)
        self.spec = spec
        cfg = vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)  # one stride-2 conv per block but the last
        self.image_channels = int(cfg.in_channels)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, 3, H, W) in [-1, 1] -> (mean, std), each (N, C, H / 8, W / 8) float32, scaled."""
        posterior = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        mean = posterior.mean.float() * LATENT_SCALE
        std = torch.exp(0.5 * posterior.logvar.float()) * LATENT_SCALE  # logvar clamped to [-30, 20] by diffusers
        return mean, std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (N, C, h, w), scaled -> images (N, 3, 8h, 8w) float32, about [-1, 1], not clamped."""
        z = latents.to(self.device, self.dtype) / LATENT_SCALE
        return self.vae.decode(z).sample.float()

    def to(self, device: torch.device | str) -> VAECodec:
        self.vae.to(device)
        return self


def _is_hub_id(spec: str) -> bool:
    """True for a hub id, "owner/name" in the characters the hub allows; anything else is a path."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec) is not None


def _how_to_fix(repo: str) -> str:
    return (f"on a machine with network run `hf download {repo} --local-dir DIR` (or save an AutoencoderKL with "
            "save_pretrained(DIR)), copy DIR here and pass --vae DIR")


def _load_vae(spec: str, dtype: torch.dtype, local_files_only: bool):
    from diffusers import AutoencoderKL
    from diffusers.utils import is_accelerate_available

    kwargs = {"torch_dtype": dtype, "low_cpu_mem_usage": is_accelerate_available()}
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            if not os.path.isfile(os.path.join(path, "vae", "config.json")):
                raise UserError(f"--vae {spec}: folder has no config.json; {_how_to_fix(DEFAULT_VAE)}")
            kwargs["subfolder"] = "vae"  # a whole Stable Diffusion pipeline folder
        try:
            return AutoencoderKL.from_pretrained(path, **kwargs)
        except Exception as e:  # diffusers raises OSError, ValueError, KeyError... for a bad folder
            raise UserError(f"--vae {spec}: cannot load an AutoencoderKL from this folder ({one_line(e)}); "
                             f"{_how_to_fix(DEFAULT_VAE)}") from e
    if not _is_hub_id(spec):
        raise UserFileNotFoundError(f"--vae {spec}: no such folder (nor a hub id like {DEFAULT_VAE}); "
                                f"{_how_to_fix(DEFAULT_VAE)}")
    why_offline = _hub_offline()
    try:
        return AutoencoderKL.from_pretrained(spec, local_files_only=local_files_only or why_offline is not None,
                                             **kwargs)
    except Exception as e:  # no network, unknown repository, gated model...
        if why_offline is not None:
            raise UserError(f"--vae {spec}: not in the Hugging Face cache, and {why_offline}; "
                             f"{_how_to_fix(spec)}") from e
        raise UserError(f"--vae {spec}: cannot load it from the Hugging Face hub or its cache ({one_line(e)}); "
                         f"{_how_to_fix(spec)}") from e


def _hub_offline() -> str | None:
    """Why the Hugging Face hub is not to be asked (DITLAB_OFFLINE / HF_HUB_OFFLINE set, or its host
    unreachable within `hub.CONNECT_TIMEOUT_S`), or None: diffusers would otherwise retry for ~25 s."""
    from ditlab.hub import offline, reachable

    if offline():
        return "DITLAB_OFFLINE is set"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    why = reachable(endpoint)
    return None if why is None else f"{endpoint} is unreachable ({why})"


def load_codec(spec: str = DEFAULT_VAE, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               local_files_only: bool = False, pixel_channels: int = 3) -> PixelCodec | VAECodec:
    """The codec named by `spec`: "pixel", a Hugging Face hub id, or a local folder written by
    `AutoencoderKL.save_pretrained` (or a Stable Diffusion pipeline folder with a `vae/` in it).

    dtype is the VAE's compute dtype; outputs are float32 whatever it is. Loading failures raise a
    one-line ValueError / FileNotFoundError saying how to point `--vae` at a local copy.
    `pixel_channels` is the image channels of the "pixel" codec (1 for grayscale)."""
    if spec == PIXEL:
        return PixelCodec(pixel_channels)
    vae = _load_vae(spec, dtype, local_files_only)
    return VAECodec(vae, spec).to(device)
