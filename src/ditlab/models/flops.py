"""Analytic compute of one DiT forward pass, counted as the paper counts "Gflops":
multiply-accumulates for one image, every Linear and the patch convolution, plus the two
attention matmuls (QK^T and AV). Elementwise work (norms, activations, softmax) is not counted.

Everything is derived from the model's hyper-parameters, so a model built on the meta device
(e.g. DiT-XL/2 at 512x512) is counted without allocating a weight."""

from __future__ import annotations

from ditlab.models.dit import DiT


def _linear(tokens: int, d_in: int, d_out: int) -> int:
    return tokens * d_in * d_out


def _attention(q_tokens: int, kv_tokens: int, dim: int) -> int:
    """QK^T (q x kv x dim) and AV (q x kv x dim) summed over heads."""
    return 2 * q_tokens * kv_tokens * dim


def count_macs(model: DiT) -> int:
    """Multiply-accumulates of one forward pass of one image through `model`."""
    cfg = model.config
    D, p, C = cfg["hidden_size"], cfg["patch_size"], cfg["in_channels"]
    T = (cfg["input_size"] // p) ** 2
    mlp_hidden = int(D * cfg["mlp_ratio"])
    block = cfg["block"]
    n_cond = 2 if cfg["num_classes"] else 1  # conditioning tokens: [t, y] or [t]

    macs = _linear(T, p * p * C, D)  # patch embedding
    macs += _linear(1, model.t_embedder.frequency_size, D) + _linear(1, D, D)  # timestep MLP
    tokens = T + n_cond if block == "in-context" else T
    per_block = (
        _linear(tokens, D, 3 * D)  # qkv
        + _attention(tokens, tokens, D)  # self-attention matmuls
        + _linear(tokens, D, D)  # attention output projection
        + _linear(tokens, D, mlp_hidden) + _linear(tokens, mlp_hidden, D)  # MLP
    )
    if block == "adaln-zero":
        per_block += _linear(1, D, 6 * D)
    elif block == "adaln":
        per_block += _linear(1, D, 4 * D)
    elif block == "cross-attn":
        per_block += (
            _linear(T, D, D)  # queries
            + _linear(n_cond, D, 2 * D)  # keys and values of the conditioning tokens
            + _attention(T, n_cond, D)
            + _linear(T, D, D)  # output projection
        )
    macs += cfg["depth"] * per_block
    if block in ("adaln-zero", "adaln"):
        macs += _linear(1, D, 2 * D)  # final adaLN modulation
    out_channels = 2 * C if cfg["learn_sigma"] else C
    macs += _linear(T, D, p * p * out_channels)  # final linear decoder
    return macs


def count_gflops(model: DiT) -> float:
    """The paper's "Gflops": multiply-accumulates of one forward of one image / 1e9."""
    return count_macs(model) / 1e9
