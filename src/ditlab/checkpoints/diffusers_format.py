"""diffusers' DiT folder format ("diffusers"): `DiTTransformer2DModel.save_pretrained` folders (or
a DiTPipeline folder with one in transformer/, whose vae/ then comes along), read and written."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ditlab.checkpoints.dit_checkpoint import KNOWN, DiTCheckpoint, save_safetensors, single_set, verify_digest
from ditlab.checkpoints.state import torch_load
from ditlab.errors import UserError, UserFileNotFoundError, one_line

DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")  # the latter: diffusers < 0.28 DiT folders
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_SAFETENSORS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_BIN = "diffusion_pytorch_model.bin"
DIFFUSERS_MLP_RATIO = 4.0  # fixed in diffusers' DiT
DIFFUSERS_LABEL_DROPOUT = 0.1  # fixed in its CombinedTimestepLabelEmbeddings: the null-label row exists
DIFFUSERS_MIN_VERSION = "0.30.0"  # the first diffusers with DiTTransformer2DModel


def _diffusers_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (folder / DIFFUSERS_SAFETENSORS).is_file():
        from safetensors import safe_open

        path = folder / DIFFUSERS_SAFETENSORS
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        sd = load_file(str(path))
        verify_digest(sd, metadata, path)
        return sd
    if (folder / DIFFUSERS_INDEX).is_file():
        shards = sorted(set(json.loads((folder / DIFFUSERS_INDEX).read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(str(folder / shard)).items()}
    if (folder / DIFFUSERS_BIN).is_file():
        return torch_load(folder / DIFFUSERS_BIN)
    raise UserFileNotFoundError(f"{folder}: no {DIFFUSERS_SAFETENSORS}, {DIFFUSERS_INDEX} or {DIFFUSERS_BIN}")


def read_diffusers(folder: Path, weights: str) -> DiTCheckpoint:
    from ditlab.models.convert import config_from_diffusers, from_diffusers

    single_set(folder, weights)
    root, vae = folder, None
    if not (folder / DIFFUSERS_CONFIG).is_file() and (folder / "transformer" / DIFFUSERS_CONFIG).is_file():
        folder = folder / "transformer"  # a whole DiTPipeline folder: use its VAE too
        vae = str(root / "vae") if (root / "vae" / DIFFUSERS_CONFIG).is_file() else None
    if not (folder / DIFFUSERS_CONFIG).is_file():
        raise UserError(f"{root}: a folder without {DIFFUSERS_CONFIG}, so not a diffusers DiT ({KNOWN})")
    try:
        dconfig = json.loads((folder / DIFFUSERS_CONFIG).read_text())
        cls = dconfig.get("_class_name")
        norm = dconfig.get("norm_type", "ada_norm_zero" if cls == DIFFUSERS_CLASSES[0] else None)
        if cls not in DIFFUSERS_CLASSES or norm != "ada_norm_zero":
            raise UserError(f"a {cls} with norm_type {norm}, not diffusers' DiT")
        config = {"mlp_ratio": DIFFUSERS_MLP_RATIO, "class_dropout_prob": DIFFUSERS_LABEL_DROPOUT,
                  **config_from_diffusers(dconfig)}
        sd = from_diffusers(_diffusers_weights(folder), config["input_size"], config["patch_size"])
    except FileNotFoundError:
        raise
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise UserError(f"{folder}: cannot read it as a diffusers DiT ({one_line(e)})") from e
    return DiTCheckpoint(sd, config, "diffusers", str(root), vae=vae)


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
    save_safetensors(sd, path / DIFFUSERS_SAFETENSORS, {"format": "pt"})
    (path / DIFFUSERS_CONFIG).write_text(json.dumps(dconfig, indent=2, sort_keys=True) + "\n")


