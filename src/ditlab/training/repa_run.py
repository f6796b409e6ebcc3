"""REPA in a training run: which encoder gives the targets, how wide the projector's output is, and
where the targets come from for each kind of data.

- Pixel data (digits, a custom dataset of images): the encoder runs at every step on the clean
  image, flipped as the example was.
- An image folder encoded online: the encoder runs on the clean (flipped) image before the VAE.
- A latent cache: the VAE never sees the images again during training, so the encoder's features of
  each image and of its mirror image must be cached beside the latents (`extract-latents
  --repa-encoder`); the training step picks the side its flip drew.
- Given latents (a custom dataset of latents): no clean image, refused."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ditlab.errors import UserError
from ditlab.models.configs import MODEL_CONFIGS
from ditlab.models.repa import default_repa_depth
from ditlab.models.repa_encoder import MODULE_PREFIX, load_repa_encoder
from ditlab.training.config import TrainConfig
from ditlab.training.data import TrainingData
from ditlab.training.repa import Alignment


def with_repa_module(cfg: TrainConfig, module: torch.nn.Module | None) -> TrainConfig:
    """`cfg` with --repa-encoder recording a module given through the Python API ("module:<class>")."""
    if module is None:
        return cfg
    name = getattr(module, "name", None) or MODULE_PREFIX + type(module).__name__
    if cfg.repa_encoder not in (None, name):
        raise UserError(f"--repa-encoder {cfg.repa_encoder} and a repa_encoder module ({name}) were both given")
    return dataclasses.replace(cfg, repa_encoder=name)


def model_depth(cfg: TrainConfig) -> int:
    """The number of blocks the run's DiT has."""
    if cfg.depth is not None:
        return cfg.depth
    if cfg.model not in MODEL_CONFIGS:
        raise UserError(f"--model {cfg.model}: no such config")
    return int(MODEL_CONFIGS[cfg.model]["depth"])


def repa_model_options(cfg: TrainConfig, repa_dim: int) -> dict[str, Any]:
    """The projector's keyword arguments of create_model ({} without REPA)."""
    if not repa_dim:
        return {}
    depth = cfg.repa_depth if cfg.repa_depth is not None else default_repa_depth(model_depth(cfg))
    return {"repa_dim": repa_dim, "repa_depth": depth, "repa_width": cfg.repa_width}


def check_named_data(encoder: str, data: str) -> None:
    """A named denoising autoencoder (fashion-mnist-dae, digits-dae) learnt one named dataset's images: refused
    with the other named dataset (with a folder of one's own data, it is the user's choice)."""
    from ditlab.data.named import NAMED_DATA
    from ditlab.evaluation.dae_encoder import named_dae_data

    trained_on = named_dae_data(encoder)
    if trained_on is not None and data in NAMED_DATA and data != trained_on:
        raise UserError(f"--repa-encoder {encoder} was trained on {trained_on}'s images, not --data {data}'s; "
                        f"use --repa-encoder {data}-dae")


def train_named_once(encoder: str) -> None:
    """Under torchrun, a named denoising autoencoder missing from the cache is trained by rank 0 alone (the
    others wait, then read its file); if rank 0 fails, torchrun stops them."""
    import torch.distributed as dist

    from ditlab.evaluation.dae_encoder import RECIPES, load_dae_encoder
    from ditlab.runtime.distributed import barrier

    if encoder not in RECIPES or not dist.is_initialized():
        return
    if dist.get_rank() == 0:
        load_dae_encoder(RECIPES[encoder], progress=True)
    barrier()


def open_alignment(cfg: TrainConfig, data: TrainingData, device: torch.device,
                   module: torch.nn.Module | None = None) -> tuple[Alignment | None, int]:  # fmt: skip
    """(REPA's encoder and lambda, or None without --repa-encoder; the encoder's feature width Dz, 0 without)."""
    if cfg.repa_encoder is None:
        return None, 0
    check_named_data(cfg.repa_encoder, cfg.data)
    if data.kind == "latents":
        enable = getattr(data.dataset, "use_repa_features", None)
        if enable is None:
            raise UserError(f"--data {cfg.data}: this latent cache cannot hold REPA features")
        _, dim = enable(cfg.repa_encoder)  # (S, Dz), checked against the cache's record
        return Alignment(None, cfg.repa_coeff), dim
    if data.kind not in ("pixels", "images"):
        raise UserError(f"--repa-encoder {cfg.repa_encoder}: REPA needs the clean images, and this dataset gives "
                        f"latents ({data.kind}); train on the images or on a latent cache made with --repa-encoder")
    if module is None:
        train_named_once(cfg.repa_encoder)
    encoder = load_repa_encoder(module if module is not None else cfg.repa_encoder, device)
    assert cfg.image_size is not None
    channels, size = (data.channels, data.size) if data.kind == "pixels" else (3, cfg.image_size)
    _, dim = encoder.feature_shape(channels, size, device)
    return Alignment(encoder, cfg.repa_coeff), dim
