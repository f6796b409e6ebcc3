"""The checkpoint type every format's reader gives and every writer takes (`formats.py`, and
diffusers' folders in `diffusers_format.py`), and what those readers and writers share."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ditlab.errors import UserError
from ditlab.runtime.files import fsync_file

DIGEST_METADATA_KEY = "ditlab_weights_sha256"  # safetensors metadata: `weights_sha256` of the tensors in the file
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


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's weights, whatever file format holds them: for each key in sorted
    order, its UTF-8 name, its dtype and shape as text ("torch.float32 (1152, 4, 2, 2)") and a newline,
    then the tensor's bytes (C order, as stored on the CPU: little-endian). Equal weights in a .pt, a
    .safetensors or a diffusers folder give the same digest; a cast to another dtype does not."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach()
        h.update(f"{key}\n{t.dtype} {tuple(t.shape)}\n".encode())
        flat = t.to("cpu").contiguous().reshape(-1)  # (numel,): a 0-d tensor cannot be viewed as bytes
        h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()


def save_safetensors(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A .safetensors file of `sd` with `metadata` and the digest of its tensors (checked on reading)."""
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in sd.items()}
    save_file(sd, str(path), metadata={**metadata, DIGEST_METADATA_KEY: weights_sha256(sd)})
    fsync_file(path)


def verify_digest(sd: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """Check the tensors read from a .safetensors file against the digest ditlab recorded in its
    metadata; a file without one (written by other tools) is used as it is, and said so on stderr."""
    want = metadata.get(DIGEST_METADATA_KEY)
    if want is None:
        print(f"ditlab: note: {path} records no checksum of its weights (not written by ditlab); they are used "
              "unverified", file=sys.stderr)
    elif weights_sha256(sd) != want:
        raise UserError(f"{path}: damaged: its weights do not match the SHA-256 recorded in its metadata")
