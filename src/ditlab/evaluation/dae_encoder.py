"""Named REPA encoders trained by ditlab: small denoising convolutional autoencoders (self-supervised:
no labels) trained on a named dataset's training images, whose encoder gives REPA's patch features.

REPA aligns a DiT's tokens to a self-supervised encoder (DINOv2). On data DINOv2 never saw and at a
CPU's scale, ditlab trains one of its own the same way: reconstruct the clean training image from one
with Gaussian noise added. It is not the judge (`evaluation.fashion_judge`, a supervised classifier):
aligning to the judge's features would teach to the test.

- `fashion-mnist-dae`: trained on Fashion-MNIST's 60,000 training images at 32 x 32 (28 x 28 padded,
  as ditlab's data gives them); 16 x 16 x 32 patch features.
- `digits-dae`: trained on the bundled digits' 1,500 training images at 8 x 8; 4 x 4 x 64.

Input rule: images (N, 1, H, W) in [-1, 1] of any size are resized to the recipe's training size
(bilinear, antialiased when shrinking; as the judge upsamples), so the feature grid is fixed; REPA
resizes it to the DiT's token grid by area (`training.repa.resize_features`).

The recipe (`DaeRecipe`) fixes seed, data order and noise, so training is deterministic (on one CPU
and thread count). The weights are cached under $DITLAB_HOME/encoders/, named by a digest of the
recipe and of the data (Fashion: its files' SHA-256s; digits: the SHA-256 of its training images),
written atomically, and loaded once per process."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ditlab.errors import UserError

DAE_FORMAT = 1  # bump when the network or the cache file changes
FASHION_DAE, DIGITS_DAE = "fashion-mnist-dae", "digits-dae"
HELDOUT_SEED, HELDOUT_BATCH = 12345, 1000  # the held-out reconstruction error's noise and batch


@dataclass(frozen=True)
class DaeRecipe:
    """How a denoising autoencoder is trained (each field is part of the cache key)."""

    data: str
    """the named dataset whose training images it learns: fashion-mnist or digits"""
    size: int
    """training image size; inputs of any size are resized to it"""
    widths: tuple[int, int, int] = (16, 32, 32)
    """the encoder's 3x3 conv widths: size -> size -> size / 2 (stride 2) -> size / 2; the last is Dz"""
    noise_std: float = 0.5
    """std of the Gaussian noise added to the [-1, 1] image the encoder sees"""
    epochs: int = 1
    batch_size: int = 256
    lr: float = 2e-3
    """Adam's learning rate (constant)"""
    seed: int = 0
    train_limit: int | None = None
    """train on the first N training images only (tests); None: all"""


RECIPES = {
    FASHION_DAE: DaeRecipe("fashion-mnist", 32),
    DIGITS_DAE: DaeRecipe("digits", 8, widths=(32, 64, 64), epochs=16, batch_size=128),
}


class DaeEncoder(nn.Module):
    """The encoder: images (N, 1, H, W) in [-1, 1] -> patch features (N, (size / 2)^2, widths[-1]),
    row-major over the grid. conv3x3-SiLU, conv3x3 stride 2-SiLU, conv3x3."""

    def __init__(self, widths: tuple[int, int, int], size: int):
        super().__init__()
        a, b, c = widths
        self.size = size
        self.net = nn.Sequential(nn.Conv2d(1, a, 3, padding=1), nn.SiLU(), nn.Conv2d(a, b, 3, stride=2, padding=1),
                                 nn.SiLU(), nn.Conv2d(b, c, 3, padding=1))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, 1, size, size) -> (N, Dz, size / 2, size / 2)."""
        return self.net(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 1, H, W) in [-1, 1] -> (N, S, Dz), S = (size / 2)^2."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise UserError(f"the {self.size}x{self.size} denoising-autoencoder REPA encoder takes one-channel images "
                            f"(N, 1, H, W), got {tuple(images.shape)}")
        x = images.float()
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > self.size)
        return self.feature_map(x).flatten(2).transpose(1, 2)  # (N, S, Dz)


def make_decoder(widths: tuple[int, int, int]) -> nn.Module:
    """(N, Dz, size / 2, size / 2) -> (N, 1, size, size): transposed conv 4x4 stride 2 to widths[0]-SiLU, conv3x3."""
    a, _, c = widths
    return nn.Sequential(nn.ConvTranspose2d(c, a, 4, stride=2, padding=1), nn.SiLU(), nn.Conv2d(a, 1, 3, padding=1))


def training_images(recipe: DaeRecipe, split: str = "train") -> tuple[torch.Tensor, str]:
    """The dataset's images of `split` (N, 1, size, size) in [-1, 1] and a digest identifying the data."""
    if recipe.data == "digits":
        from ditlab.data.digits import load_digits_arrays

        images = load_digits_arrays(split, recipe.size)[0]  # (1500, 1, S, S) for training
        return images, hashlib.sha256(images.numpy().tobytes()).hexdigest()
    if recipe.data == "fashion-mnist":
        from ditlab.data.fashion import IdxDataset
        from ditlab.evaluation.fashion_judge import data_digest

        ds = IdxDataset("fashion-mnist", split, recipe.size)
        n = len(ds) if recipe.train_limit is None or split != "train" else min(recipe.train_limit, len(ds))
        return ds.images(slice(0, n)), data_digest()
    raise UserError(f"denoising autoencoder recipe: unknown data {recipe.data!r} (fashion-mnist or digits)")


@torch.no_grad()
def heldout_mse(recipe: DaeRecipe, encoder: DaeEncoder, decoder: nn.Module) -> float:
    """Reconstruction MSE of the held-out images (test split) from their noisy copies (fixed noise)."""
    images = training_images(recipe, "test")[0]  # (M, 1, S, S)
    g = torch.Generator().manual_seed(HELDOUT_SEED)
    total = 0.0
    for i in range(0, len(images), HELDOUT_BATCH):
        x = images[i: i + HELDOUT_BATCH]
        noisy = x + recipe.noise_std * torch.randn(x.shape, generator=g)
        total += float((decoder(encoder.feature_map(noisy)) - x).pow(2).sum())
    return total / images.numel()


def data_digest(recipe: DaeRecipe) -> str:
    """What identifies the recipe's data (without reading Fashion's images: its files' recorded SHA-256s)."""
    if recipe.data == "fashion-mnist":
        from ditlab.evaluation.fashion_judge import data_digest as fashion_digest

        return fashion_digest()
    return training_images(recipe)[1]


def cache_path(recipe: DaeRecipe) -> Path:
    from ditlab.runtime.home import home

    key = json.dumps({"format": DAE_FORMAT, "recipe": dataclasses.asdict(recipe), "data": data_digest(recipe)},
                     sort_keys=True)
    return home() / "encoders" / f"{recipe.data}-dae-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def train_dae(recipe: DaeRecipe, progress: bool = False) -> dict:
    """Train the autoencoder (global RNG untouched); returns what its cache file holds: both halves' weights,
    the mean training MSE of each epoch, the held-out MSE, the training time."""
    images, digest = training_images(recipe)
    if recipe.train_limit is not None:
        images = images[: recipe.train_limit]
    n = len(images)
    steps_per_epoch = n // recipe.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"denoising autoencoder recipe: batch {recipe.batch_size} exceeds the {n} training images")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        encoder, decoder = DaeEncoder(recipe.widths, recipe.size), make_decoder(recipe.widths)
    opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=recipe.lr)
    started, cpu_started = time.time(), time.process_time()
    losses = []
    for epoch in range(recipe.epochs):
        g = torch.Generator().manual_seed(recipe.seed * 1000 + epoch)
        order = torch.randperm(n, generator=g)
        total = 0.0
        for b in range(steps_per_epoch):
            x = images[order[b * recipe.batch_size: (b + 1) * recipe.batch_size]]  # (B, 1, S, S) clean
            noisy = x + recipe.noise_std * torch.randn(x.shape, generator=g)
            loss = (decoder(encoder.feature_map(noisy)) - x).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        losses.append(total / steps_per_epoch)
        if progress:
            print(f"{recipe.data} denoising autoencoder: epoch {epoch + 1}/{recipe.epochs}, "
                  f"reconstruction MSE {losses[-1]:.4f}", file=sys.stderr, flush=True)
    seconds, cpu_seconds = time.time() - started, time.process_time() - cpu_started
    return {"encoder": encoder.state_dict(), "decoder": decoder.state_dict(), "recipe": dataclasses.asdict(recipe),
            "data_sha256": digest, "format": DAE_FORMAT, "epoch_mse": losses,
            "heldout_mse": heldout_mse(recipe, encoder, decoder), "train_seconds": seconds,
            "train_cpu_seconds": cpu_seconds, "threads": torch.get_num_threads()}


_LOADED: dict[str, DaeEncoder] = {}  # cache path -> the frozen encoder, once per process


def read_cached(path: Path, recipe: DaeRecipe) -> DaeEncoder:
    """The encoder stored at `path`; a file that does not read as this recipe's is refused in one line."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        want = json.dumps(dataclasses.asdict(recipe), sort_keys=True)  # tuples and lists alike
        if json.dumps(stored.get("recipe"), sort_keys=True) != want or stored.get("format") != DAE_FORMAT:
            raise ValueError("it holds another recipe")
        encoder = DaeEncoder(recipe.widths, recipe.size)
        encoder.load_state_dict(stored["encoder"])
    except Exception as e:  # any unreadable or foreign file
        raise UserError(f"REPA encoder cache {path} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        "delete it to train the encoder again") from e
    return encoder


def load_dae_encoder(recipe: DaeRecipe, progress: bool = False) -> DaeEncoder:
    """The frozen encoder of `recipe`: memoised, else from the cache, else trained and cached first."""
    from ditlab.evaluation.judges import train_once

    path = cache_path(recipe)
    if str(path) not in _LOADED:
        train_once(path, f"the {recipe.data} denoising autoencoder for REPA", lambda: train_dae(recipe, progress),
                   progress)
        _LOADED[str(path)] = read_cached(path, recipe).eval().requires_grad_(False)
    return _LOADED[str(path)]


def named_dae_data(name: str) -> str | None:
    """The dataset a named encoder was trained on, None for any other --repa-encoder."""
    recipe = RECIPES.get(name)
    return recipe.data if recipe is not None else None
