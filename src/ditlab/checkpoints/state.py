"""The training state a run saves and resumes from: one schema (`TrainingState`), its file names,
and the one `torch.load` every checkpoint reader goes through.

A checkpoint is tensors plus plain dicts, loadable with `weights_only=True`, written atomically
(temporary file, then rename) so an interrupted save never leaves a broken file. It records the
SHA-256 of every tensor's bytes ("tensor_sha256", computed from the tensors in memory as they are
saved, not from a second read of the file) and one SHA-256 of the whole record ("record_sha256":
every plain value, the step, the config, the data position, and those tensor digests); readers
verify the record and the tensors they use and name the file on a mismatch, so a flipped byte is
never trained on or sampled from. A training checkpoint's step must match its file name. Files
of older ditlab (tensor digests only) still load."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ditlab.errors import UserError, UserFileNotFoundError, one_line
from ditlab.runtime.files import atomic_write

CKPT_PATTERN = re.compile(r"^step-(\d{7,})\.pt$")
CHECKSUM_KEY = "tensor_sha256"  # {"model/x_embedder.proj.weight": hex digest, ...}
RECORD_KEY = "record_sha256"  # hex digest of every other entry: plain values as they are, tensors by digest


@dataclass
class TrainingState:
    """Everything `ditlab train` needs to continue a run exactly, as saved in checkpoints/step-N.pt.
    Its field names are the file's keys; `ditlab sample` reads "model_config", "ema" (or "model")
    and "vae" of it (see checkpoints.formats)."""

    model: dict[str, torch.Tensor]
    """the trained weights (full, unsharded state dict)"""
    ema: dict[str, torch.Tensor]
    """the EMA weights, what sampling uses"""
    opt: dict[str, Any]
    """AdamW's state dict, keyed by parameter name"""
    step: int
    """optimizer steps taken"""
    epoch: int
    """the epoch the next step is in"""
    batch_in_epoch: int
    """the next step's batch within its epoch"""
    dataset_size: int
    """items in the training data; resuming on other data is refused"""
    config: dict[str, Any]
    """the run's TrainConfig as a dict"""
    model_config: dict[str, Any]
    """the DiT constructor arguments"""
    vae: str | None
    """the codec the model was trained with: "pixel", a hub id or an absolute folder"""
    class_names: list[str] | None = None
    """the training data's class names, index = label (an image folder's or a latent cache's class folder
    names, "0".."9" for the digits); None in checkpoints that predate it"""
    world_size: int | None = None
    """the number of processes that trained it (None: not recorded, older checkpoints)"""
    metrics: dict[str, Any] | None = None
    """the metrics row in progress: {"sums": (terms + 2,) tensor averaged over ranks, "count": steps}
    (None: the checkpoint's step was a logged one, or an older checkpoint)"""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path) -> TrainingState:
        optional = ("vae", "class_names", "world_size", "metrics")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in d and f.name not in optional]
        if missing:
            raise UserError(f"{path}: not a ditlab training checkpoint (no {', '.join(missing)})")
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})


def _tensors(obj: Any, prefix: str = "") -> Any:
    """(name, tensor) of every tensor nested in dicts and lists of `obj`, named by their keys ("a/b/0")."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k not in (CHECKSUM_KEY, RECORD_KEY):
                yield from _tensors(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}" if prefix else str(i))


def _digest(t: torch.Tensor) -> str:
    flat = t.detach().cpu().contiguous().reshape(-1)  # (numel,)
    return hashlib.sha256(flat.view(torch.uint8).numpy() if flat.numel() else b"").hexdigest()


def tensor_digests(obj: Any) -> dict[str, str]:
    """The SHA-256 of the bytes of every tensor in `obj`, keyed by its name (see `_tensors`)."""
    return {name: _digest(t) for name, t in _tensors(obj)}


def _leaves(obj: Any, prefix: str = "") -> Iterator[str]:
    """One line per value nested in `obj`: its path (keys with their types), its type and value;
    a tensor by dtype and shape (its bytes are covered by its digest)."""
    if isinstance(obj, torch.Tensor):
        yield f"{prefix} tensor {obj.dtype} {tuple(obj.shape)}"
    elif isinstance(obj, dict):
        items = [(k, v) for k, v in obj.items() if k not in (CHECKSUM_KEY, RECORD_KEY)]
        yield f"{prefix} dict {len(items)}"
        for k, v in items:
            yield from _leaves(v, f"{prefix}/{type(k).__name__}:{k}")
    elif isinstance(obj, (list, tuple)):
        yield f"{prefix} {type(obj).__name__} {len(obj)}"
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{prefix}/{i}")
    else:
        yield f"{prefix} {type(obj).__name__} {obj!r}"


def record_digest(obj: dict[str, Any]) -> str:
    """The SHA-256 of the whole record `obj`: every plain value (step, config, data position, RNG
    state) and the recorded tensor digests; so together with those, every byte that matters."""
    h = hashlib.sha256()
    for line in _leaves(obj):
        h.update(line.encode() + b"\n")
    h.update(json.dumps(obj.get(CHECKSUM_KEY), sort_keys=True).encode())
    return h.hexdigest()


def with_checksums(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` with its tensor digests and its record digest, as every ditlab checkpoint is saved."""
    obj = {**obj, CHECKSUM_KEY: tensor_digests(obj)}
    obj[RECORD_KEY] = record_digest(obj)
    return obj


def verify_tensors(obj: dict[str, Any], path: Path, under: str | None = None) -> None:
    """Check the record of a loaded checkpoint and its tensors (only those named `under/...` if
    given) against the digests it recorded; a file without digests (other tools) passes, one with
    tensor digests only (older ditlab) has its tensors checked."""
    recorded = obj.get(CHECKSUM_KEY)
    if RECORD_KEY in obj and (not isinstance(recorded, dict) or record_digest(obj) != obj[RECORD_KEY]):
        raise UserError(f"{path}: damaged checkpoint: its record (step, config, data position or tensor "
                        "digests) does not match its recorded checksum")
    if not isinstance(recorded, dict):
        return
    part = obj if under is None else {under: obj.get(under)}
    found = dict(_tensors(part))
    for name, want in recorded.items():
        if under is not None and not name.startswith(under + "/"):
            continue
        if name not in found:
            raise UserError(f"{path}: damaged checkpoint: tensor {name} is missing")
        if _digest(found[name]) != want:
            raise UserError(f"{path}: damaged checkpoint: tensor {name} does not match its recorded checksum")


def _reason(e: BaseException) -> str:
    """torch.load's error in one short line, without its advice to load unsafely."""
    if isinstance(e, pickle.UnpicklingError):
        return "it holds Python objects beyond tensors and plain containers, which safe loading refuses"
    return one_line(e).split(". ")[0][:200]  # torch's first sentence says what; the rest is advice


def torch_load(path: Path, what: str = "a torch checkpoint") -> Any:
    """torch.load with weights_only (argparse.Namespace allowed: the authors' training checkpoints
    hold their args); memory-mapped when the file is in the zip format, so unused entries (the
    optimizer state of a training checkpoint, when sampling) are never read."""
    try:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"
    except FileNotFoundError as e:
        raise UserFileNotFoundError(f"{path}: no such checkpoint") from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as e:  # truncated, foreign or unsafe pickles
        raise UserError(f"{path}: cannot read it as {what} ({_reason(e)})") from e


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:07d}.pt"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / m.group(0)) for m in map(CKPT_PATTERN.match, os.listdir(folder)) if m]
    return sorted(found)


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep_last: int = 0) -> Path:
    """Write the dict `state` as folder/step-NNNNNNN.pt; keep only the newest `keep_last` (0 = all)."""
    path = checkpoint_path(folder, step)
    state = with_checksums(state)
    atomic_write(path, lambda f: torch.save(state, f))
    if keep_last > 0:
        for _, old in list_checkpoints(folder)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The dict a checkpoint file holds (weights_only: no code is unpickled)."""
    try:
        obj = torch_load(path, "a checkpoint")
    except UserFileNotFoundError:
        raise
    except UserError as e:
        reason = _reason(e.__cause__) if e.__cause__ is not None else one_line(e)
        raise UserError(f"cannot read checkpoint {path}: {reason}") from e
    if not isinstance(obj, dict):
        raise UserError(f"cannot read checkpoint {path}: it holds a {type(obj).__name__}")
    verify_tensors(obj, path)
    named = CKPT_PATTERN.match(path.name)
    if named and isinstance(obj.get("step"), int) and obj["step"] != int(named.group(1)):
        raise UserError(f"{path}: damaged checkpoint: it holds step {obj['step']}, its name says {int(named.group(1))}")
    return obj


def save_state(folder: Path, state: TrainingState, keep_last: int = 0) -> Path:
    """Write `state` as folder/step-NNNNNNN.pt (see `save_checkpoint`)."""
    return save_checkpoint(folder, state.step, state.to_dict(), keep_last)


def load_state(path: Path) -> TrainingState:
    """The TrainingState saved at `path` (one-line errors for missing, truncated or foreign files)."""
    return TrainingState.from_dict(load_checkpoint(path), path)
