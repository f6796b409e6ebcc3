"""DiT: a Vision Transformer over patches of (latent) images, conditioned on the diffusion
timestep and the class label through one of the four block designs of the paper (section 3.2).
The adaLN-Zero design uses the parameter names of the authors' checkpoints."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ditlab.errors import UserError
from ditlab.models.layers import (
    Attention,
    CrossAttention,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    gated_residual,
    modulate,
    sincos_2d,
)

LN_EPS = 1e-6  # LayerNorm epsilon of the reference implementation


def _norm(dim: int, affine: bool) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=affine, eps=LN_EPS)


class AdaLNZeroBlock(nn.Module):
    """Block with adaptive LayerNorm and zero-initialised residual gates (adaLN-Zero)."""

    n_mod = 6  # shift, scale, gate for attention; the same for the MLP

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = _norm(dim, affine=False)
        self.attn = Attention(dim, num_heads)
        self.norm2 = _norm(dim, affine=False)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.n_mod * dim, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        mod = self.adaLN_modulation(c).chunk(self.n_mod, dim=1)  # 6 x (N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = gated_residual(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        x = gated_residual(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x  # (N, T, D)


class AdaLNBlock(nn.Module):
    """Block whose LayerNorm scale and shift are regressed from the conditioning (adaLN)."""

    n_mod = 4  # shift, scale for attention; the same for the MLP

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = _norm(dim, affine=False)
        self.attn = Attention(dim, num_heads)
        self.norm2 = _norm(dim, affine=False)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.n_mod * dim, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(self.n_mod, dim=1)
        x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (N, T, D)


class CrossAttnBlock(nn.Module):
    """Standard block plus multi-head cross-attention over the conditioning tokens [t, y]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = _norm(dim, affine=True)
        self.attn = Attention(dim, num_heads)
        self.norm2 = _norm(dim, affine=True)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm3 = _norm(dim, affine=True)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), context)  # context (N, S, D)
        x = x + self.mlp(self.norm3(x))
        return x  # (N, T, D)


class InContextBlock(nn.Module):
    """Standard ViT block; the conditioning travels as extra tokens in the sequence."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = _norm(dim, affine=True)
        self.attn = Attention(dim, num_heads)
        self.norm2 = _norm(dim, affine=True)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x  # (N, T + S, D)


BLOCKS: dict[str, type[nn.Module]] = {
    "adaln-zero": AdaLNZeroBlock,
    "adaln": AdaLNBlock,
    "cross-attn": CrossAttnBlock,
    "in-context": InContextBlock,
}


class FinalLayer(nn.Module):
    """Last LayerNorm (adaptive for the adaLN designs) and the linear decoder to p*p*C_out."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, adaptive: bool):
        super().__init__()
        self.adaptive = adaptive
        self.norm_final = _norm(dim, affine=not adaptive)
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


class DiT(nn.Module):
    """Diffusion Transformer: noised latents, timesteps and labels -> noise (and variance)."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        block: str = "adaln-zero",
    ):
        super().__init__()
        if block not in BLOCKS:
            raise UserError(f"unknown block design {block!r}; choose one of {', '.join(BLOCKS)}")
        if num_classes < 0 or depth < 1 or hidden_size < 1:
            raise UserError(f"invalid DiT size: depth={depth} hidden_size={hidden_size} num_classes={num_classes}")
        self.config: dict[str, Any] = dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels,
            hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            class_dropout_prob=class_dropout_prob, num_classes=num_classes,
            learn_sigma=learn_sigma, block=block,
        )  # fmt: skip
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes
        self.num_heads = num_heads
        self.block = block
        self.grad_checkpointing = False  # recompute block activations in backward (saves memory)

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes else None
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(BLOCKS[block](hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        adaptive = block in ("adaln-zero", "adaln")
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, adaptive)
        self.initialize_weights()

    @property
    def null_class(self) -> int | None:
        """The label of the null ("unconditional") row, or None if the model has none."""
        if self.y_embedder is None or not self.y_embedder.has_null:
            return None
        return self.num_classes

    def initialize_weights(self) -> None:
        """The reference initialisation; adaLN-Zero blocks start as the identity."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        grid = self.input_size // self.patch_size
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], grid).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear over flattened patches
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.block == "adaln-zero":
            for block in self.blocks:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
            nn.init.zeros_(self.final_layer.linear.weight)
            nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p * p * C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = self.input_size // p
        # einops: "n (h w) (p q c) -> n c (h p) (w q)"
        x = x.reshape(x.shape[0], h, w, p, p, c)  # (N, h, w, p, p, C)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (N, C, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)  # (N, C, H, W)

    def condition(self, t: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """c = t_emb + y_emb (N, D), and the conditioning tokens [t_emb, y_emb] (N, S, D)."""
        t_emb = self.t_embedder(t)  # (N, D)
        if self.y_embedder is None:
            if y is not None:
                raise UserError("this DiT is unconditional (num_classes=0): call it with y=None")
            return t_emb, t_emb.unsqueeze(1)  # (N, D), (N, 1, D)
        if y is None:
            raise UserError(f"this DiT is class-conditional ({self.num_classes} classes): pass labels y")
        y_emb = self.y_embedder(y, self.training)  # (N, D)
        return t_emb + y_emb, torch.stack([t_emb, y_emb], dim=1)  # (N, D), (N, 2, D)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, C, H, W) noised input, t (N,) original timestep index, y (N,) labels
        (num_classes is the null label) -> (N, C_out, H, W), C_out = 2C with learned sigma."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-2:] != (self.input_size,) * 2:
            raise UserError(
                f"DiT expects input of shape (N, {self.in_channels}, {self.input_size}, {self.input_size}), "
                f"got {tuple(x.shape)}"
            )
        T = self.x_embedder.num_patches
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), where T = H * W / p ** 2
        c, context = self.condition(t, y)  # (N, D), (N, S, D)
        if self.block == "in-context":
            x = torch.cat([x, context.to(x.dtype)], dim=1)  # (N, T + S, D)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, c, context, use_reentrant=False)  # (N, T, D)
            else:
                x = block(x, c, context)  # (N, T, D)
        x = x[:, :T]  # (N, T, D): in-context drops its conditioning tokens
        x = self.final_layer(x, c)  # (N, T, p * p * C_out)
        return self.unpatchify(x)  # (N, C_out, H, W)
