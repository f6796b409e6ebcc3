"""The protocol record: every setting that changes the numbers of a sample batch, written by
`ditlab sample` beside its images (in the .npz as `protocol`, a JSON string array, and in a
sidecar .json) and by `ditlab serve` with every grid; `ditlab eval` prints it with the metrics.

FID gaps in the literature come exactly from these: random against balanced labels (0.1-0.12),
40K against 50K samples, fp32 against mixed precision, guidance on 3 or 4 channels."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ditlab.checkpoints.dit_checkpoint import weights_sha256 as weights_sha256  # the digest lives with the checkpoints
from ditlab.data.npz import read_record as read_record  # the record's read and write live with the .npz format
from ditlab.data.npz import record_array as record_array

RECORD_VERSION = 1
RECORD_TEXT_KEY = "ditlab"  # the PNG text chunk that holds the record of a grid
MODEL_KEYS = ("checkpoint", "checkpoint_file", "checkpoint_format", "weights", "weights_sha256", "model_config",
              "process", "vae", "precision", "autocast", "device", "image_size")
"""What was loaded, and how it runs ("process": the record of its objective and settings, `to_record`)."""
SETTING_KEYS = ("sampler", "steps", "cfg_scale", "guidance_channels", "label_mode", "classes", "seed",
                "num_images", "batch_size", "world_size")
"""How the batch was drawn."""
GUIDANCE_KEYS = ("guidance_interval", "guidance_t", "guide")
"""Where guidance applies and with which guide model (None: everywhere; classifier-free guidance)."""




def sample_record(model: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """The record of one sample batch: `model` holds MODEL_KEYS (what was loaded and how it runs),
    `settings` SETTING_KEYS (how the images were drawn; label_mode "random", "balanced" or
    "classes": the given classes cycled) and, where guided so, GUIDANCE_KEYS (the guide: its checkpoint,
    weights and their SHA-256). Adds the ditlab and torch versions."""
    import ditlab

    record: dict[str, Any] = {"record_version": RECORD_VERSION}
    record.update({k: model[k] for k in MODEL_KEYS})
    record.update({k: settings[k] for k in SETTING_KEYS})
    record.update({k: settings.get(k) for k in GUIDANCE_KEYS})
    record.update({"ditlab": ditlab.__version__, "torch": torch.__version__})
    return record


def record_json(record: Mapping[str, Any]) -> str:
    return json.dumps(record, indent=2, sort_keys=True) + "\n"


def record_path(out: str | Path) -> Path:
    """The sidecar of an output file: samples.npz -> samples.json, grid.png -> grid.json."""
    return Path(out).with_suffix(".json")
