"""REPA's projector (Yu et al. 2025, sihyun-yu/REPA): a 3-layer MLP with SiLU that maps the DiT's
tokens after block `repa_depth` to the width of a frozen encoder's patch features, for the
alignment loss of `training.repa`. It is a submodule of the DiT named as REPA's (`projectors.0.*`,
so REPA's SiT state dicts load strictly), trained, saved and resumed with the model, and dropped
where a checkpoint is read for sampling (`drop_projector`): it plays no part in generation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ditlab.errors import UserError

REPA_WIDTH = 2048  # REPA's projector_dim
REPA_DEPTH_XL = 8  # REPA's encoder_depth for SiT-XL/2: the tokens after block 8 are aligned
PROJECTOR_PREFIX = "projectors."  # the state-dict keys of the projector
NO_PROJECTOR = {"repa_dim": 0, "repa_depth": 0, "repa_width": REPA_WIDTH}  # the config fields of a DiT without one


class Projector(nn.Sequential):
    """tokens (N, T, D) -> predicted encoder features (N, T, z_dim): Linear, SiLU, Linear, SiLU, Linear."""

    def __init__(self, dim: int, width: int, z_dim: int):
        super().__init__(nn.Linear(dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, z_dim))


def default_repa_depth(depth: int) -> int:
    """REPA's block for a DiT of `depth` blocks: 8 for 24 or more (REPA's L/2 and XL/2), else depth // 3
    (REPA's B/2: 4 of 12), at least 1."""
    return REPA_DEPTH_XL if depth >= 24 else max(1, depth // 3)


def check_repa_config(depth: int, repa_dim: int, repa_depth: int, repa_width: int) -> None:
    """Refuse a projector that cannot be built, naming the setting."""
    if repa_dim < 0 or repa_width < 1:
        raise UserError(f"REPA projector: feature width {repa_dim} must be 0 (none) or more, its width {repa_width} "
                        "positive")
    if repa_dim and not 1 <= repa_depth <= depth:
        raise UserError(f"--repa-depth {repa_depth}: REPA reads the tokens after one of the {depth} blocks "
                        f"(1 to {depth})")


def drop_projector(config: dict[str, Any], state_dict: dict[str, torch.Tensor]
                   ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:  # fmt: skip
    """The config and weights of the same DiT without its REPA projector (what sampling needs)."""
    kept = {k: v for k, v in state_dict.items() if not k.startswith(PROJECTOR_PREFIX)}
    if len(kept) == len(state_dict) and not config.get("repa_dim"):
        return config, state_dict
    return {**config, **NO_PROJECTOR}, kept
