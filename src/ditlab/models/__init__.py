"""DiT models: the network, its block designs, its named configs and its compute count."""

from ditlab.models.blocks import BLOCKS
from ditlab.models.configs import MODEL_CONFIGS, create_model
from ditlab.models.dit import DiT, DiTConfig
from ditlab.models.flops import count_gflops, count_macs

__all__ = ["BLOCKS", "DiT", "DiTConfig", "MODEL_CONFIGS", "count_gflops", "count_macs", "create_model"]
