"""The bundled dataset: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), in
pixel space. A fixed split holds out real digits for judging samples."""

from __future__ import annotations

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


def load_digits_arrays(split: str = "train", image_size: int = DIGITS_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, S, S) float32 in [-1, 1] and labels (N,) long of one split ("train",
    "test" or "all"). Sizes above 8 (multiples of 8) are bilinear upsamplings."""
    from sklearn.datasets import load_digits

    if image_size % DIGITS_SIZE or image_size < DIGITS_SIZE:
        raise UserError(f"--image-size {image_size}: the digits are trained at a multiple of 8 pixels")
    bunch = load_digits()
    order = np.random.RandomState(SPLIT_SEED).permutation(len(bunch.target))
    pick = {"train": order[HELD_OUT:], "test": order[:HELD_OUT], "all": np.arange(len(order))}.get(split)
    if pick is None:
        raise UserError(f"unknown digits split {split!r}: train, test or all")
    images = torch.from_numpy(bunch.images[pick]).float() / DIGITS_MAX * 2 - 1  # (N, 8, 8) in [-1, 1]
    images = images.unsqueeze(1)  # (N, 1, 8, 8)
    if image_size != DIGITS_SIZE:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images.contiguous(), torch.from_numpy(bunch.target[pick]).long()


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
