"""Loading DiT weights with one-line errors, and reading a DiT config off a state dict."""

from __future__ import annotations

import math
from typing import Any

import torch

from ditlab.errors import UserError
from ditlab.models.configs import SIZES
from ditlab.models.dit import DiT
from ditlab.models.layers import SWIGLU_FRACTION, mlp_hidden
from ditlab.models.repa import NO_PROJECTOR

DEFAULT_MLP_RATIO = 4.0
ADALN_ZERO_MODULATIONS = 6  # shift, scale, gate for attention and for the MLP


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


def _block_options(sd: dict[str, torch.Tensor], hidden: int) -> dict[str, Any]:
    """norm, qk_norm, mlp, pos and mlp_ratio read off the keys of an adaLN-Zero state dict (ours or
    LightningDiT's): a weight on norm1 is RMSNorm's (adaLN-Zero's LayerNorm has none), q_norm with a
    bias is a LayerNorm, w12 is SwiGLU, rotary tables (`feat_rope.*`) mean RoPE, with or without the
    sin-cos table `pos_embed`."""
    qk = "none"
    if "blocks.0.attn.q_norm.weight" in sd:
        qk = "layernorm" if "blocks.0.attn.q_norm.bias" in sd else "rmsnorm"
    if "blocks.0.mlp.w12.weight" in sd:
        mlp, width = "swiglu", sd["blocks.0.mlp.w12.weight"].shape[0] // 2
        near = range(math.floor(width / SWIGLU_FRACTION) - 1, math.ceil(width / SWIGLU_FRACTION) + 2)  # GELU widths
        ratios = [DEFAULT_MLP_RATIO] + [h / hidden for h in near]
        ratio = next((r for r in ratios if mlp_hidden("swiglu", hidden, r) == width), None)
        if ratio is None:
            raise UserError(f"SwiGLU hidden width {width} is int(2/3 x int(r x {hidden})) for no MLP ratio r")
    else:
        mlp, ratio = "gelu", sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    rope = "feat_rope.freqs_cos" in sd
    pos = ("sincos+rope" if "pos_embed" in sd else "rope") if rope else "sincos"
    norm = "rmsnorm" if "blocks.0.norm1.weight" in sd else "layernorm"
    return {"norm": norm, "qk_norm": qk, "mlp": mlp, "pos": pos, "mlp_ratio": ratio}


def infer_config(state_dict: dict[str, torch.Tensor], num_heads: int | None = None) -> dict[str, Any]:
    """DiT constructor arguments read off an adaLN-Zero state dict (ours, the authors' or LightningDiT's).

    The number of heads is not stored in weights (except as the width of a rotary table, which then
    decides): unless given, it is taken from the named config of the same width (S: 6, B: 12, L and XL: 16)."""
    try:
        proj = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
        final = state_dict["final_layer.linear.weight"]  # (p * p * C_out, D)
        # the tokens of the sin-cos table (1, T, D), or of the rotary table (T, head_dim) where there is none
        key = "pos_embed" if "pos_embed" in state_dict else "feat_rope.freqs_cos"
        tokens = state_dict[key].shape[1 if key == "pos_embed" else 0]
    except KeyError as e:
        raise UserError(f"not a DiT state dict: no {e.args[0]!r}") from e
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    grid = math.isqrt(tokens)
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    modulation = state_dict.get("blocks.0.adaLN_modulation.1.weight")
    if modulation is not None and modulation.shape[0] != ADALN_ZERO_MODULATIONS * hidden:
        raise UserError(f"blocks regress {modulation.shape[0] // hidden} modulation vectors, not adaLN-Zero's "
                        f"{ADALN_ZERO_MODULATIONS} (LightningDiT's wo_shift blocks are not supported)")
    heads = num_heads or {d["hidden_size"]: d["num_heads"] for d in SIZES.values()}.get(hidden)
    if "feat_rope.freqs_cos" in state_dict:  # the rotary table's width is the head dimension: the heads are stored
        heads = hidden // state_dict["feat_rope.freqs_cos"].shape[1]
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
    options = _block_options(state_dict, hidden)
    return {
        "input_size": grid * patch,
        "patch_size": patch,
        "in_channels": in_channels,
        "hidden_size": hidden,
        "depth": depth,
        "num_heads": heads,
        "mlp_ratio": options.pop("mlp_ratio"),
        "class_dropout_prob": dropout,
        "num_classes": num_classes,
        "learn_sigma": final.shape[0] == 2 * in_channels * patch * patch,
        "block": "adaln-zero",
        **options,
        **NO_PROJECTOR,  # a REPA projector is for training: read for sampling, the DiT has none
    }
