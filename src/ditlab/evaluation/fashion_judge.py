"""The Fashion-MNIST judge: a small CNN classifier trained by ditlab on the 60,000 training images.

Its recipe (`JudgeRecipe`) is fixed: seed, data order, flips and learning rate are functions of
the recipe alone, so the same recipe on the same data gives the same judge (to the rounding of the
CPU's kernels). The trained weights are cached under $DITLAB_HOME/judges/, named by a digest of
the recipe and of the data's SHA-256s: a new recipe or other data trains a new judge, and the
cache file (written atomically) is never read for another. Penultimate features: the
`hidden`-wide ReLU layer before the classifier (128)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ditlab.data.fashion import IdxDataset, to_images
from ditlab.data.named import FASHION, FASHION_FILES
from ditlab.evaluation.judges import FeatureJudge

JUDGE_SIZE = 32  # the judge sees 32x32 images (28x28 padded); smaller samples are upsampled to it
INFERENCE_BATCH = 1000
JUDGE_FORMAT = 1  # bump when the network or the cache file changes


@dataclass(frozen=True)
class JudgeRecipe:
    """How the judge is trained (each field is part of the cache key)."""

    channels: tuple[int, int, int] = (16, 32, 64)
    """conv widths of the three 3x3 conv-BN-ReLU-maxpool stages (32 -> 16 -> 8 -> 4)"""
    hidden: int = 128
    """width of the penultimate (feature) layer"""
    epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3
    """AdamW peak learning rate, decayed linearly to 0 over training"""
    weight_decay: float = 1e-4
    flips: bool = True
    """random horizontal flips (drawn from the seed, epoch and batch)"""
    seed: int = 0
    train_limit: int | None = None
    """train on the first N training images only (tests); None: all 60,000"""


DEFAULT_RECIPE = JudgeRecipe()


class FashionNet(nn.Module):
    """conv(3x3)-BN-ReLU-maxpool x3, then a ReLU layer of `hidden` features and a linear classifier."""

    def __init__(self, channels: tuple[int, int, int], hidden: int, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.convs = nn.Sequential(*layers)
        side = JUDGE_SIZE // 2 ** len(channels)
        self.hidden = nn.Linear(c_in * side * side, hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, 1, 32, 32) -> penultimate features (N, hidden)."""
        h = self.convs(x)  # (N, C, 4, 4)
        return F.relu(self.hidden(h.flatten(1)))  # (N, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))  # (N, K)


def data_digest() -> str:
    """SHA-256 over the contents' SHA-256 of the four files (they are checked against these on reading)."""
    return hashlib.sha256("".join(f.raw_sha256 for f in FASHION_FILES.values()).encode()).hexdigest()


def cache_path(recipe: JudgeRecipe) -> Path:
    from ditlab.hub import home

    key = json.dumps({"format": JUDGE_FORMAT, "recipe": dataclasses.asdict(recipe), "data": data_digest()},
                     sort_keys=True)
    return home() / "judges" / f"{FASHION}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def _upsampled(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, S, S) -> (N, 1, 32, 32) clamped to [-1, 1]: bilinear upsampling of smaller samples."""
    x = images.float().clamp(-1, 1)
    if x.shape[-1] != JUDGE_SIZE:
        x = F.interpolate(x, size=(JUDGE_SIZE, JUDGE_SIZE), mode="bilinear", align_corners=False)
    return x


def train_judge(recipe: JudgeRecipe, progress: bool = False) -> dict:
    """Train the judge; returns what its cache file holds (weights, recipe, test accuracy, times)."""
    torch.manual_seed(recipe.seed)
    train = IdxDataset(FASHION, "train", JUDGE_SIZE, progress=progress)
    n = len(train) if recipe.train_limit is None else min(recipe.train_limit, len(train))
    net = FashionNet(recipe.channels, recipe.hidden)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = n // recipe.batch_size
    total = recipe.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / total)
    started, cpu_started = time.time(), time.process_time()
    net.train()
    for epoch in range(recipe.epochs):
        g = torch.Generator().manual_seed(recipe.seed * 1000 + epoch)
        order = torch.randperm(n, generator=g)
        for b in range(steps_per_epoch):
            index = order[b * recipe.batch_size: (b + 1) * recipe.batch_size]
            x = train.images(index)  # (B, 1, 32, 32)
            if recipe.flips:
                flip = torch.rand(len(index), generator=g) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(net(x), train.labels[index])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if progress:
            print(f"fashion judge: epoch {epoch + 1}/{recipe.epochs}, loss {loss.item():.3f}, "
                  f"{time.time() - started:.0f}s", file=sys.stderr, flush=True)
    net.eval()
    test = IdxDataset(FASHION, "test", JUDGE_SIZE)
    with torch.inference_mode():
        predicted = torch.cat([net(test.images(slice(i, i + INFERENCE_BATCH))).argmax(1)
                               for i in range(0, len(test), INFERENCE_BATCH)])
    return {"state_dict": net.state_dict(), "recipe": dataclasses.asdict(recipe), "data_sha256": data_digest(),
            "test_accuracy": float((predicted == test.labels).double().mean()),
            "train_seconds": time.time() - started, "train_cpu_seconds": time.process_time() - cpu_started,
            "threads": torch.get_num_threads()}


class FashionJudge(FeatureJudge):
    """The trained classifier as an `ImageJudge` (see `judges`)."""

    name = FASHION

    def __init__(self, stored: dict):
        super().__init__()
        recipe = stored["recipe"]
        self.recipe = JudgeRecipe(**{**recipe, "channels": tuple(recipe["channels"])})
        self.net = FashionNet(self.recipe.channels, self.recipe.hidden)
        self.net.load_state_dict(stored["state_dict"])
        self.net.eval()
        self.feature_width = self.recipe.hidden
        self.test_accuracy = float(stored["test_accuracy"])
        self.info = {k: stored[k] for k in ("test_accuracy", "train_seconds", "train_cpu_seconds", "threads")}
        self._pixels: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.inference_mode()
    def _run(self, images: torch.Tensor, head: bool) -> torch.Tensor:
        out = []
        for i in range(0, len(images), INFERENCE_BATCH):
            x = _upsampled(images[i: i + INFERENCE_BATCH].cpu())  # (B, 1, 32, 32)
            f = self.net.features(x)
            out.append(self.net.classifier(f) if head else f)
        return torch.cat(out)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images, head=False)  # (N, hidden)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images, head=True)  # (N, 10)

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in self._pixels:
            ds = IdxDataset(FASHION, split)
            self._pixels[split] = ds.pixels, ds.labels  # (N, 28, 28) uint8, (N,)
        return self._pixels[split]

    def num_real(self, split: str) -> int:
        return len(self._split(split)[1])

    def real_images(self, split: str, image_size: int,
                    index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, labels = self._split(split)
        if index is not None:
            pixels, labels = pixels[index], labels[index]
        return to_images(pixels, image_size), labels  # (N, 1, S, S)


def load_fashion_judge(recipe: JudgeRecipe | None = None, progress: bool = False) -> FashionJudge:
    """The judge of `recipe` (default: the standard one) from the cache, trained and cached first if absent."""
    from ditlab.evaluation.judges import train_once

    recipe = recipe or DEFAULT_RECIPE
    path = cache_path(recipe)
    train_once(path, "the Fashion-MNIST judge (a few minutes on a CPU)", lambda: train_judge(recipe, progress),
               progress)
    return FashionJudge(torch.load(path, map_location="cpu", weights_only=True))
