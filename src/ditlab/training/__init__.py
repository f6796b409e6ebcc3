"""Training: the run configuration (`config`, light), the loop, the step, EMA, parallelism, the
data order, metrics and resume. `train` and `TrainConfig` load on first use."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"TrainConfig": "ditlab.training.config", "train": "ditlab.training.loop"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ditlab.training' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
