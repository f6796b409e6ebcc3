"""ditlab: Diffusion Transformers (Peebles & Xie, 2023) for PyTorch.

The public names load their modules (and torch) on first use, so that `ditlab --help` and the
light config modules import nothing heavy."""

from __future__ import annotations

from ditlab.lazy import lazy_exports

__version__ = "0.1.0"

# public name -> the module that defines it
_MODULES = {"ditlab.models.blocks": "BLOCKS", "ditlab.models.dit": "DiT DiTConfig",
            "ditlab.models.configs": "MODEL_CONFIGS create_model", "ditlab.models.flops": "count_gflops",
            "ditlab.diffusion.process": "Diffusion", "ditlab.diffusion.flow_matching": "FlowMatching",
            "ditlab.training.config": "TrainConfig", "ditlab.training.loop": "train"}  # fmt: skip
__getattr__, __dir__ = lazy_exports("ditlab", _MODULES)
__all__ = __dir__()
