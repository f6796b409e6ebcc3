"""The bundled dataset: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), in
pixel space. A fixed split holds out real digits for judging samples."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ditlab.errors import UserError

DIGITS_SIZE = 8  # native resolution
DIGITS_MAX = 16.0  # pixel values run from 0 to 16
DIGITS_CLASSES = 10
HELD_OUT = 297  # real digits never trained on: 1797 = 1500 train + 297 held out
SPLIT_SEED = 0
DIGITS_FILE = "datasets/data/digits.csv.gz"  # in the scikit-learn package: what its load_digits reads


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 images (N, 8, 8) float64 in 0..16 and labels (N,) int64, as scikit-learn's
    `load_digits` has them: read from the file it reads (digits.csv.gz: 64 pixels, then the label,
    per row), found without importing scikit-learn (its import is about 1 s of CPU time)."""
    spec = importlib.util.find_spec("sklearn")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((p for p in (Path(f) / DIGITS_FILE for f in folders) if p.is_file()), None)
    if path is None:  # another layout of the package: its own loader
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images, bunch.target.astype(np.int64)
    data = np.loadtxt(path, delimiter=",")  # (N, 65)
    return data[:, :-1].reshape(-1, DIGITS_SIZE, DIGITS_SIZE), data[:, -1].astype(np.int64)


def load_digits_arrays(split: str = "train", image_size: int = DIGITS_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, S, S) float32 in [-1, 1] and labels (N,) long of one split ("train",
    "test" or "all"). Sizes above 8 (multiples of 8) are bilinear upsamplings."""
    if image_size % DIGITS_SIZE or image_size < DIGITS_SIZE:
        raise UserError(f"--image-size {image_size}: the digits are trained at a multiple of 8 pixels")
    all_images, all_labels = read_digits()
    order = np.random.RandomState(SPLIT_SEED).permutation(len(all_labels))
    pick = {"train": order[HELD_OUT:], "test": order[:HELD_OUT], "all": np.arange(len(order))}.get(split)
    if pick is None:
        raise UserError(f"unknown digits split {split!r}: train, test or all")
    images = torch.from_numpy(all_images[pick]).float() / DIGITS_MAX * 2 - 1  # (N, 8, 8) in [-1, 1]
    images = images.unsqueeze(1)  # (N, 1, 8, 8)
    if image_size != DIGITS_SIZE:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images.contiguous(), torch.from_numpy(all_labels[pick]).long()


class DigitsDataset(Dataset):
    """Items (image (1, S, S) in [-1, 1], label)."""

    num_classes = DIGITS_CLASSES
    channels = 1

    def __init__(self, split: str = "train", image_size: int = DIGITS_SIZE):
        self.images, self.labels = load_digits_arrays(split, image_size)
        self.classes = [str(i) for i in range(DIGITS_CLASSES)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])
