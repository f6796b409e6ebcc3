"""The four block designs of the paper (section 3.2, figure 5) and DiT's final layer. Each block
class declares what differs between the designs, so that the model and the compute count read
it off the class: `n_mod` (adaLN modulation vectors regressed from c), `adaptive_final` (the final
layer's LayerNorm is modulated too), `extra_tokens` (the conditioning travels as tokens in the
sequence), `zero_init` (modulation and final layer start at zero: the block is the identity) and
`extra_macs` (its multiply-accumulates beyond self-attention and the MLP).

Every design takes the modern options (`norm`, `qk_norm`, `mlp`; keyword arguments with the paper's
defaults) and, in `forward`, the rotary tables `rope` of `models.rope` (None without RoPE)."""

from __future__ import annotations

import torch
from torch import nn

from ditlab.models.layers import Attention, CrossAttention, gated_residual, make_mlp, make_norm, modulate

Rope = tuple[torch.Tensor, torch.Tensor] | None  # the (cos, sin) tables, or None without RoPE


def _linear(tokens: int, d_in: int, d_out: int) -> int:
    """Multiply-accumulates of a Linear(d_in, d_out) applied to `tokens` tokens."""
    return tokens * d_in * d_out


def _attention(q_tokens: int, kv_tokens: int, dim: int) -> int:
    """QK^T (q x kv x dim) and AV (q x kv x dim) summed over heads."""
    return 2 * q_tokens * kv_tokens * dim


class Block(nn.Module):
    """Self-attention and an MLP, each behind a LayerNorm, with the conditioning c (N, D) regressed
    into `n_mod` modulation vectors when n_mod > 0 (then the norms have no affine parameters).
    Subclasses set the class attributes and write `forward`."""

    n_mod = 0
    adaptive_final, extra_tokens, zero_init = False, False, False

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, norm: str = "layernorm",
                 qk_norm: str = "none", mlp: str = "gelu"):  # fmt: skip
        super().__init__()
        affine = not self.n_mod
        self.norm1 = make_norm(norm, dim, affine=affine)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.norm2 = make_norm(norm, dim, affine=affine)
        self.mlp = make_mlp(mlp, dim, mlp_ratio)
        if self.n_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.n_mod * dim, bias=True))

    @classmethod
    def extra_macs(cls, tokens: int, n_cond: int, dim: int) -> int:
        """Multiply-accumulates beyond self-attention and the MLP: the modulation regressed from c."""
        return _linear(1, dim, cls.n_mod * dim) if cls.n_mod else 0


class AdaLNZeroBlock(Block):
    """Block with adaptive LayerNorm and zero-initialised residual gates (adaLN-Zero)."""

    n_mod = 6  # shift, scale, gate for attention; the same for the MLP
    adaptive_final, extra_tokens, zero_init = True, False, True

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor, rope: Rope = None) -> torch.Tensor:
        mod = self.adaLN_modulation(c).chunk(self.n_mod, dim=1)  # 6 x (N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = gated_residual(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope))
        x = gated_residual(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x  # (N, T, D)


class AdaLNBlock(Block):
    """Block whose LayerNorm scale and shift are regressed from the conditioning (adaLN)."""

    n_mod = 4  # shift, scale for attention; the same for the MLP
    adaptive_final, extra_tokens, zero_init = True, False, False

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor, rope: Rope = None) -> torch.Tensor:
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(self.n_mod, dim=1)
        x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (N, T, D)


class CrossAttnBlock(Block):
    """Standard block plus multi-head cross-attention over the conditioning tokens [t, y]."""

    @classmethod
    def extra_macs(cls, tokens: int, n_cond: int, dim: int) -> int:
        return (_linear(tokens, dim, dim)  # queries
                + _linear(n_cond, dim, 2 * dim)  # keys and values of the conditioning tokens
                + _attention(tokens, n_cond, dim)
                + _linear(tokens, dim, dim))  # output projection

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, norm: str = "layernorm",
                 qk_norm: str = "none", mlp: str = "gelu"):  # its own order: cross-attention sits mid-block
        nn.Module.__init__(self)
        self.norm1 = make_norm(norm, dim, affine=True)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.norm2 = make_norm(norm, dim, affine=True)
        self.cross_attn = CrossAttention(dim, num_heads, qk_norm)  # no rotation: the context has no positions
        self.norm3 = make_norm(norm, dim, affine=True)
        self.mlp = make_mlp(mlp, dim, mlp_ratio)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor, rope: Rope = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        x = x + self.cross_attn(self.norm2(x), context)  # context (N, S, D)
        x = x + self.mlp(self.norm3(x))
        return x  # (N, T, D)


class InContextBlock(Block):
    """Standard ViT block; the conditioning travels as extra tokens in the sequence."""

    extra_tokens = True  # its cost is the n_cond extra tokens every block attends over

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor, rope: Rope = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)  # the rotation leaves the S conditioning tokens as they are
        x = x + self.mlp(self.norm2(x))
        return x  # (N, T + S, D)


def block_macs(tokens: int, dim: int, mlp_hidden: int, mlp: str = "gelu") -> int:
    """Multiply-accumulates of self-attention and the MLP over `tokens` tokens: every design has them.
    SwiGLU has three matrices (w12 holds two); norms, QK-norm and RoPE are elementwise and add none."""
    mlp_in = 2 * mlp_hidden if mlp == "swiglu" else mlp_hidden
    return (_linear(tokens, dim, 3 * dim)  # qkv
            + _attention(tokens, tokens, dim)  # self-attention matmuls
            + _linear(tokens, dim, dim)  # attention output projection
            + _linear(tokens, dim, mlp_in) + _linear(tokens, mlp_hidden, dim))  # MLP


BLOCKS: dict[str, type[Block]] = {
    "adaln-zero": AdaLNZeroBlock,
    "adaln": AdaLNBlock,
    "cross-attn": CrossAttnBlock,
    "in-context": InContextBlock,
}


class FinalLayer(nn.Module):
    """Last LayerNorm (adaptive for the adaLN designs) and the linear decoder to p*p*C_out."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, adaptive: bool, norm: str = "layernorm"):
        super().__init__()
        self.adaptive = adaptive
        self.norm_final = make_norm(norm, dim, affine=not adaptive)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels, bias=True)
        if adaptive:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.adaptive:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (N, D)
            x = modulate(self.norm_final(x), shift, scale)
        else:
            x = self.norm_final(x)
        return self.linear(x)  # (N, T, p * p * C_out)


def final_macs(tokens: int, dim: int, patch_size: int, out_channels: int, adaptive: bool) -> int:
    """Multiply-accumulates of the final layer: its modulation (adaptive designs) and the decoder."""
    return (_linear(1, dim, 2 * dim) if adaptive else 0) + _linear(tokens, dim, patch_size**2 * out_channels)
