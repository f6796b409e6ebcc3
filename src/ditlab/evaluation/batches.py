"""ADM's .npz batches: sample batches (`arr_0` uint8 images (N, H, W, 3), `arr_1` labels (N,)) and
reference batches (`arr_0` plus the Inception statistics `mu`, `sigma`, `mu_s`, `sigma_s`).

One-channel batches (N, H, W, 1), as `ditlab sample` writes for a grayscale model, are read as RGB
with the channel repeated three times (as torch-fidelity reads grayscale images). Stored statistics
must be finite, with a symmetric positive semi-definite sigma: anything else is refused, since
the Frechet distance of such statistics is meaningless (even negative).

Images are streamed from the archive in batches, so a 50K x 256 x 256 file (10 GB) is never
held in memory; every layout error is one line naming the file."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator

import numpy as np
import torch

from ditlab.errors import UserError, UserFileNotFoundError
from ditlab.evaluation.inception import POOL_DIM, SPATIAL_DIM
from ditlab.evaluation.metrics import FeatureStats
from ditlab.runtime.files import ADM_IMAGES_KEY as IMAGES_KEY
from ditlab.runtime.files import ADM_LABELS_KEY as LABELS_KEY
from ditlab.runtime.files import atomic_write, damaged_file_errors

STATS_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}  # ADM's names
STATS_DIMS = {"pool": POOL_DIM, "spatial": SPATIAL_DIM}
SYMMETRY_TOL = 1e-6  # max |sigma - sigma^T| allowed, relative to max |sigma|
PSD_TOL = 1e-6  # the most negative eigenvalue allowed, relative to the mean eigenvalue (trace / D)


def _npz_members(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except zipfile.BadZipFile as e:
        raise UserError(f"{path}: not an .npz archive") from e


class NpzImages:
    """The `arr_0` images of an ADM .npz, read in order without loading the whole array.

    `num_images`, `shape` (H, W, 3); iterate with `batches(batch_size)` -> uint8 (B, H, W, 3).
    A one-channel file (N, H, W, 1) is read with its channel repeated to RGB (`channels` is 1)."""

    def __init__(self, path: str):
        self.path = path
        if IMAGES_KEY + ".npy" not in _npz_members(path):
            raise UserError(f"{path}: no {IMAGES_KEY} (ADM batches hold uint8 images (N, H, W, 3) in {IMAGES_KEY})")
        with damaged_file_errors(path, ".npz batch"), zipfile.ZipFile(path) as z, z.open(IMAGES_KEY + ".npy") as f:
            shape, fortran, dtype = self._read_header(f)
        if dtype != np.uint8:
            raise UserError(f"{path}: {IMAGES_KEY} is {dtype}, expected uint8 images in [0, 255]")
        if len(shape) != 4 or shape[3] not in (1, 3) or shape[0] == 0:
            raise UserError(f"{path}: {IMAGES_KEY} has shape {shape}, expected uint8 (N, H, W, 3) or (N, H, W, 1) "
                            "with N >= 1")
        if fortran:
            raise UserError(f"{path}: {IMAGES_KEY} is stored in Fortran order; save it C-contiguous")
        self.num_images, self.channels = shape[0], shape[3]
        self.shape = (shape[1], shape[2], 3)

    def _read_header(self, f) -> tuple[tuple[int, ...], bool, np.dtype]:
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        try:
            version = np.lib.format.read_magic(f)
            if version not in readers:
                raise UserError(f"unsupported .npy format version {version}")
            return readers[version](f)
        except ValueError as e:
            raise UserError(f"{self.path}: {IMAGES_KEY} is not a readable .npy array ({e})") from e

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 batches (B, H, W, 3) in file order; the last one may be shorter."""
        stored = (*self.shape[:2], self.channels)  # (H, W, C) as in the file
        per_image = int(np.prod(stored))
        with damaged_file_errors(self.path, ".npz batch"), zipfile.ZipFile(self.path) as z, \
                z.open(IMAGES_KEY + ".npy") as f:
            self._read_header(f)
            for start in range(0, self.num_images, batch_size):
                count = min(batch_size, self.num_images - start)
                batch = np.empty((count, *stored), dtype=np.uint8)  # (B, H, W, C)
                if f.readinto(memoryview(batch).cast("B")) != count * per_image:
                    raise UserError(f"{self.path}: {IMAGES_KEY} is truncated after {start} images")
                yield batch if self.channels == 3 else np.repeat(batch, 3, axis=3)  # (B, H, W, 3)


def load_stats(path: str) -> dict[str, FeatureStats] | None:
    """The stored statistics of an ADM batch, {"pool": (mu, sigma), "spatial": (mu_s, sigma_s)}
    in float64, or None when the file stores none (they are then computed from its images)."""
    members = {m.removesuffix(".npy") for m in _npz_members(path)}
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


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise UserError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    return np.ascontiguousarray(images)


def save_samples(path: str, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Write a sample batch in ADM's layout: `arr_0` images uint8 (N, H, W, 3), `arr_1` labels (N,)."""
    arrays = {IMAGES_KEY: _check_images(images)}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (arrays[IMAGES_KEY].shape[0],):
            raise UserError(f"labels must be (N,) with N = {arrays[IMAGES_KEY].shape[0]}, got {labels.shape}")
        arrays[LABELS_KEY] = labels
    atomic_write(path, lambda f: np.savez(f, **arrays))


def save_reference(path: str, images: np.ndarray, pool: FeatureStats, spatial: FeatureStats) -> None:
    """Write a reference batch in ADM's layout: `arr_0` images and the Inception statistics
    `mu`, `sigma` (pool_3, 2048-d) and `mu_s`, `sigma_s` (spatial, 2023-d)."""
    arrays = {IMAGES_KEY: _check_images(images)}
    for kind, stats in {"pool": pool, "spatial": spatial}.items():
        stats = _checked_stats(kind, stats.mu, stats.sigma, path)
        mu_key, sigma_key = STATS_KEYS[kind]
        arrays[mu_key], arrays[sigma_key] = stats.mu, stats.sigma
    atomic_write(path, lambda f: np.savez(f, **arrays))
