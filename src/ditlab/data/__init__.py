"""Data: the bundled digits (`ditlab.data.digits`), image folders with ADM's center crop, and the
latent cache that training reads.

The extract-latents command's work lives in `ditlab.data.extract` (imported on demand)."""

from ditlab.data.images import IMAGE_EXTENSIONS, ImageFolderDataset, center_crop_arr, scan_image_folder
from ditlab.data.latents import LatentCacheDataset, is_latent_cache, sample_latents

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "LatentCacheDataset",
    "center_crop_arr",
    "is_latent_cache",
    "sample_latents",
    "scan_image_folder",
]
