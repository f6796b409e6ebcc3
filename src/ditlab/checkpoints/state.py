"""Training checkpoints: tensors plus plain dicts, loadable with `weights_only=True`, written
atomically (temporary file, then rename) so an interrupted save never leaves a broken file."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from ditlab.errors import UserError, UserFileNotFoundError, one_line
from ditlab.runtime.files import atomic_write

CKPT_PATTERN = re.compile(r"^step-(\d{7,})\.pt$")


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:07d}.pt"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / m.group(0)) for m in map(CKPT_PATTERN.match, os.listdir(folder)) if m]
    return sorted(found)


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep_last: int = 0) -> Path:
    """Write `state` as checkpoints/step-NNNNNNN.pt; keep only the newest `keep_last` (0 = all)."""
    path = checkpoint_path(folder, step)
    atomic_write(path, lambda f: torch.save(state, f))
    if keep_last > 0:
        for _, old in list_checkpoints(folder)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` (weights_only: no code is unpickled)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as e:
        raise UserFileNotFoundError(f"no checkpoint at {path}") from e
    except Exception as e:  # truncated or foreign files
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {one_line(e)}") from e
