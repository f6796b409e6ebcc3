"""DiT models: the network, its named configs and its compute count."""

from ditlab.models.configs import MODEL_CONFIGS, create_model
from ditlab.models.dit import BLOCKS, DiT
from ditlab.models.flops import count_gflops, count_macs

__all__ = ["BLOCKS", "DiT", "MODEL_CONFIGS", "count_gflops", "count_macs", "create_model"]
