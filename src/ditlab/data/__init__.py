"""Data: the bundled digits (`digits`), image folders with ADM's center crop (`images`), the latent
cache that training reads (`latents`), the VAE codecs (`codecs`), and `ditlab extract-latents`
(`config`, light; `extract`). The names below load their modules on first use."""

from __future__ import annotations

from ditlab.lazy import lazy_exports

_MODULES = {"ditlab.data.images": "IMAGE_EXTENSIONS ImageFolderDataset center_crop_arr scan_image_folder",
            "ditlab.data.latents": "LatentCacheDataset is_latent_cache sample_latents"}
__getattr__, __dir__ = lazy_exports("ditlab.data", _MODULES)
__all__ = __dir__()
