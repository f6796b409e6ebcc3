"""Fashion-MNIST (Xiao et al. 2017) and other IDX datasets, in pixel space.

`--data fashion-mnist` reads each of the four files from the first place that has it: the hub
cache ($DITLAB_HOME/fashion-mnist/), the system's folder (Debian's package dataset-fashion-mnist),
else it is downloaded by name (`ditlab.hub`: mirror and offline rules, the canonical .gz's
SHA-256). Wherever it came from, the SHA-256 of its uncompressed contents must be Fashion-MNIST's.
`--data PATH` reads a folder holding the four IDX files (gzipped or not) as MNIST names them.

Images are padded to a multiple of 8 (28x28 -> 32x32, black borders), scaled to [-1, 1]; a
smaller --image-size that divides the padded size is an area downsampling (16x16: 2x2 means)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ditlab.data.idx import read_idx, read_shape
from ditlab.data.named import FASHION, FASHION_FILES, IDX_SPLITS, NAMED_DATA, hub_name
from ditlab.errors import UserError, UserFileNotFoundError

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
PAD_MULTIPLE = 8  # images are padded to a multiple of the largest patch size
PIXEL_MAX = 255.0


def is_idx_folder(path: str | Path) -> bool:
    """A folder holding the training images of an IDX dataset (train-images-idx3-ubyte[.gz])."""
    stem = IDX_SPLITS["train"][0]
    return Path(path).is_dir() and any((Path(path) / f"{stem}{ext}").is_file() for ext in ("", ".gz"))


def _in_folder(folder: Path, stem: str) -> Path | None:
    return next((folder / f"{stem}{ext}" for ext in ("", ".gz") if (folder / f"{stem}{ext}").is_file()), None)


def locate(source: str, stem: str, progress: bool = False) -> Path:
    """The file `stem` of `source` ("fashion-mnist" or an IDX folder): for the name, the hub cache,
    else the system folder, else downloaded into the cache."""
    if source != FASHION:
        found = _in_folder(Path(source), stem)
        if found is None:
            raise UserFileNotFoundError(f"--data {source}: no {stem} or {stem}.gz in that folder")
        return found
    from ditlab import hub

    cached = hub.home() / hub_name(stem)
    if cached.is_file():
        return cached
    return _in_folder(SYSTEM_DIR, stem) or hub.fetch(hub_name(stem), progress)


def _read_checked(source: str, stem: str, ndim: int, progress: bool) -> np.ndarray:
    path = locate(source, stem, progress)
    idx = read_idx(path)
    if source == FASHION and idx.sha256 != FASHION_FILES[stem].raw_sha256:
        raise UserError(f"{path}: not Fashion-MNIST's {stem} (SHA-256 of its contents {idx.sha256[:16]}..., expected "
                        f"{FASHION_FILES[stem].raw_sha256[:16]}...); remove or replace it")
    if idx.array.ndim != ndim or idx.array.dtype != np.uint8:
        raise UserError(f"{path}: {idx.array.dtype} of shape {idx.array.shape}; expected uint8 with {ndim} dimensions")
    return idx.array


def load_idx_split(source: str, split: str, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, H, W) uint8, labels (N,) int64) of one split ("train" or "test") of `source`."""
    if split not in IDX_SPLITS:
        raise UserError(f"unknown split {split!r}: train or test")
    image_stem, label_stem = IDX_SPLITS[split]
    images = _read_checked(source, image_stem, 3, progress)
    labels = _read_checked(source, label_stem, 1, progress)
    if len(images) != len(labels):
        raise UserError(f"--data {source}: {len(images)} {split} images but {len(labels)} labels")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def padded_size(native: int) -> int:
    """The padded side of native-size images: the next multiple of 8 (28 -> 32)."""
    return -(-native // PAD_MULTIPLE) * PAD_MULTIPLE


def idx_image_size(folder: str) -> int:
    """The padded image size of an IDX folder's training images, from the file's header."""
    shape = read_shape(locate(folder, IDX_SPLITS["train"][0]))
    if len(shape) != 3:
        raise UserError(f"--data {folder}: training images of shape {shape}; expected (N, H, W)")
    return padded_size(shape[-1])


def check_image_size(image_size: int, native: int = 28, flag: str = "--image-size") -> None:
    full = padded_size(native)
    if image_size < 1 or full % image_size:
        sizes = ", ".join(str(full // f) for f in (1, 2, 4) if full % f == 0)
        raise UserError(f"{flag} {image_size}: IDX images are padded to {full}x{full}; choose {full} or a size "
                        f"dividing it (area downsampling): {sizes}")


def to_images(pixels: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 pixels (N, H, W) -> float32 images (N, 1, S, S) in [-1, 1]: padded with black to the
    next multiple of 8, then area-downsampled to S (which must divide the padded size)."""
    native = pixels.shape[-1]
    check_image_size(image_size, native)
    full = padded_size(native)
    x = pixels.float().unsqueeze(1) / PIXEL_MAX * 2 - 1  # (N, 1, H, W)
    lo = (full - native) // 2
    x = F.pad(x, (lo, full - native - lo, lo, full - native - lo), value=-1.0)  # (N, 1, full, full)
    if image_size != full:
        x = F.avg_pool2d(x, full // image_size)  # (N, 1, S, S): means of (full / S)^2 pixels
    return x.contiguous()


class IdxDataset(Dataset):
    """Items (image (1, S, S) float32 in [-1, 1], label) of one split of an IDX dataset; the pixels
    stay uint8 in memory (47 MB for Fashion-MNIST's training set) and a batch is converted at once."""

    channels = 1

    def __init__(self, source: str, split: str = "train", image_size: int | None = None, progress: bool = False):
        self.pixels, self.labels = load_idx_split(source, split, progress)  # (N, H, W) uint8, (N,)
        self.image_size = image_size or padded_size(self.pixels.shape[-1])
        check_image_size(self.image_size, self.pixels.shape[-1])
        self.num_classes = len(NAMED_DATA[FASHION].class_names) if source == FASHION else int(self.labels.max()) + 1
        self.classes = list(NAMED_DATA[FASHION].class_names) if source == FASHION else \
            [str(i) for i in range(self.num_classes)]

    def __len__(self) -> int:
        return len(self.labels)

    def images(self, index: torch.Tensor | slice | list[int]) -> torch.Tensor:
        """Images (B, 1, S, S) of the items `index`."""
        return to_images(self.pixels[index], self.image_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images([i])[0], int(self.labels[i])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """A batch converted in one call (torch's DataLoader uses it when it exists)."""
        images = self.images(indices)
        return [(images[k], int(self.labels[i])) for k, i in enumerate(indices)]
