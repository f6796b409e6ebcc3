"""Your own data: `ditlab.train(config, dataset=...)` with any map-style torch Dataset whose items are
`(x, label)`, x a (C, H, W) tensor that the model sees as it is and label an int in [0, classes).

x is pixels in [-1, 1] (the default) or latents already scaled for the model; optional attributes
of the dataset say which and what else a run needs:
  num_classes  the number of classes (else `TrainConfig.num_classes`; 0: unconditional)
  codec        "pixel" (default) or the VAE (hub id or folder) the latents come from, which the
               EMA sample grids and `ditlab sample` decode with
  flip         True: random horizontal flips drawn by ditlab from the step's generator (default False)
ditlab owns the order (the permutation of each epoch, the split by rank) and every random draw,
and records the dataset's length, so resume is exact: the dataset itself must be deterministic
(the same item for the same index, no randomness of its own)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from ditlab.errors import UserError
from ditlab.training.data import TrainingData

PIXEL = "pixel"


class ModelInputs(Dataset):
    """A user's dataset, its items as (x float32 (C, H, W), label int64 0-dim)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, label = self.dataset[index]
        return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(label, dtype=torch.int64)


def _first_item(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        n = len(dataset)
    except TypeError as e:
        raise UserError(f"dataset={type(dataset).__name__}: a map-style Dataset with a length is needed") from e
    if n == 0:
        raise UserError(f"dataset={type(dataset).__name__} is empty")
    try:
        x, label = ModelInputs(dataset)[0]
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"dataset={type(dataset).__name__}: item 0 must be (tensor (C, H, W), int label) ({e})") from e
    if x.ndim != 3 or x.shape[1] != x.shape[2] or label.ndim != 0:
        raise UserError(f"dataset={type(dataset).__name__}: item 0 is x of shape {tuple(x.shape)} with a label of "
                        f"shape {tuple(label.shape)}; need a square (C, H, W) tensor and a scalar label")
    return x, label


def dataset_training_data(dataset: Dataset, num_classes: int | None) -> TrainingData:
    """The TrainingData of a user's dataset (see the module docstring); `num_classes` is the config's."""
    x, _ = _first_item(dataset)
    classes = getattr(dataset, "num_classes", None) if num_classes is None else num_classes
    if classes is None:
        raise UserError(f"dataset={type(dataset).__name__} has no num_classes attribute: give "
                        "TrainConfig(num_classes=...) (0 trains an unconditional model)")
    codec: Any = getattr(dataset, "codec", PIXEL)
    if not isinstance(codec, str):
        raise UserError(f"dataset.codec {codec!r}: give 'pixel' or the VAE's hub id or folder as a string")
    c, h, _ = x.shape
    kind = "pixels" if codec == PIXEL else "given-latents"  # given latents: used as they are, like pixels
    what = "pixels" if codec == PIXEL else f"latents of {codec}"
    return TrainingData(ModelInputs(dataset), kind, int(classes), c, h, flip=bool(getattr(dataset, "flip", False)),
                        codec_spec=codec,
                        description=f"{type(dataset).__name__}: {len(dataset)} items {c}x{h}x{h}, {what}")
