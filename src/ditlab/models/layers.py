"""The layers DiT is made of: patch embedding, attention, MLP, timestep and label embedders,
and the fixed 2-D sin-cos position table. Parameter names follow the authors' checkpoints; the
modern options (RMSNorm, QK-norm, SwiGLU) follow LightningDiT's (`norm1.weight`, `attn.q_norm`,
`mlp.w12`, `mlp.w3`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ditlab.errors import UserError
from ditlab.models.rope import apply_rope

TIMESTEP_FREQUENCIES = 256  # size of the sinusoidal timestep features fed to the MLP
MAX_PERIOD = 10_000  # longest wavelength of the timestep and position sinusoids


LN_EPS = 1e-6  # LayerNorm epsilon of the reference implementation
RMS_EPS = 1e-6  # RMSNorm epsilon of LightningDiT
QK_LN_EPS = 1e-5  # LightningDiT's LayerNorm QK-norm is torch's default LayerNorm
SWIGLU_FRACTION = 2 / 3  # SwiGLU's hidden width: int(2/3 x the GELU MLP's), as LightningDiT


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, computed in float32 and cast back before the weight
    (as LightningDiT's, which is LLaMA's)."""

    def __init__(self, dim: int, eps: float = RMS_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def make_norm(kind: str, dim: int, affine: bool) -> nn.Module:
    """The blocks' norm: LayerNorm (affine only where nothing modulates it) or RMSNorm (always with its
    weight, as LightningDiT's, even under adaLN)."""
    if kind == "rmsnorm":
        return RMSNorm(dim)
    return nn.LayerNorm(dim, elementwise_affine=affine, eps=LN_EPS)


def make_qk_norm(kind: str, head_dim: int) -> nn.Module | None:
    """QK-norm of one head's queries or keys (LightningDiT: RMSNorm, or timm's default LayerNorm)."""
    if kind == "none":
        return None
    return RMSNorm(head_dim) if kind == "rmsnorm" else nn.LayerNorm(head_dim, eps=QK_LN_EPS)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x (N, T, D), shift and scale (N, D) -> x * (1 + scale) + shift (one addcmul)."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """adaLN-Zero's residual: x, y (N, T, D), gate (N, D) -> x + gate * y (one addcmul)."""
    return torch.addcmul(x, gate.unsqueeze(1), y)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Sin-cos features of positions: pos (M,) -> (M, dim) float64, [sin | cos]."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / MAX_PERIOD**omega  # (dim/2,)
    out = pos.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, dim)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D position table (grid_size**2, dim) in float64, tokens in row-major order.

    The first half of each row encodes the token's column, the second half its row, as the
    reference implementation does (MAE's table)."""
    if dim % 4:
        raise UserError(f"hidden size {dim} must be a multiple of 4 for the 2-D sin-cos table")
    coords = torch.arange(grid_size, dtype=torch.float64)
    row, col = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each
    return torch.cat([sincos_1d(dim // 2, col), sincos_1d(dim // 2, row)], dim=1)  # (G*G, dim)


class PatchEmbed(nn.Module):
    """Image (N, C, H, W) to patch tokens (N, T, D) with a p x p stride-p convolution."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        if input_size % patch_size:
            raise UserError(f"patch size {patch_size} does not divide the input size {input_size}")
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (N, D, H/p, W/p)
        # (N, T, D), where T = H * W / p ** 2. Made contiguous: a transposed residual stream slows every
        # residual add, and torch 2.13's inductor computes wrong gradients for a compiled block fed one.
        return x.flatten(2).transpose(1, 2).contiguous()


class Attention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int, qk_norm: str = "none"):
        super().__init__()
        if dim % num_heads:
            raise UserError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = make_qk_norm(qk_norm, dim // num_heads)
        self.k_norm = make_qk_norm(qk_norm, dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, C); rope: the (cos, sin) tables of `models.rope` for the first T' <= T tokens."""
        B, T, C = x.shape
        H = self.num_heads
        # einops: "b t (three h d) -> three b h t d"
        qkv = self.qkv(x).reshape(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)  # (3, B, H, T, C/H)
        q, k, v = qkv.unbind(0)  # 3 x (B, H, T, C/H); unbind's backward is one stack, not 3 zero-filled copies
        if self.q_norm is not None and self.k_norm is not None:  # QK-norm per head, before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, C/H)
        x = x.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(x)


class CrossAttention(nn.Module):
    """Multi-head attention of image tokens (N, T, D) over a short context (N, S, D)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: str = "none"):
        super().__init__()
        if dim % num_heads:
            raise UserError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(dim, dim * 2, bias=True)
        self.q_norm = make_qk_norm(qk_norm, dim // num_heads)
        self.k_norm = make_qk_norm(qk_norm, dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        S, H = context.shape[1], self.num_heads
        q = self.q(x).reshape(B, T, H, C // H).transpose(1, 2)  # (B, H, T, C/H)
        kv = self.kv(context).reshape(B, S, 2, H, C // H).permute(2, 0, 3, 1, 4)  # (2, B, H, S, C/H)
        k, v = kv.unbind(0)  # 2 x (B, H, S, C/H)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, C/H)
        x = x.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(x)


class Mlp(nn.Module):
    """Transformer MLP: Linear, tanh-approximated GELU, Linear."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SwiGLU(nn.Module):
    """SwiGLU MLP (LightningDiT's names): w12 gives both hidden halves, silu(x1) * x2, then w3."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim, bias=True)
        self.w3 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)  # 2 x (N, T, hidden)
        return self.w3(F.silu(x1) * x2)


def mlp_hidden(kind: str, dim: int, mlp_ratio: float) -> int:
    """Hidden width of the MLP: int(ratio x D) for GELU, int(2/3 x int(ratio x D)) for SwiGLU."""
    hidden = int(dim * mlp_ratio)
    return int(SWIGLU_FRACTION * hidden) if kind == "swiglu" else hidden


def make_mlp(kind: str, dim: int, mlp_ratio: float) -> nn.Module:
    hidden = mlp_hidden(kind, dim, mlp_ratio)
    return SwiGLU(dim, hidden) if kind == "swiglu" else Mlp(dim, hidden)


def timestep_features(t: torch.Tensor, dim: int = TIMESTEP_FREQUENCIES) -> torch.Tensor:
    """Sinusoidal timestep features: t (N,) -> (N, dim) float32, [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (N, dim/2)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * (dim/2))
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Timesteps (N,) to vectors (N, D): sinusoidal features, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_size: int = TIMESTEP_FREQUENCIES):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_features(t, self.frequency_size)  # (N, F)
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class labels (N,) to vectors (N, D), with label dropout to the null row `num_classes`.

    The null row exists when dropout_prob > 0, as in the reference implementation; it is the
    label classifier-free guidance uses for the unconditional branch."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        rows = num_classes + int(dropout_prob > 0)
        # A shell on the meta device (whose weights a checkpoint replaces) skips nn.Embedding's random
        # init: on meta its normal_ imports torch._dynamo (about 1 s of a command's start-up).
        shell = torch.empty(rows, hidden_size) if torch.empty(0).is_meta else None
        self.embedding_table = nn.Embedding(rows, hidden_size, _weight=shell)

    @property
    def has_null(self) -> bool:
        return self.embedding_table.num_embeddings > self.num_classes

    def forward(self, labels: torch.Tensor, train: bool, drop: torch.Tensor | None = None) -> torch.Tensor:
        """labels (N,) -> (N, D). `drop` (N,) bool replaces labels by the null label where True; without
        it, training mode drops each label with probability dropout_prob from the global generator
        (ditlab's trainer passes the mask drawn from its step's generator instead)."""
        if drop is None and train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob  # (N,)
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)  # (N, D)
