"""DiT models: the layers, the four block designs (`blocks`), the network (`dit`), the named
configs (`configs`), the compute count (`flops`), weight mapping and conversion. The names below
load their modules (and torch) on first use, so that the configs' light constants can be read
without them."""

from __future__ import annotations

from ditlab.lazy import lazy_exports

_MODULES = {"ditlab.models.blocks": "BLOCKS", "ditlab.models.dit": "DiT DiTConfig",
            "ditlab.models.configs": "MODEL_CONFIGS create_model", "ditlab.models.flops": "count_gflops count_macs"}
__getattr__, __dir__ = lazy_exports("ditlab.models", _MODULES)
__all__ = __dir__()
