"""DiT: a Vision Transformer over patches of (latent) images, conditioned on the diffusion
timestep and the class label through one of the four block designs of the paper (section 3.2).
The adaLN-Zero design uses the parameter names of the authors' checkpoints; the modern block
options (`norm`, `qk_norm`, `mlp`, `pos`) those of LightningDiT's, so that its state dicts load
strictly with the matching options and learn_sigma=False."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ditlab.errors import UserError
from ditlab.models.blocks import BLOCKS, FinalLayer
from ditlab.models.layers import LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_2d
from ditlab.models.repa import REPA_WIDTH, Projector, check_repa_config
from ditlab.models.rope import RotaryEmbedding2D
from ditlab.options import check_block_options


@dataclass(frozen=True, kw_only=True)
class DiTConfig:
    """The constructor arguments of a DiT, validated."""

    input_size: int = 32
    """spatial size of the (latent) input, H = W"""
    patch_size: int = 2
    """p: the input is cut into (input_size / p)^2 tokens of p x p pixels"""
    in_channels: int = 4
    """channels of the input (4 for SD VAE latents)"""
    hidden_size: int = 1152
    """D, the width of every token"""
    depth: int = 28
    """number of blocks"""
    num_heads: int = 16
    """attention heads; must divide hidden_size"""
    mlp_ratio: float = 4.0
    """MLP hidden width / hidden_size"""
    class_dropout_prob: float = 0.1
    """label dropout in training; > 0 also gives the embedding table its null row (label num_classes)"""
    num_classes: int = 1000
    """number of classes; 0 makes an unconditional DiT"""
    learn_sigma: bool = True
    """also predict the variance: 2C output channels"""
    block: str = "adaln-zero"
    """block design, one of models.blocks.BLOCKS"""
    norm: str = "layernorm"
    """the blocks' and final layer's norm: layernorm (the paper's) or rmsnorm (LightningDiT's, with a weight)"""
    qk_norm: str = "none"
    """normalise each head's queries and keys before attention: none, rmsnorm or layernorm"""
    mlp: str = "gelu"
    """gelu (the paper's) or swiglu (hidden width int(2/3 x mlp_ratio x D), LightningDiT's)"""
    pos: str = "sincos"
    """sincos (the fixed table, the paper's), sincos+rope (the table and 2-D rotary q/k, LightningDiT's) or rope"""
    repa_dim: int = 0
    """REPA: the frozen encoder's feature width its projector predicts (0: no projector)"""
    repa_depth: int = 0
    """REPA: the projector reads the tokens after this block (1-based, REPA's encoder_depth; 8 for XL/2)"""
    repa_width: int = REPA_WIDTH
    """REPA: the projector's hidden width"""

    def __post_init__(self) -> None:
        if self.block not in BLOCKS:
            raise UserError(f"unknown block design {self.block!r}; choose one of {', '.join(BLOCKS)}")
        check_block_options(self)
        check_repa_config(self.depth, self.repa_dim, self.repa_depth, self.repa_width)
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)} must be positive")
        if self.num_classes < 0:
            raise UserError(f"--num-classes {self.num_classes} must be 0 (unconditional) or more")
        head_dim = self.hidden_size // self.num_heads
        if "rope" in self.pos and (self.hidden_size % self.num_heads or head_dim % 4):
            raise UserError(f"--pos {self.pos}: the head dimension (hidden size {self.hidden_size} / {self.num_heads} "
                            "heads) must be a whole multiple of 4 for the 2-D rotary embedding")

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels


class DiT(nn.Module):
    """Diffusion Transformer: noised latents, timesteps and labels -> noise (and variance).

    DiT(**kwargs) takes DiTConfig's fields; `model.cfg` is the DiTConfig, `model.config` its dict."""

    def __init__(self, **kwargs: Any):
        super().__init__()
        cfg = self.cfg = DiTConfig(**kwargs)
        self.block_type = BLOCKS[cfg.block]
        self.grad_checkpointing = False  # recompute block activations in backward (saves memory)
        D = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.input_size, cfg.patch_size, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob) if cfg.num_classes else None
        self.pos_embed = None  # the fixed sin-cos table (1, T, D), a frozen parameter as in the authors' files
        if "sincos" in cfg.pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, D), requires_grad=False)
        self.feat_rope = None  # LightningDiT's name for the rotary tables, shared by every block
        if "rope" in cfg.pos:
            self.feat_rope = RotaryEmbedding2D(D // cfg.num_heads, self.x_embedder.grid_size)
        options = {"norm": cfg.norm, "qk_norm": cfg.qk_norm, "mlp": cfg.mlp}
        self.blocks = nn.ModuleList(self.block_type(D, cfg.num_heads, cfg.mlp_ratio, **options)
                                    for _ in range(cfg.depth))  # fmt: skip
        self.projectors = None  # REPA's projector (one, as a list: REPA's names), for training only
        if cfg.repa_dim:
            self.projectors = nn.ModuleList([Projector(D, cfg.repa_width, cfg.repa_dim)])
        self.final_layer = FinalLayer(D, cfg.patch_size, cfg.out_channels, self.block_type.adaptive_final, cfg.norm)
        self.initialize_weights()

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments as a plain dict (what checkpoints store)."""
        return dataclasses.asdict(self.cfg)

    # the settings callers read most, as read-only views of the config
    num_classes = property(lambda self: self.cfg.num_classes)
    in_channels = property(lambda self: self.cfg.in_channels)
    out_channels = property(lambda self: self.cfg.out_channels)
    input_size = property(lambda self: self.cfg.input_size)
    patch_size = property(lambda self: self.cfg.patch_size)
    learn_sigma = property(lambda self: self.cfg.learn_sigma)

    @property
    def null_class(self) -> int | None:
        """The label of the null ("unconditional") row, or None if the model has none."""
        if self.y_embedder is None or not self.y_embedder.has_null:
            return None
        return self.num_classes

    def initialize_weights(self) -> None:
        """The reference initialisation; adaLN-Zero blocks start as the identity. A shell on the meta
        device has nothing to initialise (and normal_ on meta would import torch._dynamo)."""
        if next(self.parameters()).is_meta:
            return

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        if self.pos_embed is not None:
            grid = self.cfg.input_size // self.cfg.patch_size
            self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], grid).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear over flattened patches
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.block_type.zero_init:  # adaLN-Zero: every block starts as the identity
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

    def condition(self, t: torch.Tensor, y: torch.Tensor | None,
                  drop_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """c = t_emb + y_emb (N, D), and the conditioning tokens [t_emb, y_emb] (N, S, D)."""
        t_emb = self.t_embedder(t)  # (N, D)
        if self.y_embedder is None:
            if y is not None:
                raise UserError("this DiT is unconditional (num_classes=0): call it with y=None")
            return t_emb, t_emb.unsqueeze(1)  # (N, D), (N, 1, D)
        if y is None:
            raise UserError(f"this DiT is class-conditional ({self.num_classes} classes): pass labels y")
        y_emb = self.y_embedder(y, self.training, drop_labels)  # (N, D)
        return t_emb + y_emb, torch.stack([t_emb, y_emb], dim=1)  # (N, D), (N, 2, D)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                drop_labels: torch.Tensor | None = None,
                return_projection: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x (N, C, H, W) noised input, t (N,) the time as the process gives it (DDPM's original step
        index, flow matching's float t in [0, 1]: the timestep features take any float), y (N,) labels
        (num_classes is the null label), drop_labels (N,) bool: labels replaced by the null label
        (default: the training-mode dropout) -> (N, C_out, H, W), C_out = 2C with learned sigma.

        return_projection=True (a DiT with a REPA projector) also returns the projector's prediction of
        the encoder's features from the tokens after block repa_depth: (out, (N, T, repa_dim))."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-2:] != (self.input_size,) * 2:
            raise UserError(
                f"DiT expects input of shape (N, {self.in_channels}, {self.input_size}, {self.input_size}), "
                f"got {tuple(x.shape)}"
            )
        T = self.x_embedder.num_patches
        x = self.x_embedder(x)  # (N, T, D), where T = H * W / p ** 2
        if self.pos_embed is not None:
            x = x + self.pos_embed
        c, context = self.condition(t, y, drop_labels)  # (N, D), (N, S, D)
        if self.block_type.extra_tokens:  # in-context: the conditioning joins the sequence
            x = torch.cat([x, context.to(x.dtype)], dim=1)  # (N, T + S, D)
        rope = self.feat_rope.tables() if self.feat_rope is not None else None  # 2 x (T, D / heads)
        if return_projection and self.projectors is None:
            raise UserError("this DiT has no REPA projector (repa_dim=0): it cannot return a projection")
        aligned = self.cfg.repa_depth if return_projection else 0  # the block whose tokens REPA aligns (1-based)
        for i, block in enumerate(self.blocks, start=1):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, c, context, rope, use_reentrant=False)  # (N, T, D)
            else:
                x = block(x, c, context, rope)  # (N, T, D)
            if i == aligned:
                projection = self.projectors[0](x[:, :T]).clone()  # (N, T, repa_dim); a view no more (FSDP2)
        x = x[:, :T]  # (N, T, D): in-context drops its conditioning tokens
        x = self.final_layer(x, c)  # (N, T, p * p * C_out)
        out = self.unpatchify(x)  # (N, C_out, H, W)
        return (out, projection) if return_projection else out
