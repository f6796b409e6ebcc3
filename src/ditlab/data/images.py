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
            return image.convert("RGB")  # convert() decodes every pixel, so truncation shows here
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise UserError(f"cannot read image {path}: {one_line(e)}") from e


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
    samples = []
    for label, name in enumerate(classes):
        found = []
        for folder, dirs, files in os.walk(os.path.join(root, name), followlinks=True):
            dirs.sort()
            found += [os.path.relpath(os.path.join(folder, f), root) for f in files
                      if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            raise UserError(f"--data {root}: class folder {name!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        samples += [(path, label) for path in sorted(found)]
    return classes, samples


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
