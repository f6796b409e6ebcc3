"""The record of the settings that made an image grid, and the grid as a PNG that carries it.

`sample_record` is the one place the server builds a record: when the common record of
`ditlab sample` exists, it replaces this function."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

RECORD_KEY = "ditlab"  # the PNG text chunk holding the record


def sample_record(model: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """The record of one request: `model` is what the server loaded (checkpoint path and format,
    weights, config, vae, precision, image size), `settings` the request's (classes, per_class,
    cfg_scale, sampler, steps, seed, guidance_channels). Includes the `ditlab sample` command
    that draws the same images (image i: label classes[i // per_class], seed, index i)."""
    import torch

    import ditlab

    classes, per_class = settings["classes"], settings["per_class"]
    labels = [c for c in classes for _ in range(per_class)]
    names = model.get("class_names") or []
    cmd = ["ditlab", "sample", "--ckpt", model["checkpoint"], "--weights", model["weights"], "--vae", model["vae"],
           "--sampler", settings["sampler"], "--steps", str(settings["steps"]), "--cfg-scale",
           repr(settings["cfg_scale"]), "--seed", str(settings["seed"]), "--precision", model["precision"]]
    if settings.get("guidance_channels") is not None:
        cmd += ["--guidance-channels", str(settings["guidance_channels"])]
    n = len(labels) if classes else per_class
    cmd += ["--classes", *map(str, labels)] if classes else ["--num-samples", str(n)]
    cmd += ["--batch-size", str(n), "--nrow", str(grid_columns(len(classes), per_class)), "--out", "grid.png"]
    return {
        "checkpoint": model["checkpoint"], "checkpoint_format": model["checkpoint_format"],
        "weights": model["weights"], "model_config": model["config"], "vae": model["vae"],
        "precision": model["precision"], "image_size": model["image_size"],
        "sampler": settings["sampler"], "steps": settings["steps"], "cfg_scale": settings["cfg_scale"],
        "guidance_channels": settings.get("guidance_channels"), "seed": settings["seed"],
        "classes": classes, "class_names": [names[c] for c in classes] if names else [], "per_class": per_class,
        "labels": labels, "image_indices": [0, n - 1], "ditlab": ditlab.__version__, "torch": torch.__version__,
        "command": " ".join(cmd),
    }


def grid_columns(num_classes: int, per_class: int) -> int:
    """One row per class when there are several images per class, else rows of up to 8."""
    if per_class > 1 and num_classes:
        return per_class
    return max(1, min(8, per_class if not num_classes else num_classes))


def grid_png(images: np.ndarray, ncol: int, record: dict[str, Any]) -> bytes:
    """(N, H, W, C) uint8 images as one PNG grid of `ncol` columns, the record in a text chunk."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from ditlab.sampling.generate import make_grid

    grid = make_grid(images, ncol)
    info = PngInfo()
    info.add_text(RECORD_KEY, json.dumps(record))
    buf = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()
