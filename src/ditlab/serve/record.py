"""The record of the settings that made an image grid, and the grid as a PNG that carries it.

The record is `ditlab sample`'s protocol record (`ditlab.sampling.record.sample_record`, the one
place records are built) plus what a request adds: its classes' names, images per class, every
image's label and the `ditlab sample` command that draws the same images."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from ditlab.sampling.record import RECORD_TEXT_KEY as RECORD_KEY


def sample_record(model: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """The record of one request: `model` is what the server loaded (the engine's meta: checkpoint
    path, file, format and weight digest, weights, config, vae, precision, image size), `settings`
    the request's (classes, per_class, cfg_scale, sampler, steps, seed, guidance_channels). Includes
    the `ditlab sample` command that draws the same images (image i: label classes[i // per_class],
    seed, index i)."""
    from ditlab.sampling.record import sample_record as protocol_record

    classes, per_class = settings["classes"], settings["per_class"]
    labels = [c for c in classes for _ in range(per_class)]
    names = model.get("class_names") or []
    cmd = ["ditlab", "sample", "--ckpt", model["checkpoint"], "--weights", model["weights"], "--vae", model["vae"],
           "--sampler", settings["sampler"], "--steps", str(settings["steps"]), "--cfg-scale",
           repr(settings["cfg_scale"]), "--seed", str(settings["seed"]), "--precision", model["precision"]]
    if settings.get("guidance_channels") is not None:
        cmd += ["--guidance-channels", str(settings["guidance_channels"])]
    objective = (model.get("process") or {}).get("objective", "ddpm")
    if objective != "ddpm":  # a file that records no process (the authors' format) samples as flow only so
        cmd += ["--objective", objective]
    for key in ("guidance_interval", "guidance_t"):
        if settings.get(key) is not None:
            cmd += ["--" + key.replace("_", "-"), *map(repr, settings[key])]
    guide = model.get("guide") if settings.get("guide") else None
    if guide is not None:
        cmd += ["--guide-ckpt", guide["checkpoint"]]
    n = len(labels) if classes else per_class
    cmd += ["--classes", *map(str, labels)] if classes else ["--num-samples", str(n)]
    cmd += ["--batch-size", str(n), "--nrow", str(grid_columns(len(classes), per_class)), "--out", "grid.png"]
    device = model.get("device", "cpu").split(":")[0]
    record = protocol_record({**model, "model_config": model["config"], "device": device},
                             {**settings, "guidance_channels": settings.get("guidance_channels"), "guide": guide,
                              "label_mode": "classes" if classes else "unconditional", "classes": classes,
                              "num_images": n, "batch_size": n, "world_size": 1})
    record.update({"class_names": [names[c] for c in classes] if names else [], "per_class": per_class,
                   "labels": labels, "image_indices": [0, n - 1], "command": " ".join(cmd)})
    return record


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
