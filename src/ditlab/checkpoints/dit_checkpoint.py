"""The checkpoint type every format's reader gives and every writer takes (`formats.py`, and
diffusers' folders in `diffusers_format.py`), and what those readers and writers share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ditlab.errors import UserError
from ditlab.runtime.files import fsync_file

KNOWN = "a ditlab checkpoint, the authors' .pt, a diffusers DiT folder or a .safetensors file"


@dataclass
class DiTCheckpoint:
    """One set of DiT weights with what is known about it."""

    state_dict: dict[str, torch.Tensor]
    """Our (= the authors') parameter names; tensors as stored (dtype kept)."""
    config: dict[str, Any]
    """DiT constructor arguments."""
    format: str
    """Where it came from: one of FORMATS."""
    source: str
    weights: str = "ema"
    """"ema" or "model"; files with one set of weights count as "ema" (the authors release EMA weights)."""
    vae: str | None = None
    """The codec the model was trained with, where the checkpoint says ("pixel", a hub id or a folder)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """What else a ditlab checkpoint holds: "step", "class_names" (its training data's class names), "process"
    (the record of its training objective, `diffusion.protocol.process_from_record`; absent: the paper's)."""


def single_set(path: Path, weights: str) -> None:
    if weights != "ema":
        raise UserError(f"{path} holds one set of weights: --weights {weights} applies only to checkpoints with "
                         "both EMA and raw weights")


def save_safetensors(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    fsync_file(path)
