"""What a training run reads: the dataset, its codec, and how a batch becomes model input.

Datasets are deterministic; every random choice (flips, posterior samples) is made on the
device from the step's generator, so a resumed run draws exactly what it would have drawn."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ditlab.data.codecs import Codec
from ditlab.errors import UserError, UserFileNotFoundError
from ditlab.training.config import TrainConfig

IMAGE_FOLDER_SIZE = 256  # --image-size of an image folder when it is left out (the paper's)


@dataclass
class TrainingData:
    dataset: Dataset
    kind: str  # "pixels" (digits, IDX), "images" (encoded online) or "latents" (a latent cache)
    num_classes: int
    channels: int  # channels the model sees
    size: int  # spatial size the model sees
    flip: bool  # random horizontal flips
    codec_spec: str  # "pixel", or the VAE (hub id or folder) the images are, or were, encoded with
    codec: Codec | None = None  # the loaded VAE when images are encoded online (None otherwise)
    description: str = ""

    def __len__(self) -> int:
        """The number of training items (a map-style dataset's length)."""
        return len(self.dataset)

    def to_model_input(self, batch: list[torch.Tensor], device: torch.device,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A collated batch -> (x0 (N, C, h, w) float32 on device, labels (N,) on device)."""
        x0, labels, _ = self.model_input_and_clean(batch, device, generator, clean=False)
        return x0, labels

    def model_input_and_clean(self, batch: list[torch.Tensor], device: torch.device, generator: torch.Generator,
                              clean: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """to_model_input (the same draws) and, with `clean`, what REPA's encoder needs of the same examples:
        the clean images (N, C, H, W) in [-1, 1], flipped as the example was, or for a latent cache the
        cached encoder features of the drawn side (N, S, Dz) (the batch's fourth entry, (N, 2, S, Dz))."""
        if self.kind == "latents":
            from ditlab.data.latents import sample_latents_paired

            mean, std, labels = (b.to(device, non_blocking=True) for b in batch[:3])
            if clean and len(batch) < 4:
                raise UserError("REPA on a latent cache needs the encoder's cached features: make the cache with "
                                "`ditlab extract-latents --repa-encoder ...`")
            paired = batch[3].to(device, non_blocking=True) if clean else None
            x0, features = sample_latents_paired(mean, std, paired, generator)
            return x0, labels, features
        images, labels = (b.to(device, non_blocking=True) for b in batch[:2])
        if self.flip:
            flip = torch.rand(images.shape[0], device=device, generator=generator) < 0.5  # (N,)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        pixels = images if clean else None
        if self.kind == "images":
            assert self.codec is not None  # an image folder's data carries the VAE that encodes it
            with torch.no_grad():
                mean, std = self.codec.encode(images)
            noise = torch.randn(mean.shape, device=device, generator=generator, dtype=mean.dtype)
            images = (mean + std * noise).float()  # a posterior sample, already scaled
        return images, labels, pixels


def native_image_size(spec: str) -> int:
    """The data's own image size, `--image-size` when it is left out: the digits' 8, Fashion-MNIST's
    32 (28 padded), the size a latent cache was extracted at, 256 for an image folder."""
    from ditlab.data.named import NAMED_DATA

    if spec in NAMED_DATA:
        return NAMED_DATA[spec].image_size
    from ditlab.data.fashion import idx_image_size, is_idx_folder

    if is_idx_folder(spec):
        return idx_image_size(spec)
    from ditlab.data.latents import is_latent_cache, read_index

    return int(read_index(spec)["image_size"]) if is_latent_cache(spec) else IMAGE_FOLDER_SIZE


def absolute_path(spec: str) -> str:
    """A local folder (or file) as an absolute path; anything else (digits, fashion-mnist, a hub id) unchanged."""
    from ditlab.data.named import NAMED_DATA

    local = os.path.expanduser(spec)
    return os.path.abspath(local) if spec not in NAMED_DATA and os.path.exists(local) else spec


def with_data_defaults(cfg: TrainConfig, stored: dict[str, Any] | None) -> TrainConfig:
    """`cfg` (a TrainConfig) with --data, --vae and a --repa-encoder file made absolute (a run's stored paths
    work from any folder) and --image-size filled in when left out: the stored run's, else the data's own."""
    image_size = cfg.image_size
    if image_size is None:
        image_size = (stored or {}).get("image_size") or native_image_size(absolute_path(cfg.data))
    from ditlab.evaluation.dae_encoder import RECIPES

    repa = cfg.repa_encoder if cfg.repa_encoder is None or cfg.repa_encoder in RECIPES else \
        absolute_path(cfg.repa_encoder)
    return dataclasses.replace(cfg, data=absolute_path(cfg.data), vae=absolute_path(cfg.vae), image_size=image_size,
                               repa_encoder=repa)


def open_training_data(spec: str, image_size: int, vae: str, device: torch.device) -> TrainingData:
    """`--data`: "digits", "fashion-mnist", a folder of IDX files, a latent cache folder, or an image
    folder in the ImageNet layout."""
    if spec == "digits":
        from ditlab.data.digits import DigitsDataset

        ds = DigitsDataset("train", image_size)
        return TrainingData(ds, "pixels", ds.num_classes, ds.channels, image_size, flip=False, codec_spec="pixel",
                            description=f"digits: {len(ds)} images {image_size}x{image_size}, pixel space")
    from ditlab.data.fashion import IdxDataset, is_idx_folder
    from ditlab.data.named import FASHION

    if spec == FASHION or is_idx_folder(spec):
        ds = IdxDataset(spec, "train", image_size, progress=True)
        return TrainingData(ds, "pixels", ds.num_classes, ds.channels, image_size, flip=True, codec_spec="pixel",
                            description=f"{spec}: {len(ds)} images {image_size}x{image_size}, pixel space, flips")
    path = Path(spec)
    if not path.is_dir():
        raise UserFileNotFoundError(f"--data {spec}: no such folder (use 'digits', 'fashion-mnist', an IDX folder, an "
                                    "image folder or a latent cache)")
    from ditlab.data.latents import LatentCacheDataset, is_latent_cache

    if is_latent_cache(path):
        ds = LatentCacheDataset(str(path))
        if ds.image_size != image_size:
            raise UserError(f"--image-size {image_size}, but the latent cache {spec} holds {ds.image_size}px images")
        c, h, _ = ds.latent_shape
        return TrainingData(ds, "latents", ds.num_classes, c, h, flip=True, codec_spec=ds.codec,
                            description=f"latent cache {spec}: {len(ds)} images, latents {c}x{h}x{h}")
    from ditlab.data.codecs import load_codec
    from ditlab.data.images import ImageFolderDataset
    from ditlab.runtime.precision import vae_dtype

    ds = ImageFolderDataset(path, image_size)
    codec = load_codec(vae, device=device, dtype=vae_dtype("auto", device))  # as extract-latents encodes
    size = image_size // codec.downsample
    return TrainingData(ds, "images", ds.num_classes, codec.latent_channels, size, flip=True, codec_spec=vae,
                        codec=codec,
                        description=f"image folder {spec}: {len(ds)} images, encoded online by {vae}")
