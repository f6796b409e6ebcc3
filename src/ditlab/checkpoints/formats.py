"""DiT checkpoints in the four formats `ditlab sample` reads and `ditlab convert` writes; each
format's reader and writer side by side (diffusers' folder format in `diffusers_format.py`).

- "ditlab": a checkpoint of `ditlab train` (a `checkpoints.state.TrainingState`) or one written
  by `ditlab convert` ("model_config", "ema" or "model", "vae", "step");
- "original": the authors' files: a bare state dict (their released DiT-XL-2-256x256.pt) or
  their training checkpoint {"model", "ema", "opt", "args"};
- "diffusers": a `DiTTransformer2DModel.save_pretrained` folder (config.json and weights), or a
  pipeline folder with one in transformer/;
- "safetensors": one .safetensors file of our (= the authors') tensors, the model config as JSON
  in its metadata.

Every reader gives our parameter names and the DiT constructor arguments; writers copy the
weights bit for bit (dtype kept)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ditlab.checkpoints.dit_checkpoint import (
    KNOWN,
    DiTCheckpoint,
    save_safetensors,
    single_set,
    verify_digest,
)
from ditlab.checkpoints.state import torch_load, verify_tensors, with_checksums
from ditlab.data.latents import INDEX_NAME
from ditlab.errors import UserError, UserFileNotFoundError, one_line
from ditlab.models.configs import model_kwargs
from ditlab.models.dit import DiT
from ditlab.models.repa import drop_projector
from ditlab.models.weights import check_weights, infer_config, load_weights
from ditlab.options import FORMATS, WEIGHT_SETS

CONFIG_METADATA_KEY = "ditlab_model_config"  # safetensors metadata: the DiT config as JSON
CODEC_METADATA_KEY = "ditlab_vae"  # safetensors metadata: the codec the model was trained with
PROCESS_METADATA_KEY = "ditlab_process"  # safetensors metadata: the record of its process, as JSON
KEEPS_PROCESS = ("ditlab", "safetensors")
"""The formats that record a checkpoint's process (its objective); the authors' state dict and diffusers'
folder hold weights and the DiT config only (`ditlab sample --objective` names the process of such a file)."""
__all__ = ["FORMATS", "WEIGHT_SETS", "DiTCheckpoint", "read_checkpoint", "build_model", "WRITERS"]


def codec_of_run(train_config: dict[str, Any] | None) -> str | None:
    """The codec of a `ditlab train` run whose checkpoint does not name it (checkpoints now store
    "vae"): pixel for digits, a latent cache's own codec (if the cache is still there), else --vae."""
    if not train_config:
        return None
    from ditlab.data.named import NAMED_DATA

    data = str(train_config.get("data", ""))
    if data in NAMED_DATA:
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
        hint = ("; a file with its config (`ditlab convert --to ditlab` or `--to safetensors` of the run's own "
                "checkpoint) reads without this") if "number of heads" in str(e) else ""
        raise UserError(f"{path}: {e}{hint}") from e


# ---- "ditlab" and "original": torch files -------------------------------------------------------


def _save_torch(obj: object, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _read_torch(path: Path, weights: str, model: str | None) -> DiTCheckpoint:
    obj = torch_load(path)
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a DiT checkpoint ({KNOWN})")
    if "model_config" in obj:
        sd = _pick(obj, weights, path, "a ditlab checkpoint")
        verify_tensors(obj, path, under=weights)
        vae = obj.get("vae") or codec_of_run(obj.get("config"))
        extra = {k: obj[k] for k in ("step", "class_names", "process") if obj.get(k) is not None}
        if "process" not in extra and isinstance(obj.get("config"), dict) and "objective" in obj["config"]:
            extra["process"] = dict(obj["config"])  # a run's config names its objective and that one's settings
        if "class_names" not in extra:  # older checkpoints: named after their data, where still readable
            from ditlab.data.classes import training_class_names

            names = training_class_names(obj.get("config"))
            if names is not None:
                extra["class_names"] = names
        return DiTCheckpoint(sd, dict(obj["model_config"]), "ditlab", str(path), weights, vae, extra)
    if isinstance(obj.get("ema"), dict) or isinstance(obj.get("model"), dict):
        sd = _pick(obj, weights, path, "the authors' training checkpoint")
        name = model or getattr(obj.get("args"), "model", None)
        return DiTCheckpoint(sd, _authors_config(sd, name, path), "original", str(path), weights)
    if "x_embedder.proj.weight" in obj:
        single_set(path, weights)
        return DiTCheckpoint(obj, _authors_config(obj, model, path), "original", str(path))
    keys = ", ".join(list(obj)[:4])
    raise UserError(f"{path}: a dict with keys {keys}..., not a DiT checkpoint ({KNOWN})")


def write_ditlab(ckpt: DiTCheckpoint, path: Path) -> None:
    """{"model_config", "ema" (or "model"), "vae"?, "step"?}: what `ditlab sample` reads."""
    obj = {"model_config": ckpt.config, ckpt.weights: ckpt.state_dict, **ckpt.extra}
    if ckpt.vae:
        obj["vae"] = ckpt.vae
    _save_torch(with_checksums(obj), path)


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


# ---- "safetensors" ---------------------------------------------------------------------------------


def is_safetensors(path: Path) -> bool:
    """A safetensors file starts with the little-endian u64 length of its JSON header, then '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def _read_safetensors(path: Path, weights: str, model: str | None) -> DiTCheckpoint:
    from safetensors import safe_open

    single_set(path, weights)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UserError(f"{path}: cannot read it as safetensors ({one_line(e)})") from e
    verify_digest(sd, meta, path)
    if any(k.startswith("transformer_blocks.") for k in sd):
        raise UserError(f"{path}: diffusers' weight file; pass the folder that holds it and its config.json")
    if CONFIG_METADATA_KEY in meta:
        config = json.loads(meta[CONFIG_METADATA_KEY])
    else:
        config = _authors_config(sd, model, path)
    extra = {"process": json.loads(meta[PROCESS_METADATA_KEY])} if PROCESS_METADATA_KEY in meta else {}
    return DiTCheckpoint(sd, config, "safetensors", str(path), vae=meta.get(CODEC_METADATA_KEY), extra=extra)


def write_safetensors(ckpt: DiTCheckpoint, path: Path) -> None:
    """One .safetensors file: our tensors, the DiT config (and the codec and the process, if known) as metadata."""
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(ckpt.config)}
    if ckpt.vae:
        metadata[CODEC_METADATA_KEY] = ckpt.vae
    if ckpt.extra.get("process"):
        metadata[PROCESS_METADATA_KEY] = json.dumps(ckpt.extra["process"])
    save_safetensors(ckpt.state_dict, path, metadata)


# ---- any format --------------------------------------------------------------------------------------


def _check_named(ckpt: DiTCheckpoint, name: str) -> None:
    named = model_kwargs(name)
    diffs = [f"{k} {ckpt.config[k]} (a {name} has {named[k]})" for k in ("depth", "hidden_size", "patch_size",
                                                                           "num_heads") if ckpt.config[k] != named[k]]
    if diffs:
        raise UserError(f"{ckpt.source} does not hold a {name}: {', '.join(diffs)}")


def released_checkpoint(path: str | os.PathLike) -> tuple[Path, str | None, str | None]:
    """(the file to read, the named config its name implies, its objective): a path as it is, but a
    released name (DiT-XL-2-256x256.pt, SiT-XL-2-256x256.pt ...) where no such local file exists is
    fetched through `ditlab.hub`, supplies the heads its state dict does not store, and the process it
    was trained with (its plain state dict cannot say: "flow" for SiT's)."""
    p = Path(path).expanduser()
    from ditlab.hub import RELEASED, fetch

    entry = RELEASED.get(str(path))
    if p.exists() or entry is None or entry.kind != "checkpoint":
        return p, None, None
    return fetch(str(path)), entry.model, entry.objective


def check_released_checkpoint(path: Path, model: str | None = None, implies: dict[str, Any] | None = None) -> None:
    """It loads as the weights of a DiT: a bare state dict (or a training checkpoint's "ema") whose
    tensors have the shapes of the DiT they describe, built with the heads of the named config
    `model` ("DiT-XL/2") where given (the weights do not store them); and, where `implies` is given,
    the DiT the released name implies (constructor arguments: a small DiT served under
    DiT-XL-2-256x256.pt is refused). (`ditlab.hub` checks a download of a released checkpoint with it.)"""
    obj = torch_load(path, "a DiT checkpoint")
    sd = obj.get("ema", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or "x_embedder.proj.weight" not in sd:
        raise UserError("not a DiT state dict")
    heads = model_kwargs(model)["num_heads"] if model else 1
    try:
        found = infer_config(sd, num_heads=heads)
        with torch.device("meta"):
            shell = DiT(**found)  # structure only
        check_weights(shell, sd)
    except (TypeError, ValueError) as e:
        raise UserError(one_line(e)) from e
    diffs = [f"{k} {found.get(k)} (the name implies {v})" for k, v in (implies or {}).items() if found.get(k) != v]
    if diffs:
        raise UserError(f"not the released file: {', '.join(diffs)}")


def read_checkpoint(path: str | os.PathLike, weights: str = "ema", model: str | None = None) -> DiTCheckpoint:
    """Read the DiT in `path`, whichever of FORMATS it is in; `weights` picks the EMA ("ema") or
    raw ("model") weights where a file holds both. `model` (a named config, "DiT-XL/2") supplies the
    number of heads the authors' state dicts do not store, and is checked against the weights. A REPA
    projector (training only) is left out of the weights and the config.

    Unknown, corrupt or mismatching files raise a one-line ValueError naming the file."""
    if weights not in WEIGHT_SETS:
        raise UserError(f"--weights {weights}: choose {' or '.join(WEIGHT_SETS)}")
    p, implied, objective = released_checkpoint(path)
    if p.is_dir():
        from ditlab.checkpoints.diffusers_format import read_diffusers

        ckpt = read_diffusers(p, weights)
    elif not p.is_file():
        raise UserFileNotFoundError(f"{path}: no such checkpoint file or folder")
    elif is_safetensors(p):
        ckpt = _read_safetensors(p, weights, model)
    else:
        ckpt = _read_torch(p, weights, model or implied)
    if model is not None:
        _check_named(ckpt, model)
    # REPA's projector is for training only: what is read here samples, converts or serves without it
    ckpt.config, ckpt.state_dict = drop_projector(ckpt.config, ckpt.state_dict)
    if objective is not None and "process" not in ckpt.extra:
        ckpt.extra["process"] = {"objective": objective}
    try:
        with torch.device("meta"):
            shell = DiT(**ckpt.config)
        check_weights(shell, ckpt.state_dict)
    except (TypeError, ValueError) as e:
        raise UserError(f"{ckpt.source}: {one_line(e)}") from e
    return ckpt


def build_model(ckpt: DiTCheckpoint, device: torch.device | str = "cpu") -> DiT:
    """The DiT of `ckpt` in eval mode on `device`, its weights in float32 (built on the meta device,
    so no time goes into a random initialisation that the weights replace). Weights that are not
    finite (a run that diverged) are refused in one line naming the file and a tensor."""
    bad = next((k for k, v in ckpt.state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise UserError(f"{ckpt.source}: its {ckpt.weights} weights are not finite ({bad} holds NaN or inf): the run "
                        "diverged; use an earlier checkpoint")
    with torch.device("meta"):
        model = DiT(**ckpt.config)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in ckpt.state_dict.items()}
    load_weights(model, sd, assign=True)
    return model.to(device).eval()


def _write_diffusers(ckpt: DiTCheckpoint, path: Path) -> None:
    from ditlab.checkpoints.diffusers_format import write_diffusers

    write_diffusers(ckpt, path)


WRITERS: dict[str, Callable[[DiTCheckpoint, Path], None]] = {
    "ditlab": write_ditlab,
    "original": write_original,
    "diffusers": _write_diffusers,
    "safetensors": write_safetensors,
}
