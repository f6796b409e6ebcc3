"""DINOv2 (Oquab et al. 2023): the ViT-S/B/L/g with patch 14 of facebookresearch/dinov2, as its
hub models build them (LayerScale, no block chunks, registers only in the `_reg` variants), in plain
PyTorch: no timm, no xformers, no torch.hub.

Parameter names are the official ones, so a released `dinov2_*_pretrain.pth` loads with
`strict=True`; every dimension is read from the state dict (`config_from_state_dict`), so a local
file of any size works. The number of heads is not stored in a state dict: all four official sizes
use heads of 64 channels (`HEAD_DIM`), which is what is assumed.

The position embedding is learned for `img_size` 518 (37x37 patches) and interpolated bicubically
to the input's patch grid as the official code does it: scale factors (grid + 0.1) / 37 without
antialiasing for the original models, the exact grid size with antialiasing for the register models.
`forward` returns the normalised CLS token (what FD-DINOv2 uses); `forward_features` also returns
the normalised patch tokens (REPA's targets)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ditlab.errors import UserError, UserFileNotFoundError

PATCH_SIZE = 14
HUB_IMG_SIZE = 518  # the hub models' position embedding covers 37x37 patches
HEAD_DIM = 64  # channels per attention head in every official size
LN_EPS = 1e-6
MLP_RATIO = 4
INTERPOLATE_OFFSET = 0.1  # the original models' historical offset to the scale factor (dino issue 8)
ARCHS = {  # official name -> (embed_dim, depth, ffn); "swiglu" is the hub's "swiglufused" without xformers
    "vits14": (384, 12, "mlp"),
    "vitb14": (768, 12, "mlp"),
    "vitl14": (1024, 24, "mlp"),
    "vitg14": (1536, 40, "swiglu"),
}
HUB_REGISTERS = 4  # the `_reg` variants' register tokens


@dataclass(frozen=True)
class DinoConfig:
    """The shape of a DINOv2 ViT (the hub's settings by default)."""

    embed_dim: int
    """token width D"""
    depth: int
    """number of blocks"""
    num_heads: int
    """attention heads (D / 64 in every official size)"""
    ffn: str = "mlp"
    """"mlp" (GELU MLP, fc1/fc2) or "swiglu" (w12/w3, ViT-g)"""
    ffn_hidden: int = 0
    """hidden width of the FFN; 0 means the official rule for `ffn` (4 D, or SwiGLU's 2/3 of it rounded up to 8)"""
    patch_size: int = PATCH_SIZE
    img_size: int = HUB_IMG_SIZE
    """the image size the stored position embedding covers"""
    num_register_tokens: int = 0
    layerscale: bool = True
    """LayerScale (`ls1.gamma`, `ls2.gamma`) after attention and FFN"""
    interpolate_antialias: bool = False
    interpolate_offset: float = INTERPOLATE_OFFSET

    @property
    def hidden(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        h = self.embed_dim * MLP_RATIO
        return h if self.ffn == "mlp" else (int(h * 2 / 3) + 7) // 8 * 8


def hub_config(arch: str, registers: bool = False) -> DinoConfig:
    """The config of the official `dinov2_{arch}` (or `dinov2_{arch}_reg`) hub model, arch in ARCHS."""
    dim, depth, ffn = ARCHS[arch]
    hidden = DinoConfig(dim, depth, dim // HEAD_DIM, ffn).hidden
    if registers:
        return DinoConfig(dim, depth, dim // HEAD_DIM, ffn, hidden, num_register_tokens=HUB_REGISTERS,
                          interpolate_antialias=True, interpolate_offset=0.0)
    return DinoConfig(dim, depth, dim // HEAD_DIM, ffn, hidden)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (bias) and an output projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, C // self.num_heads)  # b t (3 h d) -> b t 3 h d
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, T, C / H) each
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, C / H)
        return self.proj(x.transpose(1, 2).reshape(B, T, C))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """w12 (both halves in one matrix) -> silu(first) * second -> w3: ViT-g's FFN."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    """Per-channel scale `gamma` (D,) of a residual branch."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, cfg: DinoConfig):
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=LN_EPS)
        self.attn = Attention(d, cfg.num_heads)
        self.ls1 = LayerScale(d) if cfg.layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=LN_EPS)
        self.mlp = Mlp(d, cfg.hidden) if cfg.ffn == "mlp" else SwiGLUFFN(d, cfg.hidden)
        self.ls2 = LayerScale(d) if cfg.layerscale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens: a conv with kernel = stride = p."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # b d h w -> b (h w) d


class DinoVisionTransformer(nn.Module):
    """DINOv2's ViT: normalised images (N, 3, H, W), H and W multiples of the patch size ->
    the normalised CLS token (N, D)."""

    def __init__(self, cfg: DinoConfig):
        super().__init__()
        if cfg.ffn not in ("mlp", "swiglu"):
            raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {cfg.ffn!r}")
        self.cfg = cfg
        d, grid = cfg.embed_dim, cfg.img_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.patch_size, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, d))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, d)) \
            if cfg.num_register_tokens else None
        self.mask_token = nn.Parameter(torch.zeros(1, d))  # training-time masking; unused here
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=LN_EPS)

    def interpolate_pos_encoding(self, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """The position embedding (1, 1 + h * w, D) for an (height, width) image of h x w patches:
        the stored one when the grid is its own and square, else its patch part resized bicubically."""
        p, stored = self.cfg.patch_size, self.pos_embed.shape[1] - 1
        h, w = height // p, width // p
        if h * w == stored and h == w:
            return self.pos_embed
        pos = self.pos_embed.float()
        m = math.isqrt(stored)
        grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)  # (1, D, m, m)
        antialias = self.cfg.interpolate_antialias
        if self.cfg.interpolate_offset:
            offset = self.cfg.interpolate_offset
            scale = ((h + offset) / m, (w + offset) / m)
            grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=antialias)  # (1, D, h, w)
        else:
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=antialias)  # (1, D, h, w)
        if grid.shape[-2:] != (h, w):
            raise RuntimeError(f"position embedding interpolated to {tuple(grid.shape[-2:])}, expected {(h, w)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)  # 1 d h w -> 1 (h w) d
        return torch.cat([pos[:, :1], grid], dim=1).to(dtype)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (N, 3, H, W) -> {"x_norm_clstoken": (N, D), "x_norm_regtokens": (N, R, D),
        "x_norm_patchtokens": (N, T, D)} with T = (H / p) * (W / p), after the final LayerNorm."""
        n, _, height, width = x.shape
        p = self.cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}")
        tokens = self.patch_embed(x)  # (N, T, D)
        tokens = torch.cat([self.cls_token.expand(n, -1, -1), tokens], dim=1)  # (N, 1 + T, D)
        tokens = tokens + self.interpolate_pos_encoding(height, width, tokens.dtype)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(n, -1, -1)  # (N, R, D)
            tokens = torch.cat([tokens[:, :1], regs, tokens[:, 1:]], dim=1)  # (N, 1 + R + T, D)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        r = self.cfg.num_register_tokens
        return {"x_norm_clstoken": tokens[:, 0], "x_norm_regtokens": tokens[:, 1 : 1 + r],
                "x_norm_patchtokens": tokens[:, 1 + r :]}

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised patch tokens (N, T, D) of images x (N, 3, H, W): REPA's targets."""
        return self.forward_features(x)["x_norm_patchtokens"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised CLS token (N, D) of images x (N, 3, H, W)."""
        return self.forward_features(x)["x_norm_clstoken"]


def config_from_state_dict(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> DinoConfig:
    """The config a state dict in the official layout describes (any width, depth, FFN, registers).
    The heads are not stored: `num_heads` defaults to width / 64, as in every official size. Register
    models get the `_reg` hub models' interpolation (antialiased, no offset). Raises ValueError naming
    what is missing or inconsistent."""
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight"):
        if key not in sd:
            raise ValueError(f"no {key}: not a DINOv2 state dict")
    dim = sd["cls_token"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    if grid * grid != sd["pos_embed"].shape[1] - 1:
        raise ValueError(f"pos_embed {tuple(sd['pos_embed'].shape)} does not hold 1 + a square number of tokens")
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    if depth == 0:
        raise ValueError("no blocks.N.* weights: not a DINOv2 state dict")
    num_heads = num_heads or dim // HEAD_DIM
    if num_heads < 1 or dim % num_heads:
        raise ValueError(f"width {dim} does not split into {num_heads} heads ({HEAD_DIM} channels each by default)")
    swiglu = "blocks.0.mlp.w12.weight" in sd
    hidden_key = "blocks.0.mlp.w3.weight" if swiglu else "blocks.0.mlp.fc1.weight"
    if hidden_key not in sd:
        raise ValueError(f"no {hidden_key}: not a DINOv2 state dict")
    hidden = sd[hidden_key].shape[1 if swiglu else 0]
    registers = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    return DinoConfig(dim, depth, num_heads, "swiglu" if swiglu else "mlp", hidden, patch, grid * patch,
                      registers, "blocks.0.ls1.gamma" in sd, interpolate_antialias=registers > 0,
                      interpolate_offset=0.0 if registers else INTERPOLATE_OFFSET)


def arch_name(cfg: DinoConfig) -> str:
    """The official name of a config that is exactly a hub model's ("dinov2_vitl14",
    "dinov2_vitb14_reg4"), else a description of it."""
    for arch in ARCHS:
        for registers in (False, True):
            if cfg == hub_config(arch, registers):
                return f"dinov2_{arch}" + (f"_reg{HUB_REGISTERS}" if registers else "")
    return (f"DINOv2 ViT width {cfg.embed_dim}, depth {cfg.depth}, patch {cfg.patch_size}, {cfg.ffn} "
            f"{cfg.hidden}, {cfg.num_register_tokens} registers")


def load_dinov2(path: str, device: str | torch.device = "cpu") -> DinoVisionTransformer:
    """The network of a weights file in the official layout, loaded strictly, in eval mode on
    `device`, with gradients off. A missing or foreign file is one UserError naming it."""
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"DINOv2 weights not found at {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which
        raise UserError(f"{path}: not a readable PyTorch weights file ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict):
        raise UserError(f"{path}: expected a state dict, got {type(sd).__name__}")
    try:
        cfg = config_from_state_dict(sd)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from e
    with torch.device("meta"):
        model = DinoVisionTransformer(cfg)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise UserError(f"{path}: not the DINOv2 layout it claims ({' '.join(str(e).split())[:300]})") from e
    return model.float().to(device).eval().requires_grad_(False)


def check_released(path: os.PathLike | str, model: str | None = None) -> None:
    """It loads, strictly, as a DINOv2 ViT in the official layout, of the architecture `model` names
    ("dinov2_vitl14", "dinov2_vitb14_reg4", ...) when given. (`ditlab.hub` checks a download of the
    official weights with it.)"""
    found = arch_name(load_dinov2(str(path), "meta").cfg)
    if model is not None and found != model:
        raise UserError(f"holds {found}, not {model}")
