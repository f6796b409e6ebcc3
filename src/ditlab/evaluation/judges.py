"""Judges: classifiers trained on one dataset's real images that judge generated images of it.

Where Inception judges ImageNet samples, a judge judges a small dataset's: the Frechet distance
of its penultimate features of the samples against those of the dataset's held-out real images,
the class accuracy of the samples on their requested labels, and improved precision / recall
(ADM's k-NN method, `metrics.precision_recall`) in the same feature space. Its floor is what real
training images score against the held-out ones at the same count: a sample set cannot be
expected to do better.

`ImageJudge` is the interface `ditlab eval` and `ditlab study` call; `FeatureJudge` implements
`score` and `floor` for any judge that provides `features`, `logits` and `real_images`.
`JUDGES` names the judges by the data they judge. The digits judge (`digits_judge.DigitsJudge`, the
demo's) has an interface of its own for now: `ditlab eval SAMPLES.npz digits` and online evaluation
report its `judge_accuracy` and `judge_fd` (to the real training digits) through `evaluate_with_judge`
too. `DATA_JUDGES` says which judge online evaluation (`ditlab train --eval-every`) uses by default
for a --data name."""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ditlab.errors import UserError
from ditlab.evaluation.metrics import (
    PR_NEIGHBOURS,
    FeatureStats,
    feature_stats,
    frechet_distance,
    manifold_radii,
    precision_recall,
)

JUDGES = {"fashion-mnist": "ditlab.evaluation.fashion_judge:load_fashion_judge"}
"""data name -> "module:function" returning its judge (trained, or read from the cache)"""
DIGITS = "digits"  # the digits judge's name (`digits_judge.DigitsJudge`)
DATA_JUDGES: dict[str, str] = {"digits": DIGITS, "fashion-mnist": "fashion-mnist"}
"""--data name -> the judge online evaluation uses by default"""
FLOOR_SEED = 0  # which real training images stand in for samples in the floor
INFERENCE_CHUNK = 1000  # images read from a sample file at a time
PR_BLOCK = 2048  # rows of one block of k-NN distances: 16 MB rather than ADM's 400 MB blocks, the same values
PIXEL_MID = 127.5  # uint8 pixels p -> (p - 127.5) / 127.5 in [-1, 1]


class ImageJudge(Protocol):
    """A judge of images (N, C, H, W) float in [-1, 1] with labels (N,) int64."""

    name: str
    """the data it judges, e.g. "fashion-mnist" """
    feature_width: int
    """D, the width of its penultimate features"""

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, D) float32."""
        ...

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (N, K) float32."""
        ...

    def score(self, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        """frechet_distance, precision, recall of samples, and class_accuracy on their requested
        labels (left out without labels)."""
        ...

    def floor(self, num_images: int, image_size: int) -> dict[str, float]:
        """`score` of `num_images` real training images at `image_size`."""
        ...

    def num_real(self, split: str) -> int:
        """How many real images `split` ("train" or "test") holds."""
        ...


class FeatureJudge:
    """`score` and `floor` from `features`, `logits` and `real_images` (which subclasses provide)."""

    name: str
    feature_width: int

    def __init__(self) -> None:
        self._reference: dict[int, tuple] = {}  # image size -> (features (M, D), FeatureStats, k-NN radii (M,))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def real_images(self, split: str, image_size: int,
                    index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Real images (N, C, S, S) in [-1, 1] and labels (N,) of "train" or "test" at size S, made as
        training makes them (so a sample set is compared with real images of its own size); only
        the items `index` (N,) when given."""
        raise NotImplementedError

    def num_real(self, split: str) -> int:
        """How many real images `split` holds."""
        raise NotImplementedError

    def reference(self, image_size: int) -> tuple[torch.Tensor, FeatureStats, torch.Tensor]:
        """Features (M, D) of the held-out real images at `image_size`, their statistics and their
        k-NN radii (computed once per size)."""
        if image_size not in self._reference:
            feats = self.features(self.real_images("test", image_size)[0])
            self._reference[image_size] = feats, feature_stats(feats), manifold_radii(feats, batch=PR_BLOCK)
        return self._reference[image_size]

    def score(self, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        if images.dim() != 4 or images.shape[-1] != images.shape[-2] or \
                labels is not None and len(labels) != len(images):
            raise UserError(f"{self.name} judge: need square images (N, C, S, S) and N labels, got "
                            f"{tuple(images.shape)} and {len(labels) if labels is not None else 'no'} labels")
        if len(images) <= PR_NEIGHBOURS:
            raise UserError(f"{self.name} judge: {len(images)} images; precision/recall need more than {PR_NEIGHBOURS}")
        ref, r, radii = self.reference(images.shape[-1])
        feats = self.features(images)
        s = feature_stats(feats)
        precision, recall = precision_recall(ref, feats, batch=PR_BLOCK, ref_radii=radii)
        out = {"frechet_distance": frechet_distance(s.mu, s.sigma, r.mu, r.sigma)}
        if labels is not None:
            predicted = self.logits(images).argmax(1)
            out["class_accuracy"] = float((predicted == labels.to(predicted.device)).double().mean())
        return {**out, "precision": precision, "recall": recall}

    def floor(self, num_images: int, image_size: int) -> dict[str, float]:
        n = self.num_real("train")
        if not 0 < num_images <= n:
            raise UserError(f"{self.name} judge: floor of {num_images} images; it has {n} training images")
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(FLOOR_SEED))[:num_images]
        return self.score(*self.real_images("train", image_size, pick))


def load_judge(data: str, progress: bool = False) -> ImageJudge:
    """The judge of the data named `data` (see `JUDGES`), loaded once per process and cache folder, so
    that its held-out reference features are computed once however often it scores (online evaluation
    scores at every --eval-every)."""
    if data not in JUDGES:
        raise UserError(f"no judge for {data!r}: judges exist for {', '.join(JUDGES)} (and digits)")
    from ditlab.runtime.home import home

    return _loaded_judge(JUDGES[data], str(home()), progress)


@functools.cache
def _loaded_judge(target: str, cache_folder: str, progress: bool) -> ImageJudge:
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)(progress=progress)


def read_sample_images(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The `arr_0` images of a sample batch as (N, 1, H, W) float32 in [-1, 1] (RGB averaged to
    gray), and its `arr_1` labels (N,) int64 if it holds them."""
    import numpy as np

    from ditlab.data.npz import NpzImages

    batch = NpzImages(path)  # layout checks, one line each
    pixels = np.concatenate(list(batch.batches(INFERENCE_CHUNK)))  # (N, H, W, 3)
    images = torch.from_numpy(pixels).float().mean(-1, keepdim=True).permute(0, 3, 1, 2)  # (N, 1, H, W)
    with np.load(path) as f:
        labels = torch.from_numpy(f["arr_1"].astype(np.int64)) if "arr_1" in f.files else None
    if labels is not None and labels.shape != (batch.num_images,):
        raise UserError(f"{path}: arr_1 has shape {tuple(labels.shape)}, expected ({batch.num_images},) labels")
    return (images - PIXEL_MID) / PIXEL_MID, labels


def is_judge(name: str) -> bool:
    """Whether `name` names a judge (`ditlab eval`'s reference, online evaluation's --eval-ref)."""
    return name == DIGITS or name in JUDGES


@functools.cache
def digits_judge() -> Any:
    """The digits judge, trained once per process (its training is deterministic)."""
    from ditlab.evaluation.digits_judge import DigitsJudge

    return DigitsJudge()


def digits_metrics(images: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    """The digits judge's scores of uint8 images (N, H, W, 1) as a sample .npz stores them (labels (N,),
    None: an unconditional batch, scored by the Frechet distance alone)."""
    if images.ndim != 4 or images.shape[-1] != 1:
        raise UserError(f"the digits judge scores one-channel images (N, H, W, 1), got {images.shape}")
    j = digits_judge()
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - PIXEL_MID) / PIXEL_MID  # (N, 1, H, W) in [-1, 1]
    result: dict[str, Any] = {"judge": DIGITS, "judge_fd": j.frechet(x, j.train_images)}
    if labels is not None:
        result["judge_accuracy"] = j.accuracy(x, torch.from_numpy(np.asarray(labels)))
    return result


def evaluate_with_judge(samples_path: str, data: str, progress: bool = False) -> dict[str, Any]:
    """`ditlab eval SAMPLES.npz fashion-mnist` (or `digits`): the judge's metrics of the sample batch,
    beside its floor (real training images at the same count and size) and the judge's own facts."""
    from ditlab.data.npz import NpzImages, read_record, read_samples

    if data == DIGITS:
        NpzImages(samples_path)  # its layout errors, one line naming the file
        pixels, stored = read_samples(samples_path)
        return {**digits_metrics(pixels, stored), "num_samples": int(pixels.shape[0]),
                "protocol": read_record(samples_path), "warnings": []}

    images, labels = read_sample_images(samples_path)
    judge = load_judge(data, progress)
    size = images.shape[-1]
    result = {**judge.score(images, labels), "num_samples": len(images), "image_size": size, "judge": judge.name,
              "feature_width": judge.feature_width,
              "floor": judge.floor(min(len(images), judge.num_real("train")), size),
              "judge_test_accuracy": getattr(judge, "test_accuracy", None), "protocol": read_record(samples_path)}
    warnings = [] if labels is not None else [f"{samples_path} holds no labels (arr_1): no class accuracy"]
    return {**result, "warnings": warnings}


def train_once(path: Path, what: str, train: Callable[[], dict], progress: bool = False) -> None:
    """A network ditlab trains for itself (a judge, REPA's autoencoder), cached: unless `path` holds it,
    `train()` makes its stored dict, written atomically (a killed training leaves no file)."""
    from ditlab.runtime.files import atomic_write

    if path.is_file():
        return
    if progress:
        print(f"training {what} once, cached at {path}", file=sys.stderr, flush=True)
    stored = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(stored, f))
