"""Reading DiT checkpoints in the four formats `ditlab sample` and `ditlab convert` know.

- "ditlab": a checkpoint of `ditlab train` (keys "model_config", "ema", "model", "config", ...)
  or one written by `ditlab convert` ("model_config" and "ema" or "model");
- "original": the authors' files: a bare state dict (their released DiT-XL-2-256x256.pt) or
  their training checkpoint {"model", "ema", "opt", "args"};
- "diffusers": a `DiTTransformer2DModel.save_pretrained` folder (config.json and weights), or a
  pipeline folder with one in transformer/;
- "safetensors": one .safetensors file of our (= the authors') tensors, the model config as JSON
  in its metadata.

Every reader gives our parameter names and the DiT constructor arguments. Writers live in
`checkpoint_writers.py`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ditlab.checkpoints.state import torch_load
from ditlab.data.latents import INDEX_NAME
from ditlab.errors import UserError, UserFileNotFoundError, one_line
from ditlab.models.configs import model_kwargs
from ditlab.models.dit import DiT
from ditlab.models.weights import check_weights, infer_config, load_weights

FORMATS = ("ditlab", "original", "diffusers", "safetensors")
WEIGHT_SETS = ("ema", "model")  # the EMA weights (sampled from by default) and the raw trained ones
CONFIG_METADATA_KEY = "ditlab_model_config"  # safetensors metadata: the DiT config as JSON
CODEC_METADATA_KEY = "ditlab_vae"  # safetensors metadata: the codec the model was trained with
DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")  # the latter: diffusers < 0.28 DiT folders
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_SAFETENSORS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_BIN = "diffusion_pytorch_model.bin"
DIFFUSERS_MLP_RATIO = 4.0  # fixed in diffusers' DiT
DIFFUSERS_LABEL_DROPOUT = 0.1  # fixed in its CombinedTimestepLabelEmbeddings: the null-label row exists
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


def is_safetensors(path: Path) -> bool:
    """A safetensors file starts with the little-endian u64 length of its JSON header, then '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def codec_of_run(train_config: dict[str, Any] | None) -> str | None:
    """The codec of a `ditlab train` run whose checkpoint does not name it (checkpoints now store
    "vae"): pixel for digits, a latent cache's own codec (if the cache is still there), else --vae."""
    if not train_config:
        return None
    data = str(train_config.get("data", ""))
    if data == "digits":
        return "pixel"
    index = Path(data) / INDEX_NAME
    if index.is_file():
        try:
            return json.loads(index.read_text())["codec"]
        except (ValueError, KeyError, OSError):
            pass
    return train_config.get("vae")


def _pick(obj: dict[str, Any], weights: str, path: Path, what: str) -> dict[str, torch.Tensor]:
    sd = obj.get(weights)
    if not isinstance(sd, dict):
        held = [k for k in WEIGHT_SETS if isinstance(obj.get(k), dict)]
        hint = f"; pass --weights {held[0]}" if held else ""
        raise UserError(f"{path}: {what} without {weights!r} weights (it holds {', '.join(held) or 'none'}){hint}")
    return sd


def _authors_config(sd: dict[str, torch.Tensor], name: str | None, path: Path) -> dict[str, Any]:
    """Config read off an authors' state dict; a named config supplies the number of heads."""
    heads = model_kwargs(name)["num_heads"] if name else None
    try:
        return infer_config(sd, num_heads=heads)
    except ValueError as e:
        hint = " (pass --model)" if "num_heads" in str(e) else ""
        raise UserError(f"{path}: {e}{hint}") from e


def _read_torch(path: Path, weights: str, model: str | None) -> DiTCheckpoint:
    obj = torch_load(path)
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a DiT checkpoint ({KNOWN})")
    if "model_config" in obj:
        sd = _pick(obj, weights, path, "a ditlab checkpoint")
        vae = obj.get("vae") or codec_of_run(obj.get("config"))
        extra = {k: obj[k] for k in ("step",) if k in obj}
        return DiTCheckpoint(sd, dict(obj["model_config"]), "ditlab", str(path), weights, vae, extra)
    if isinstance(obj.get("ema"), dict) or isinstance(obj.get("model"), dict):
        sd = _pick(obj, weights, path, "the authors' training checkpoint")
        name = model or getattr(obj.get("args"), "model", None)
        return DiTCheckpoint(sd, _authors_config(sd, name, path), "original", str(path), weights)
    if "x_embedder.proj.weight" in obj:
        _single_set(path, weights)
        return DiTCheckpoint(obj, _authors_config(obj, model, path), "original", str(path))
    keys = ", ".join(list(obj)[:4])
    raise UserError(f"{path}: a dict with keys {keys}..., not a DiT checkpoint ({KNOWN})")


def _single_set(path: Path, weights: str) -> None:
    if weights != "ema":
        raise UserError(f"{path} holds one set of weights: --weights {weights} applies only to checkpoints with "
                         "both EMA and raw weights")


def _read_safetensors(path: Path, weights: str, model: str | None) -> DiTCheckpoint:
    from safetensors import safe_open

    _single_set(path, weights)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UserError(f"{path}: cannot read it as safetensors ({one_line(e)})") from e
    if any(k.startswith("transformer_blocks.") for k in sd):
        raise UserError(f"{path}: diffusers' weight file; pass the folder that holds it and its config.json")
    if CONFIG_METADATA_KEY in meta:
        config = json.loads(meta[CONFIG_METADATA_KEY])
    else:
        config = _authors_config(sd, model, path)
    return DiTCheckpoint(sd, config, "safetensors", str(path), vae=meta.get(CODEC_METADATA_KEY))


def _diffusers_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (folder / DIFFUSERS_SAFETENSORS).is_file():
        return load_file(str(folder / DIFFUSERS_SAFETENSORS))
    if (folder / DIFFUSERS_INDEX).is_file():
        shards = sorted(set(json.loads((folder / DIFFUSERS_INDEX).read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(str(folder / shard)).items()}
    if (folder / DIFFUSERS_BIN).is_file():
        return torch_load(folder / DIFFUSERS_BIN)
    raise UserFileNotFoundError(f"{folder}: no {DIFFUSERS_SAFETENSORS}, {DIFFUSERS_INDEX} or {DIFFUSERS_BIN}")


def _read_diffusers(folder: Path, weights: str) -> DiTCheckpoint:
    from ditlab.models.convert import config_from_diffusers, from_diffusers

    _single_set(folder, weights)
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


def _check_named(ckpt: DiTCheckpoint, name: str) -> None:
    named = model_kwargs(name)
    diffs = [f"{k} {ckpt.config[k]} (a {name} has {named[k]})" for k in ("depth", "hidden_size", "patch_size",
                                                                           "num_heads") if ckpt.config[k] != named[k]]
    if diffs:
        raise UserError(f"{ckpt.source} does not hold a {name}: {', '.join(diffs)}")


def read_checkpoint(path: str | os.PathLike, weights: str = "ema", model: str | None = None) -> DiTCheckpoint:
    """Read the DiT in `path`, whichever of FORMATS it is in; `weights` picks the EMA ("ema") or
    raw ("model") weights where a file holds both. `model` (a named config, "DiT-XL/2") supplies the
    number of heads the authors' state dicts do not store, and is checked against the weights.

    Unknown, corrupt or mismatching files raise a one-line ValueError naming the file."""
    if weights not in WEIGHT_SETS:
        raise UserError(f"--weights {weights}: choose {' or '.join(WEIGHT_SETS)}")
    p = Path(path).expanduser()
    if p.is_dir():
        ckpt = _read_diffusers(p, weights)
    elif not p.is_file():
        raise UserFileNotFoundError(f"{path}: no such checkpoint file or folder")
    elif is_safetensors(p):
        ckpt = _read_safetensors(p, weights, model)
    else:
        ckpt = _read_torch(p, weights, model)
    if model is not None:
        _check_named(ckpt, model)
    try:
        with torch.device("meta"):
            shell = DiT(**ckpt.config)
        check_weights(shell, ckpt.state_dict)
    except (TypeError, ValueError) as e:
        raise UserError(f"{ckpt.source}: {one_line(e)}") from e
    return ckpt


def build_model(ckpt: DiTCheckpoint, device: torch.device | str = "cpu") -> DiT:
    """The DiT of `ckpt` in eval mode on `device`, its weights in float32 (built on the meta device,
    so no time goes into a random initialisation that the weights replace)."""
    with torch.device("meta"):
        model = DiT(**ckpt.config)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in ckpt.state_dict.items()}
    load_weights(model, sd, assign=True)
    return model.to(device).eval()
