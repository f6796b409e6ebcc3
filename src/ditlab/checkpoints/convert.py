"""`ditlab convert`: read a DiT checkpoint in any format, write it in another, atomically."""

from __future__ import annotations

import os
from pathlib import Path

from ditlab.checkpoints.formats import WRITERS, DiTCheckpoint, read_checkpoint
from ditlab.errors import UserError, UserFileExistsError
from ditlab.runtime.files import atomic_replace


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, weights: str = "ema",
            model: str | None = None, force: bool = False) -> DiTCheckpoint:
    """Convert the DiT checkpoint `src` (any readable format) to `dst` in format `to`; returns what
    was read. `weights` and `model` are as in `read_checkpoint`."""
    if to not in WRITERS:
        raise UserError(f"--to {to}: choose one of {', '.join(WRITERS)}")
    dst = Path(dst).expanduser()
    if (dst.exists() or dst.is_symlink()) and not force:  # before the (slow) read
        raise UserFileExistsError(f"{dst} exists: pass --force to replace it")
    ckpt = read_checkpoint(src, weights=weights, model=model)
    try:
        atomic_replace(dst, lambda tmp: WRITERS[to](ckpt, tmp))
    except ValueError as e:
        raise UserError(f"--to {to}: {e}; {dst} not written") from e
    return ckpt
