"""The datasets ditlab knows by name (`--data digits`, `--data fashion-mnist`): the facts training,
sampling, the study and the downloader need about them. Light (no torch, no numpy)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NamedData:
    """A bundled or downloadable pixel-space dataset."""

    image_size: int
    """--image-size when it is left out (Fashion-MNIST: 28x28 padded to 32x32)"""
    channels: int
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class IdxFile:
    """One of Fashion-MNIST's four files: the SHA-256 of its contents and of Zalando's .gz of it."""

    raw_sha256: str
    """of the uncompressed IDX bytes: the same for every copy (Debian recompresses the .gz files)"""
    gz_sha256: str
    """of the canonical .gz (whose MD5 Zalando's README lists): what a download is checked against"""


DIGITS = "digits"
FASHION = "fashion-mnist"
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")  # Xiao et al. 2017, label order
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"  # Zalando's README
FASHION_FILES = {
    "train-images-idx3-ubyte": IdxFile("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                                       "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
    "train-labels-idx1-ubyte": IdxFile("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                                       "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
    "t10k-images-idx3-ubyte": IdxFile("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                                      "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
    "t10k-labels-idx1-ubyte": IdxFile("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                                      "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
}
IDX_SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
"""(images, labels) file stems of each split, in a folder as MNIST and Fashion-MNIST name them"""

NAMED_DATA = {
    DIGITS: NamedData(8, 1, tuple(str(i) for i in range(10))),  # data.digits.DIGITS_SIZE
    FASHION: NamedData(32, 1, FASHION_CLASSES),
}


def hub_name(stem: str) -> str:
    """The downloader's name of a Fashion-MNIST file (its cache path under $DITLAB_HOME, and its
    path under a mirror): fashion-mnist/<stem>.gz."""
    return f"{FASHION}/{stem}.gz"
