"""DiT models: the layers, the four block designs (`blocks`), the network (`dit`), the named
configs (`configs`), the compute count (`flops`), weight mapping and conversion. The names below
load their modules (and torch) on first use, so that the configs' light constants can be read
without them."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BLOCKS": "ditlab.models.blocks",
    "DiT": "ditlab.models.dit",
    "DiTConfig": "ditlab.models.dit",
    "MODEL_CONFIGS": "ditlab.models.configs",
    "create_model": "ditlab.models.configs",
    "count_gflops": "ditlab.models.flops",
    "count_macs": "ditlab.models.flops",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ditlab.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
