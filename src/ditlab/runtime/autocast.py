"""A sampling model whose forward runs under autocast, and the names of the autocast dtypes that
records carry. Used by `sampling.pipeline` (and through it by `ditlab sample` and `ditlab serve`)."""

from __future__ import annotations

import torch

AUTOCAST_NAMES: dict[torch.dtype | None, str] = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
"""The record's "autocast" of each autocast dtype (None: no autocast)."""


class AutocastModel(torch.nn.Module):
    """A DiT whose forward runs under autocast(dtype); the diffusion maths around it stay float32
    (the guided output is promoted to float32 by the sampler)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype
        self.num_classes: int = getattr(model, "num_classes")  # noqa: B009  (a DiT's; typed here)

    @property
    def null_class(self) -> int | None:
        return getattr(self.model, "null_class")  # noqa: B009

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x, t, y)
