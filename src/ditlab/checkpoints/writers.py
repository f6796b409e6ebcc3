"""Writing a DiT checkpoint in each format of `checkpoints.py` (`ditlab convert`).

Writes are atomic: the file or folder is written beside the destination under a temporary name,
then renamed onto it, so an interrupted conversion leaves the destination as it was. Weights are
written bit for bit as read (dtype kept); only names and layout change."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ditlab.checkpoints.formats import (
    CODEC_METADATA_KEY,
    CONFIG_METADATA_KEY,
    DIFFUSERS_CONFIG,
    DIFFUSERS_SAFETENSORS,
    DiTCheckpoint,
    read_checkpoint,
)
from ditlab.errors import UserError, UserFileExistsError
from ditlab.models.weights import infer_config
from ditlab.runtime.files import atomic_replace

DIFFUSERS_MIN_VERSION = "0.30.0"  # the first diffusers with DiTTransformer2DModel


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _save_torch(obj: object, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _save_safetensors(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    _fsync(path)


def write_ditlab(ckpt: DiTCheckpoint, path: Path) -> None:
    """{"model_config", "ema" (or "model"), "vae"?, "step"?}: what `ditlab sample` reads."""
    obj = {"model_config": ckpt.config, ckpt.weights: ckpt.state_dict, **ckpt.extra}
    if ckpt.vae:
        obj["vae"] = ckpt.vae
    _save_torch(obj, path)


def write_original(ckpt: DiTCheckpoint, path: Path) -> None:
    """The authors' layout: a bare state dict. It stores no config, so only DiTs whose config reads
    back from the weights alone (`infer_config`) are accepted."""
    config = ckpt.config
    if config["block"] != "adaln-zero":
        raise UserError(f"the authors' format holds adaLN-Zero DiTs only, not {config['block']!r}")
    if config["num_classes"] and not config["class_dropout_prob"]:
        raise UserError("the authors' format assumes a null-label row (label dropout > 0); this DiT has none")
    try:
        inferred = infer_config(ckpt.state_dict)
    except ValueError as e:
        raise UserError(f"the authors' format cannot describe this DiT: {e}") from e
    for key, value in config.items():
        if key != "class_dropout_prob" and inferred[key] != value:
            raise UserError(f"the authors' format stores no config and {key} would read back as "
                             f"{inferred[key]}, not {value}")
    _save_torch(dict(ckpt.state_dict), path)


def _diffusers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusers")
    except PackageNotFoundError:
        return DIFFUSERS_MIN_VERSION


def write_diffusers(ckpt: DiTCheckpoint, path: Path) -> None:
    """A folder `DiTTransformer2DModel.from_pretrained` loads: config.json and the safetensors
    weights. Its outputs equal ours once `make_diffusers_exact` sets its timestep frequencies."""
    from ditlab.models.convert import diffusers_config, to_diffusers

    config = ckpt.config
    if config["num_classes"] and not config["class_dropout_prob"]:
        raise UserError("diffusers' DiT has a null-label row; this DiT (label dropout 0) has none")
    dconfig = {"_class_name": "DiTTransformer2DModel", "_diffusers_version": _diffusers_version(),
               "norm_type": "ada_norm_zero", **diffusers_config(config)}
    sd = to_diffusers(ckpt.state_dict)
    path.mkdir()
    _save_safetensors(sd, path / DIFFUSERS_SAFETENSORS, {"format": "pt"})
    (path / DIFFUSERS_CONFIG).write_text(json.dumps(dconfig, indent=2, sort_keys=True) + "\n")


def write_safetensors(ckpt: DiTCheckpoint, path: Path) -> None:
    """One .safetensors file: our tensors, the DiT config (and the codec, if known) as metadata."""
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(ckpt.config)}
    if ckpt.vae:
        metadata[CODEC_METADATA_KEY] = ckpt.vae
    _save_safetensors(ckpt.state_dict, path, metadata)


WRITERS: dict[str, Callable[[DiTCheckpoint, Path], None]] = {
    "ditlab": write_ditlab,
    "original": write_original,
    "diffusers": write_diffusers,
    "safetensors": write_safetensors,
}


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
