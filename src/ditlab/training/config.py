"""The configuration of a training run: the paper's recipe as defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ditlab.errors import UserError
from ditlab.options import PRECISIONS


@dataclass(kw_only=True)
class TrainConfig:
    """Every setting of a run. Those in `RESUMABLE` may change when a run is resumed; any other
    difference from the run stored in the results folder is refused."""

    data: str
    """`digits` (bundled, pixel space), an image folder (ImageNet layout) or a latent cache."""
    results: str
    """Folder for checkpoints/, samples/, metrics.jsonl and config.json."""
    model: str = "DiT-XL/2"
    """Named config (ditlab.MODEL_CONFIGS); the four fields below override it."""
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    block: str = "adaln-zero"
    """Block design: adaln-zero, adaln, cross-attn or in-context."""
    image_size: int = 256
    """Image resolution in pixels (the latent is image_size / 8 with the SD VAE)."""
    vae: str = "stabilityai/sd-vae-ft-ema"
    """Codec for image folders: a hub id or a local diffusers AutoencoderKL folder."""
    num_classes: int | None = None
    """Number of classes; None takes the dataset's. 0 trains an unconditional model."""
    class_dropout_prob: float = 0.1
    """Label dropout probability (classifier-free guidance needs it > 0)."""
    learn_sigma: bool = True
    """Learned variance (loss = MSE + VLB) as in the paper; False trains epsilon only."""
    global_batch_size: int = 256
    lr: float = 1e-4
    """AdamW learning rate, constant, no weight decay."""
    max_steps: int | None = 7_000_000
    """Stop after this many optimizer steps (None: no limit, then --epochs must be given)."""
    epochs: int | None = None
    """Stop after this many passes over the data (whichever of steps/epochs comes first)."""
    ckpt_every: int = 50_000
    keep_last: int = 0
    """Keep only the newest K checkpoints (0 keeps all)."""
    sample_every: int = 10_000
    """Write an EMA sample grid every N steps (0 = never)."""
    log_every: int = 100
    seed: int = 0
    precision: str = "auto"
    """auto (bf16 autocast where the hardware does it well, else fp32), fp32, bf16 or fp16."""
    num_workers: int = 4
    ema_decay: float = 0.9999
    grad_clip: float | None = None
    """Clip the global gradient norm to this value (None: no clipping, as in the paper)."""
    compile: bool = False
    """torch.compile each DiT block."""
    grad_checkpointing: bool = False
    """Recompute block activations in the backward pass to save memory."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state with FSDP2 (one unit per block)."""
    sample_steps: int = 50
    """DDPM steps used for the periodic sample grids."""
    progress: bool = True
    """Show a progress bar on rank 0."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.global_batch_size < 1:
            raise UserError(f"--global-batch-size {self.global_batch_size} must be positive")
        if self.max_steps is None and self.epochs is None:
            raise UserError("give --max-steps or --epochs: the run needs an end")
        for name in ("ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise UserError(f"--ema-decay {self.ema_decay} must lie in [0, 1]")


# Settings that may differ between the stored run and the command that resumes it.
RESUMABLE = frozenset({
    "max_steps", "epochs", "ckpt_every", "keep_last", "sample_every", "log_every", "num_workers",
    "compile", "grad_checkpointing", "fsdp", "sample_steps", "progress", "precision", "results",
})  # fmt: skip


def config_differences(stored: dict[str, Any], current: TrainConfig) -> list[str]:
    """Run-defining settings that differ between a stored run and `current`."""
    now = current.to_dict()
    return [
        f"{k}: {stored.get(k)!r} -> {now[k]!r}"
        for k in sorted(now)
        if k not in RESUMABLE and stored.get(k) != now[k]
    ]
