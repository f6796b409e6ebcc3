"""Image folders in the ImageNet layout and ADM's center crop.

The layout is `ROOT/<class>/.../<image>`: class names are the subfolder names, sorted, and a
class's label is its position in that order (as torchvision's `ImageFolder`)."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from ditlab.errors import UserError, UserFileNotFoundError, one_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Pillow's modes of more than 8 bits per sample -> the value of full intensity (1.0 for floats)
HIGH_DEPTH_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's center crop (guided-diffusion `image_datasets.py`), as DiT trains with it.

    Halve the image with a BOX filter while its short side is at least `2 * image_size`, resize it
    with BICUBIC so that the short side is `image_size` (the long side rounded with Python's
    `round`), then cut the central square. Returns a uint8 array (image_size, image_size, channels).
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)  # (H, W, channels)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def load_rgb(path: str) -> Image.Image:
    """The image at `path`, fully decoded and converted to RGB; a ValueError naming the file if
    it cannot be read (not an image, truncated, corrupt)."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            if image.mode in HIGH_DEPTH_MODES:
                return to_8bit(image).convert("RGB")
            return image.convert("RGB")  # convert() decodes every pixel, so truncation shows here
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise UserError(f"cannot read image {path}: {one_line(e)}") from e


def to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float grayscale image as 8-bit "L", scaled by its full intensity
    (65535 for integers, read as 16-bit samples as PNG and PGM store them; 1.0 for floats) and
    rounded. Pillow's own convert() clips such values at 255 instead, so mid grey became white."""
    full = HIGH_DEPTH_MODES[image.mode]
    arr = np.asarray(image, dtype=np.float64)  # (H, W)
    return Image.fromarray(np.clip(np.rint(arr * (255 / full)), 0, 255).astype(np.uint8), "L")


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1], computed as torchvision's
    ToTensor + Normalize(0.5, 0.5) compute it (so values match DiT's pipeline bit for bit)."""
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float()  # (3, H, W)
    return (x / 255 - 0.5) / 0.5


def scan_image_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, samples): sorted class folder names, and (path relative to root, label) for
    every file with an image extension (case-insensitive), in class then path order."""
    if not os.path.isdir(root):
        raise UserFileNotFoundError(f"--data {root}: no such folder")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UserError(f"--data {root}: no class subfolders; expected the ImageNet layout {root}/<class>/<image>")
    samples, owner = [], {}  # owner: real path -> the (path, label) that first reached it
    for label, name in enumerate(classes):
        found: list[tuple[str, str]] = []
        _walk(root, os.path.join(root, name), frozenset({os.path.realpath(root)}), False, found)
        if not found:
            raise UserError(f"--data {root}: class folder {name!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        for path, real in sorted(found):
            first = owner.setdefault(real, (path, label))
            if first[1] != label:
                raise UserError(f"--data {root}: {path} and {first[0]} are the same file ({real}) in two classes")
            if first[0] == path:  # a file reached again through a symlink is read once
                samples.append((path, label))
    return classes, samples


def _walk(root: str, folder: str, above: frozenset[str], linked: bool, found: list[tuple[str, str]]) -> None:
    """Append (path relative to root, real path) of every image under `folder`, following
    symlinks; a folder that resolves to one of the folders `above` it (a symlink loop) is an error."""
    real = os.path.realpath(folder)
    if real in above:
        raise UserError(f"--data {root}: {folder} is a symlink loop (it leads back to {real})")
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        if e.is_dir():
            _walk(root, e.path, above | {real}, linked or e.is_symlink(), found)
        elif e.name.lower().endswith(IMAGE_EXTENSIONS):
            resolved = os.path.realpath(e.path) if linked or e.is_symlink() else os.path.join(real, e.name)
            found.append((os.path.relpath(e.path, root), resolved))


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images of `ROOT/<class>/<image>`, ADM-center-cropped to `image_size`.

    Item: (image, label) with image float32 (3, image_size, image_size) in [-1, 1] and label int.
    No random flip here: the training step flips on the device with its own seeded generator.
    A file that cannot be read raises a ValueError naming it."""

    def __init__(self, root: str, image_size: int):
        if image_size < 1:
            raise UserError(f"--image-size {image_size} must be positive")
        self.root = root
        self.image_size = image_size
        self.classes, self.samples = scan_image_folder(root)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def path(self, index: int) -> str:
        """The full path of item `index`."""
        return os.path.join(self.root, self.samples[index][0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = load_rgb(self.path(index))
        return to_tensor(center_crop_arr(image, self.image_size)), self.samples[index][1]
