"""Judges: small classifiers trained on a bundled data set's real images, standing in for Inception
where FID means little (8x8 digits). `ditlab eval SAMPLES.npz digits` scores a sample batch with the
digits judge, and online evaluation (`ditlab train --eval-every`) does the same through the same
function. A judge reports the accuracy of its predicted class against the batch's labels and the
Frechet distance of its hidden features to the real training images.

The seam for another data set's judge: one entry in JUDGES (a judge name -> a factory) and, for
its data to default to it in online evaluation, one in DATA_JUDGES (a --data name -> a judge name)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from ditlab.errors import UserError


class Judge(Protocol):
    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float: ...

    def frechet(self, a: torch.Tensor, b: torch.Tensor) -> float: ...

    @property
    def train_images(self) -> torch.Tensor: ...


def _digits() -> Judge:
    from ditlab.evaluation.digits_judge import DigitsJudge

    return DigitsJudge()


JUDGES: dict[str, Callable[[], Judge]] = {"digits": _digits}
"""judge name -> a factory of the judge (trained once per process, `judge`)"""
DATA_JUDGES: dict[str, str] = {"digits": "digits"}
"""--data name -> the judge online evaluation uses by default"""


def is_judge(name: str) -> bool:
    return name in JUDGES


@functools.cache
def judge(name: str) -> Judge:
    """The judge `name`, trained once per process (its training is deterministic)."""
    if name not in JUDGES:
        raise UserError(f"{name!r} is no judge: choose one of {', '.join(JUDGES)}")
    return JUDGES[name]()


def judge_metrics(name: str, images: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    """The judge's scores of uint8 images (N, H, W, C) as a sample .npz stores them (labels (N,), None:
    an unconditional batch, scored by the Frechet distance alone)."""
    if images.ndim != 4 or images.shape[-1] != 1:
        raise UserError(f"the {name} judge scores one-channel images (N, H, W, 1), got {images.shape}")
    j = judge(name)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - 127.5) / 127.5  # (N, 1, H, W) in [-1, 1]
    result: dict[str, Any] = {"judge": name, "judge_fd": j.frechet(x, j.train_images)}
    if labels is not None:
        result["judge_accuracy"] = j.accuracy(x, torch.from_numpy(np.asarray(labels)))
    return result


def evaluate_with_judge(samples_path: str, name: str) -> dict[str, Any]:
    """`ditlab eval SAMPLES.npz JUDGE`: the judge's scores of a sample batch, with its protocol record."""
    from ditlab.data.npz import NpzImages, read_record, read_samples

    NpzImages(samples_path)  # its layout errors, one line naming the file
    images, labels = read_samples(samples_path)
    return {**judge_metrics(name, images, labels), "num_samples": int(images.shape[0]),
            "protocol": read_record(samples_path), "warnings": []}
