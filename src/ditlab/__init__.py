"""ditlab: Diffusion Transformers (Peebles & Xie, 2023) for PyTorch."""

from ditlab.diffusion import Diffusion
from ditlab.models import BLOCKS, MODEL_CONFIGS, DiT, count_gflops, create_model

__version__ = "0.1.0"

__all__ = ["BLOCKS", "DiT", "Diffusion", "MODEL_CONFIGS", "count_gflops", "create_model"]
