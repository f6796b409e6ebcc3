"""Training: the run configuration (`config`, light), the loop, the step, EMA, parallelism, the
data order, metrics and resume. `train` and `TrainConfig` load on first use."""

from __future__ import annotations

from ditlab.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports("ditlab.training", {"ditlab.training.config": "TrainConfig",
                                                        "ditlab.training.loop": "train"})
__all__ = __dir__()
