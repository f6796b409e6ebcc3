"""ditlab: Diffusion Transformers (Peebles & Xie, 2023) for PyTorch.

The public names load their modules (and torch) on first use, so that `ditlab --help` and the
light config modules import nothing heavy."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "BLOCKS": "ditlab.models.blocks",
    "DiT": "ditlab.models.dit",
    "DiTConfig": "ditlab.models.dit",
    "MODEL_CONFIGS": "ditlab.models.configs",
    "create_model": "ditlab.models.configs",
    "count_gflops": "ditlab.models.flops",
    "Diffusion": "ditlab.diffusion.process",
    "TrainConfig": "ditlab.training.config",
    "train": "ditlab.training.loop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ditlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
