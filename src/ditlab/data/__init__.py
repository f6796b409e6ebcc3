"""Data: the bundled digits (`digits`), image folders with ADM's center crop (`images`), the latent
cache that training reads (`latents`), the VAE codecs (`codecs`), and `ditlab extract-latents`
(`config`, light; `extract`). The names below load their modules on first use."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "IMAGE_EXTENSIONS": "ditlab.data.images",
    "ImageFolderDataset": "ditlab.data.images",
    "center_crop_arr": "ditlab.data.images",
    "scan_image_folder": "ditlab.data.images",
    "LatentCacheDataset": "ditlab.data.latents",
    "is_latent_cache": "ditlab.data.latents",
    "sample_latents": "ditlab.data.latents",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ditlab.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
