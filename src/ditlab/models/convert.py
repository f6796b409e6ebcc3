"""Weight layouts of other DiT implementations.

The authors' checkpoints use our adaLN-Zero parameter names as they are. diffusers'
`DiTTransformer2DModel` holds the same weights under other names: the timestep and label
embedders are copied into every block, and the fused qkv projection is split in three."""

from __future__ import annotations

from typing import Any

import torch

from ditlab.errors import UserError
from ditlab.models.repa import NO_PROJECTOR
from ditlab.options import BLOCK_OPTIONS

DIFFUSERS_DOWNSCALE_FREQ_SHIFT = 0  # our timestep frequencies divide by half, not half - 1
DIFFUSERS_NORM_EPS = 1e-6  # the reference LayerNorm epsilon (diffusers' default is 1e-5)

# (ours, diffusers) per-block renames, qkv aside.
_BLOCK_RENAMES = [
    ("adaLN_modulation.1", "norm1.linear"),
    ("attn.proj", "attn1.to_out.0"),
    ("mlp.fc1", "ff.net.0.proj"),
    ("mlp.fc2", "ff.net.2"),
]
_EMBEDDER_RENAMES = [
    ("t_embedder.mlp.0", "norm1.emb.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "norm1.emb.timestep_embedder.linear_2"),
    ("y_embedder.embedding_table", "norm1.emb.class_embedder.embedding_table"),
]
_TOP_RENAMES = [
    ("x_embedder.proj", "pos_embed.proj"),
    ("final_layer.adaLN_modulation.1", "proj_out_1"),
    ("final_layer.linear", "proj_out_2"),
]


def _depth(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in state_dict if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An adaLN-Zero DiT state dict (ours = the authors') -> diffusers' DiTTransformer2DModel."""
    sd = dict(state_dict)
    if "y_embedder.embedding_table.weight" not in sd:
        raise UserError("diffusers' DiTTransformer2DModel is class-conditional only; this DiT is unconditional")
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _TOP_RENAMES:
        for kind in ("weight", "bias"):
            out[f"{theirs}.{kind}"] = sd.pop(f"{ours}.{kind}")
    sd.pop("pos_embed", None)  # diffusers rebuilds the sin-cos table as a buffer
    embed = {}  # diffusers name (inside a block) -> tensor, copied into every block
    for ours, theirs in _EMBEDDER_RENAMES:
        for key in [k for k in sd if k.startswith(ours + ".")]:
            embed[theirs + key[len(ours):]] = sd.pop(key)
    for i in range(_depth(state_dict, "blocks.")):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        out.update({dst + name: value.clone() for name, value in embed.items()})
        for kind in ("weight", "bias"):
            q, k, v = (w.clone() for w in sd.pop(f"{src}attn.qkv.{kind}").chunk(3, dim=0))
            out[f"{dst}attn1.to_q.{kind}"], out[f"{dst}attn1.to_k.{kind}"], out[f"{dst}attn1.to_v.{kind}"] = q, k, v
            for ours, theirs in _BLOCK_RENAMES:
                out[f"{dst}{theirs}.{kind}"] = sd.pop(f"{src}{ours}.{kind}")
    if sd:
        raise UserError(f"cannot convert to diffusers' layout: unexpected keys {sorted(sd)[:5]}")
    return out


def from_diffusers(state_dict: dict[str, torch.Tensor], input_size: int, patch_size: int) -> dict[str, torch.Tensor]:
    """A diffusers DiTTransformer2DModel state dict -> ours (= the authors' layout).

    The per-block copies of the embedders must agree; block 0's are kept."""
    from ditlab.models.layers import sincos_2d

    sd = dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _TOP_RENAMES:
        for kind in ("weight", "bias"):
            out[f"{ours}.{kind}"] = sd.pop(f"{theirs}.{kind}")
    sd.pop("pos_embed.pos_embed", None)
    depth = _depth(state_dict, "transformer_blocks.")
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for ours, theirs in _EMBEDDER_RENAMES:
            for key in [k for k in sd if k.startswith(src + theirs + ".")]:
                value = sd.pop(key)
                name = ours + key[len(src + theirs):]
                if i == 0:
                    out[name] = value
                elif not torch.equal(value, out[name]):
                    raise UserError(f"diffusers checkpoint: block {i}'s copy of {theirs} differs from block 0's")
        for kind in ("weight", "bias"):
            qkv = [sd.pop(f"{src}attn1.to_{n}.{kind}") for n in "qkv"]
            out[f"{dst}attn.qkv.{kind}"] = torch.cat(qkv, dim=0)
            for ours, theirs in _BLOCK_RENAMES:
                out[f"{dst}{ours}.{kind}"] = sd.pop(f"{src}{theirs}.{kind}")
    if sd:
        raise UserError(f"not a diffusers DiTTransformer2DModel state dict: unexpected keys {sorted(sd)[:5]}")
    hidden = out["x_embedder.proj.weight"].shape[0]
    grid = input_size // patch_size
    dtype = out["x_embedder.proj.weight"].dtype  # the table in the weights' dtype, as a cast state dict holds it
    out["pos_embed"] = sincos_2d(hidden, grid).float().unsqueeze(0).to(dtype)
    return out


def diffusers_config(config: dict[str, Any]) -> dict[str, Any]:
    """The DiTTransformer2DModel config that matches one of our adaLN-Zero DiT configs."""
    if config["block"] != "adaln-zero":
        raise UserError(f"diffusers' DiT has only the adaLN-Zero design, not {config['block']!r}")
    if config["mlp_ratio"] != 4.0:
        raise UserError("diffusers' DiT has a fixed MLP ratio of 4")
    modern = [f"{k.replace('_', '-')} {config[k]}" for k, choices in BLOCK_OPTIONS.items()
              if config.get(k, choices[0]) != choices[0]]  # fmt: skip
    if modern:
        raise UserError("diffusers' DiT has the paper's block only (LayerNorm, GELU, sin-cos), not "
                        + ", ".join(modern))
    hidden, heads = config["hidden_size"], config["num_heads"]
    return {
        "num_attention_heads": heads,
        "attention_head_dim": hidden // heads,
        "in_channels": config["in_channels"],
        "out_channels": config["in_channels"] * (2 if config["learn_sigma"] else 1),
        "num_layers": config["depth"],
        "sample_size": config["input_size"],
        "patch_size": config["patch_size"],
        "num_embeds_ada_norm": config["num_classes"],
        "norm_eps": DIFFUSERS_NORM_EPS,
    }


def config_from_diffusers(dconfig: dict[str, Any]) -> dict[str, Any]:
    """Our DiT constructor arguments from a DiTTransformer2DModel config."""
    in_ch, out_ch = dconfig["in_channels"], dconfig.get("out_channels") or dconfig["in_channels"]
    return {
        "input_size": dconfig["sample_size"],
        "patch_size": dconfig["patch_size"],
        "in_channels": in_ch,
        "hidden_size": dconfig["num_attention_heads"] * dconfig["attention_head_dim"],
        "depth": dconfig["num_layers"],
        "num_heads": dconfig["num_attention_heads"],
        "num_classes": dconfig["num_embeds_ada_norm"],
        "learn_sigma": out_ch == 2 * in_ch,
        "block": "adaln-zero",
        **{name: choices[0] for name, choices in BLOCK_OPTIONS.items()},  # the paper's block: diffusers' only one
        **NO_PROJECTOR,
    }


def make_diffusers_exact(model: torch.nn.Module) -> torch.nn.Module:
    """Set a diffusers DiTTransformer2DModel's timestep frequencies to the reference ones."""
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = DIFFUSERS_DOWNSCALE_FREQ_SHIFT
    return model
