"""2-D axial rotary position embedding of queries and keys, as LightningDiT applies it (EVA-02's
`VisionRotaryEmbeddingFast`): half of each head's channels rotate with the token's row, the other
half with its column, each half with the 1-D RoPE frequencies 10000^(-2i / (head_dim / 2)) applied
to interleaved channel pairs.

The tables are buffers named as LightningDiT's (`feat_rope.freqs_cos`, `feat_rope.freqs_sin`), so
its state dicts load strictly; on loading they are rebuilt from the config, never read from the file."""

from __future__ import annotations

import torch
from torch import nn

from ditlab.errors import UserError

ROPE_THETA = 10_000  # base of the rotary frequencies (EVA's "lang" frequencies)


def rope_tables(head_dim: int, grid_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of shape (grid_size**2, head_dim), float32, tokens in row-major order: channels
    [0, head_dim/2) rotate with the row, [head_dim/2, head_dim) with the column, each frequency
    repeated for its interleaved channel pair. Computed as EVA-02's code does, in float32."""
    if head_dim % 4:
        raise UserError(f"head dimension {head_dim} must be a multiple of 4 for the 2-D rotary embedding (--pos)")
    half = head_dim // 2  # channels per axis
    freqs = 1.0 / (ROPE_THETA ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # (half/2,)
    pos = torch.arange(grid_size) / grid_size * grid_size  # (G,) float32, as the reference computes it
    freqs = (pos[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # (G, half): f0 f0 f1 f1 ...
    G = grid_size
    rows, cols = freqs[:, None, :].expand(G, G, half), freqs[None, :, :].expand(G, G, half)  # (G, G, half) each
    table = torch.cat([rows, cols], dim=-1)  # (G, G, head_dim)
    table = table.reshape(G * G, head_dim)  # (T, head_dim), row-major tokens
    return table.cos(), table.sin()


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(..., 2k) -> (..., 2k): each channel pair (a, b) becomes (-b, a)."""
    # einops: "... (d r) -> ... d r", r = 2
    pairs = x.unflatten(-1, (-1, 2))  # (..., k, 2)
    a, b = pairs.unbind(-1)  # 2 x (..., k)
    return torch.stack((-b, a), dim=-1).flatten(-2)  # (..., 2k)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys x (B, H, N, head_dim) by the tables (T, head_dim). When N > T (the
    in-context design's conditioning tokens follow the T image tokens), the extra tokens stay as they are."""
    T = cos.shape[0]
    if x.shape[-2] == T:
        return x * cos + rotate_pairs(x) * sin
    image, extra = x[..., :T, :], x[..., T:, :]  # (B, H, T, hd), (B, H, N - T, hd)
    return torch.cat([image * cos + rotate_pairs(image) * sin, extra], dim=-2)


class RotaryEmbedding2D(nn.Module):
    """The rotary tables of a grid_size x grid_size token grid, shared by every block."""

    def __init__(self, head_dim: int, grid_size: int):
        super().__init__()
        self.head_dim, self.grid_size = head_dim, grid_size
        cos, sin = rope_tables(head_dim, grid_size)
        self.register_buffer("freqs_cos", cos)  # (T, head_dim)
        self.register_buffer("freqs_sin", sin)  # (T, head_dim)

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.freqs_cos, self.freqs_sin
        assert isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor)  # buffers
        return cos, sin

    def _load_from_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str, *args, **kwargs) -> None:
        """Rebuild the tables instead of reading them (a shape mismatch is still reported as one)."""
        cos, sin = rope_tables(self.head_dim, self.grid_size)
        for name, table in (("freqs_cos", cos), ("freqs_sin", sin)):
            given = state_dict.get(prefix + name)
            if given is not None and given.shape == table.shape:
                state_dict[prefix + name] = table.to(device=given.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
