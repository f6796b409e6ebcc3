"""`ditlab convert`: read a DiT checkpoint in any format, write it in another, atomically.

`--force` replaces only what ditlab itself writes in the target format (a checkpoint file of that
format, or a diffusers DiT folder holding nothing else); any other file or folder is refused, so a
results folder or a user's file is never deleted by a mistyped destination. A training checkpoint
(what `ditlab train` resumes from) is never a destination, nor is the source itself."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ditlab.checkpoints.formats import (
    CONFIG_METADATA_KEY,
    KEEPS_PROCESS,
    WRITERS,
    DiTCheckpoint,
    is_safetensors,
    read_checkpoint,
)
from ditlab.errors import UserError, UserFileExistsError, UserWriteError
from ditlab.runtime.files import atomic_replace


def _not_ours(dst: Path, to: str) -> str | None:
    """Why `dst` is not something ditlab wrote in format `to` (so --force must not replace it),
    or None when it is. Reads only headers and configs, never the weights."""
    from ditlab.checkpoints.diffusers_format import DIFFUSERS_CLASSES, DIFFUSERS_CONFIG, DIFFUSERS_SAFETENSORS

    if to == "diffusers":
        if not dst.is_dir() or dst.is_symlink():
            return "not a folder"
        others = sorted(set(os.listdir(dst)) - {DIFFUSERS_CONFIG, DIFFUSERS_SAFETENSORS})
        if others:
            return f"a folder holding {others[0]}, which a diffusers DiT folder of ditlab's does not"
        try:
            name = json.loads((dst / DIFFUSERS_CONFIG).read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            return f"a folder without a readable {DIFFUSERS_CONFIG}"
        return None if name in DIFFUSERS_CLASSES else f"its {DIFFUSERS_CONFIG} is not a DiT's"
    if not dst.is_file():
        return "a folder" if dst.is_dir() else "not a regular file"
    if to == "safetensors":
        return None if _safetensors_of_ours(dst) else "not a .safetensors file with ditlab's model config"
    try:
        from ditlab.checkpoints.state import torch_load

        obj = torch_load(dst)  # memory-mapped: the tensors are not read
    except ValueError:
        return "not a torch checkpoint"
    if isinstance(obj, dict) and "opt" in obj:
        return "a training checkpoint (weights, EMA, optimizer and step, what `ditlab train` resumes from)"
    key = "model_config" if to == "ditlab" else "x_embedder.proj.weight"
    return None if isinstance(obj, dict) and key in obj else f"not a DiT checkpoint in the {to!r} format"


def _safetensors_of_ours(path: Path) -> bool:
    from safetensors import safe_open

    if not is_safetensors(path):
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return CONFIG_METADATA_KEY in (f.metadata() or {})
    except Exception:  # safetensors raises its own error types for a damaged header
        return False


def _check_destination(src: Path, dst: Path) -> None:
    """Refuse a `dst` that is `src` itself (also through links) or a training checkpoint's name in a
    results folder (checkpoints/step-NNNNNNN.pt: `ditlab train` would resume from a file without its
    optimizer and step), whether or not it exists."""
    from ditlab.checkpoints.state import CKPT_PATTERN

    try:
        same = src.exists() and dst.exists() and os.path.samefile(src, dst)
    except OSError:
        same = False
    if same or (src.exists() and src.resolve() == dst.resolve()):
        raise UserFileExistsError(f"{dst} is the source {src} itself: give another destination; not replaced")
    if CKPT_PATTERN.match(dst.name) and dst.parent.name == "checkpoints":
        raise UserFileExistsError(f"{dst} is a training checkpoint's place in a results folder (`ditlab train` "
                                  "resumes from it): give another destination; not written")


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, weights: str = "ema",
            model: str | None = None, force: bool = False) -> DiTCheckpoint:
    """Convert the DiT checkpoint `src` (any readable format) to `dst` in format `to`; returns what
    was read. `weights` and `model` are as in `read_checkpoint`."""
    if to not in WRITERS:
        raise UserError(f"--to {to}: choose one of {', '.join(WRITERS)}")
    dst = Path(dst).expanduser()
    _check_destination(Path(src).expanduser(), dst)
    if dst.exists() or dst.is_symlink():  # before the (slow) read
        if not force:
            raise UserFileExistsError(f"{dst} exists: pass --force to replace it")
        reason = _not_ours(dst, to)
        if reason is not None:
            raise UserFileExistsError(f"{dst} exists and is {reason}: --force replaces only a {to} checkpoint "
                                      "ditlab wrote; not replaced")
    ckpt = read_checkpoint(src, weights=weights, model=model)
    try:
        atomic_replace(dst, lambda tmp: WRITERS[to](ckpt, tmp))
    except UserWriteError:
        raise
    except ValueError as e:
        raise UserError(f"--to {to}: {e}; {dst} not written") from e
    return ckpt


def process_dropped(ckpt: DiTCheckpoint, to: str) -> str | None:
    """The objective that format `to` cannot record (None: nothing lost): a flow checkpoint written as the
    authors' state dict or a diffusers folder reads back as the paper's DDPM unless sampled with --objective."""
    objective = (ckpt.extra.get("process") or {}).get("objective", "ddpm")
    return None if to in KEEPS_PROCESS or objective == "ddpm" else str(objective)
