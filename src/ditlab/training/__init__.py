"""Training: the run configuration, the loop, EMA and checkpoints."""

from ditlab.training.config import TrainConfig
from ditlab.training.loop import train

__all__ = ["TrainConfig", "train"]
