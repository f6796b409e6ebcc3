"""Loading DiT weights with one-line errors, and reading a DiT config off a state dict."""

from __future__ import annotations

import math
from typing import Any

import torch

from ditlab.errors import UserError
from ditlab.models.configs import SIZES
from ditlab.models.dit import DiT


def check_weights(model: DiT, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise a one-line ValueError unless `state_dict` has exactly `model`'s keys and shapes
    (works on a model built on the meta device)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (checkpoint vs model), e.g. {wrong[0]}")
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
        c = model.config
        desc = f"depth {c['depth']}, hidden {c['hidden_size']}, patch {c['patch_size']}, input {c['input_size']}"
        raise UserError(f"state dict does not fit this DiT ({desc}): " + "; ".join(parts))


def load_weights(model: DiT, state_dict: dict[str, torch.Tensor], assign: bool = False) -> None:
    """Strictly load `state_dict` into `model`; a mismatch raises a one-line ValueError.

    assign=True makes the tensors of `state_dict` the model's own (no copy), as a model built on
    the meta device needs."""
    check_weights(model, state_dict)
    model.load_state_dict(state_dict, strict=True, assign=assign)


def infer_config(state_dict: dict[str, torch.Tensor], num_heads: int | None = None) -> dict[str, Any]:
    """DiT constructor arguments read off an adaLN-Zero state dict (ours or the authors').

    The number of heads is not stored in weights: unless given, it is taken from the named
    config of the same width (S: 6, B: 12, L and XL: 16)."""
    try:
        proj = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
        pos = state_dict["pos_embed"]  # (1, T, D)
        final = state_dict["final_layer.linear.weight"]  # (p * p * C_out, D)
    except KeyError as e:
        raise UserError(f"not a DiT state dict: no {e.args[0]!r}") from e
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    grid = math.isqrt(pos.shape[1])
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    heads = num_heads or {d["hidden_size"]: d["num_heads"] for d in SIZES.values()}.get(hidden)
    if heads is None:
        widths = ", ".join(str(d["hidden_size"]) for d in SIZES.values())
        raise UserError(f"hidden size {hidden} matches no named DiT config ({widths}), and the weights do not store "
                        "the number of heads")
    if hidden % heads:
        raise UserError(f"hidden size {hidden} is not divisible into {heads} heads")
    table = state_dict.get("y_embedder.embedding_table.weight")
    num_classes, dropout = 0, 0.0
    if table is not None:
        # The authors train with label dropout, which adds the null row; assume it is there.
        num_classes, dropout = table.shape[0] - 1, 0.1
    mlp_hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    return {
        "input_size": grid * patch,
        "patch_size": patch,
        "in_channels": in_channels,
        "hidden_size": hidden,
        "depth": depth,
        "num_heads": heads,
        "mlp_ratio": mlp_hidden / hidden,
        "class_dropout_prob": dropout,
        "num_classes": num_classes,
        "learn_sigma": final.shape[0] == 2 * in_channels * patch * patch,
        "block": "adaln-zero",
    }
