"""The Inception statistics of ADM's reference batches (`mu`, `sigma`, `mu_s`, `sigma_s` beside the
`arr_0` images): read, checked and written. The batch format itself (keys, the streaming reader
and writer, the protocol record) is `data.npz`'s; its names are re-exported here.

Stored statistics must be finite, with a symmetric positive semi-definite sigma: anything else is
refused, since the Frechet distance of such statistics is meaningless (even negative)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditlab.data.npz import IMAGES_KEY, check_images, npz_members
from ditlab.data.npz import LABELS_KEY as LABELS_KEY
from ditlab.data.npz import NpzImages as NpzImages
from ditlab.data.npz import save_samples as save_samples
from ditlab.errors import UserError
from ditlab.evaluation.inception import POOL_DIM, SPATIAL_DIM
from ditlab.evaluation.metrics import FeatureStats
from ditlab.runtime.files import atomic_write, damaged_file_errors

STATS_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}  # ADM's names
STATS_DIMS = {"pool": POOL_DIM, "spatial": SPATIAL_DIM}
SYMMETRY_TOL = 1e-6  # max |sigma - sigma^T| allowed, relative to max |sigma|
PSD_TOL = 1e-6  # the most negative eigenvalue allowed, relative to the mean eigenvalue (trace / D)


def load_stats(path: str) -> dict[str, FeatureStats] | None:
    """The stored statistics of an ADM batch, {"pool": (mu, sigma), "spatial": (mu_s, sigma_s)}
    in float64, or None when the file stores none (they are then computed from its images)."""
    members = {m.removesuffix(".npy") for m in npz_members(path)}
    names = [n for pair in STATS_KEYS.values() for n in pair]
    present = [n for n in names if n in members]
    if not present:
        return None
    if len(present) != len(names):
        missing = [n for n in names if n not in members]
        raise UserError(f"{path}: has {', '.join(present)} but not {', '.join(missing)}")
    with damaged_file_errors(path, ".npz batch"), np.load(path) as z:
        stats = {}
        for kind, (mu_key, sigma_key) in STATS_KEYS.items():
            stats[kind] = _checked_stats(kind, z[mu_key], z[sigma_key], path)
    return stats


def _checked_stats(kind: str, mu: np.ndarray, sigma: np.ndarray, where: str) -> FeatureStats:
    mu, sigma, d = np.asarray(mu, np.float64), np.asarray(sigma, np.float64), STATS_DIMS[kind]
    if mu.shape != (d,) or sigma.shape != (d, d):
        mu_key, sigma_key = STATS_KEYS[kind]
        raise UserError(f"{where}: {mu_key} {mu.shape} / {sigma_key} {sigma.shape}, expected ({d},) / ({d}, {d})")
    check_valid_stats(mu, sigma, where, STATS_KEYS[kind])
    return FeatureStats(mu, sigma)


def check_valid_stats(mu: np.ndarray, sigma: np.ndarray, where: str, keys: tuple[str, str] = ("mu", "sigma")) -> None:
    """Refuse statistics no feature set can have: non-finite mu (D,) or sigma (D, D), a sigma that
    is not symmetric, or not positive semi-definite, within SYMMETRY_TOL / PSD_TOL. The PSD test is a
    Cholesky factorisation of sigma + PSD_TOL * (trace / D) * I: it fails iff an eigenvalue of sigma
    is below -PSD_TOL * trace / D. `where` (the file) and `keys` name them in the message."""
    for key, arr in zip(keys, (mu, sigma)):
        if not np.isfinite(arr).all():
            raise UserError(f"{where}: {key} holds {int((~np.isfinite(arr)).sum())} non-finite value(s)")
    scale = float(np.abs(sigma).max(initial=0.0))
    if scale == 0.0:
        return  # all zero: the covariance of identical features
    asym = float(np.abs(sigma - sigma.T).max())
    if asym > SYMMETRY_TOL * scale:
        raise UserError(f"{where}: {keys[1]} is not symmetric (max |{keys[1]} - {keys[1]}^T| = {asym:.3g})")
    s = torch.from_numpy(np.ascontiguousarray(sigma, dtype=np.float64))
    mean_eig = float(s.trace()) / s.shape[0]
    shifted = (s + s.T) / 2 + torch.eye(s.shape[0], dtype=s.dtype) * (PSD_TOL * max(mean_eig, 0.0))
    if mean_eig <= 0 or torch.linalg.cholesky_ex(shifted).info.item() != 0:
        raise UserError(f"{where}: {keys[1]} is not positive semi-definite, so it is no covariance "
                        "(the Frechet distance would be meaningless)")


def save_reference(path: str, images: np.ndarray, pool: FeatureStats, spatial: FeatureStats) -> None:
    """Write a reference batch in ADM's layout: `arr_0` images and the Inception statistics
    `mu`, `sigma` (pool_3, 2048-d) and `mu_s`, `sigma_s` (spatial, 2023-d)."""
    arrays: dict[str, Any] = {IMAGES_KEY: check_images(images)}
    for kind, stats in {"pool": pool, "spatial": spatial}.items():
        stats = _checked_stats(kind, stats.mu, stats.sigma, path)
        mu_key, sigma_key = STATS_KEYS[kind]
        arrays[mu_key], arrays[sigma_key] = stats.mu, stats.sigma
    atomic_write(path, lambda f: np.savez(f, **arrays))


def check_reference_batch(path: Path, implies: dict[str, Any] | None = None) -> None:
    """It opens as an ADM batch: uint8 images (N, H, W, 3) in arr_0, well-formed statistics if any;
    and of the image size the released name implies (`implies["image_size"]`) where given.
    (`ditlab.hub` checks a download of a reference batch with it.)"""
    images = NpzImages(str(path))
    load_stats(str(path))
    size = (implies or {}).get("image_size")
    height, width, _ = images.shape
    if size is not None and (height, width) != (size, size):
        raise UserError(f"not the released file: {height}x{width} images (the name implies {size}x{size})")
