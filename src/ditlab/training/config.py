"""The configuration of a training run: the paper's recipe as defaults. Light (no torch): the
command line builds `ditlab train`'s flags from these fields (`ditlab.flags`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ditlab.errors import UserError
from ditlab.options import (
    BLOCK_OPTIONS,
    BLOCKS,
    LR_SCHEDULES,
    MLPS,
    NORMS,
    POSITIONS,
    PRECISIONS,
    QK_NORMS,
    check_block_options,
)

RESUMABLE: Mapping[str, Any] = MappingProxyType({"resumable": True})
"""The metadata of a setting that may differ between a stored run and the command that resumes it:
what only changes how the run is carried out (its length, its logging, its parallelism, its float
rounding: --grad-accum, --fsdp, --precision), where its metrics also go (--wandb), and --lr-decay-steps
as far as `lr_schedule.check_resume` allows. Any other difference is refused."""


@dataclass(kw_only=True)
class TrainConfig:
    """Every setting of a run. Those whose metadata holds RESUMABLE may change when a run is
    resumed (`resumable_fields`); any other difference from the run stored in the results folder is
    refused."""

    data: str
    """'digits' (bundled, pixel space), an image folder (ImageNet layout) or a latent cache"""
    results: str = field(metadata=RESUMABLE)
    """results folder: checkpoints/, samples/, metrics.jsonl, config.json"""
    model: str = "DiT-XL/2"
    """named config (ditlab.MODEL_CONFIGS); --depth, --hidden-size, --num-heads, --patch-size override it"""
    depth: int | None = None
    """override the named config's depth"""
    hidden_size: int | None = None
    """override the named config's hidden size"""
    num_heads: int | None = None
    """override the named config's number of heads"""
    patch_size: int | None = None
    """override the named config's patch size"""
    block: str = field(default="adaln-zero", metadata={"choices": BLOCKS})
    """block design: adaln-zero, adaln, cross-attn or in-context"""
    norm: str = field(default="layernorm", metadata={"choices": NORMS})
    """the blocks' norm: layernorm (the paper's) or rmsnorm (LightningDiT's)"""
    qk_norm: str = field(default="none", metadata={"choices": QK_NORMS})
    """normalise each head's queries and keys before attention: none (the paper's), rmsnorm or layernorm"""
    mlp: str = field(default="gelu", metadata={"choices": MLPS})
    """gelu (the paper's) or swiglu (hidden width int(2/3 x 4 x D), LightningDiT's)"""
    pos: str = field(default="sincos", metadata={"choices": POSITIONS})
    """positions: sincos (the paper's fixed table), sincos+rope (plus 2-D rotary q/k, LightningDiT's) or rope"""
    repa_encoder: str | None = None
    """REPA: align the tokens after block --repa-depth with this frozen encoder's patch features: a released
    DINOv2 name (dinov2_vitb14, dinov2_vitl14, ...) or a DINOv2 weights file (default: off)"""
    repa_depth: int | None = None
    """REPA: the block whose tokens are aligned (default: 8 for 24 or more blocks, as REPA's L and XL, else
    depth // 3, as REPA's B: 4 of 12)"""
    repa_coeff: float = 0.5
    """REPA: lambda, the weight of the alignment loss added to the diffusion or flow loss"""
    repa_width: int = 2048
    """REPA: the hidden width of the projector (REPA's 2048)"""
    image_size: int | None = None
    """image resolution in pixels (the latent is image_size / 8 with the SD VAE); default: the data's own
    (digits 8, a latent cache its size, an image folder 256)"""
    vae: str = "stabilityai/sd-vae-ft-ema"
    """VAE for image folders: a hub id or a local diffusers AutoencoderKL folder"""
    num_classes: int | None = None
    """number of classes (default: the dataset's); 0 trains an unconditional model"""
    class_dropout_prob: float = 0.1
    """label dropout probability (classifier-free guidance needs it > 0)"""
    learn_sigma: bool = field(default=True, metadata={"flag": "--no-learn-sigma"})
    """learned variance, loss = MSE + VLB, as the paper (--no-learn-sigma: epsilon only, MSE loss)"""
    global_batch_size: int = 256
    """images per optimizer step, summed over processes"""
    grad_accum: int = field(default=1, metadata=RESUMABLE)
    """micro-batches per process and step: gradients of K micro-batches are summed, one all-reduce per
    step; the images, the random draws and the update are those of K = 1"""
    lr: float = 1e-4
    """AdamW learning rate (the peak one with a warmup or a schedule), no weight decay"""
    lr_warmup: int = 0
    """raise the learning rate linearly over the first N steps (0: none, as the paper)"""
    lr_schedule: str = field(default="constant", metadata={"choices": LR_SCHEDULES})
    """after the warmup: constant (the paper's), or cosine or linear decay to --lr-min"""
    lr_min: float = 0.0
    """the learning rate a cosine or linear schedule reaches at its end"""
    lr_decay_steps: int | None = field(default=None, metadata=RESUMABLE)
    """the step the decay ends at (default: the run's end, from --max-steps or --epochs)"""
    max_steps: int | None = field(default=7_000_000, metadata=RESUMABLE)
    """stop after this many optimizer steps (at least 1)"""
    epochs: int | None = field(default=None, metadata=RESUMABLE)
    """stop after this many passes over the data (at least 1; with --max-steps: whichever comes first)"""
    ckpt_every: int = field(default=50_000, metadata=RESUMABLE)
    """write a checkpoint every N steps (and at the end)"""
    keep_last: int = field(default=0, metadata=RESUMABLE)
    """keep only the newest K checkpoints (0 = all)"""
    sample_every: int = field(default=10_000, metadata=RESUMABLE)
    """write an EMA sample grid every N steps; 0 = never"""
    log_every: int = field(default=100, metadata=RESUMABLE)
    """log the mean loss terms to metrics.jsonl every N steps"""
    wandb: str | None = field(default=None, metadata=RESUMABLE)
    """also log to this Weights & Biases project (needs the wandb extra; WANDB_MODE=offline works without network)"""
    seed: int = 0
    """the seed of the initial weights, the data order and every random draw"""
    precision: str = field(default="auto", metadata={**RESUMABLE, "choices": PRECISIONS})
    """auto = bf16 autocast where the hardware does it well, else fp32"""
    num_workers: int = field(default=4, metadata=RESUMABLE)
    """data loader workers"""
    ema_decay: float = 0.9999
    """decay of the exponential moving average of the weights"""
    grad_clip: float | None = None
    """clip the global gradient norm to this value (default: off, as the paper)"""
    compile: bool = field(default=False, metadata=RESUMABLE)
    """torch.compile each block"""
    grad_checkpointing: bool = field(default=False, metadata=RESUMABLE)
    """recompute activations in the backward pass to save memory"""
    fsdp: bool = field(default=False, metadata=RESUMABLE)
    """shard with FSDP2 per block instead of DDP"""
    sample_steps: int = field(default=50, metadata=RESUMABLE)
    """DDPM steps of the sample grids"""
    progress: bool = field(default=True, metadata={**RESUMABLE, "flag": "--no-progress"})
    """show a progress bar on rank 0 (--no-progress: none)"""
    max_bad_steps: int = field(default=5, metadata=RESUMABLE)
    """stop after this many consecutive steps with a non-finite loss or gradient norm (each one's update is
    skipped: weights, EMA and optimizer untouched)"""
    dist_timeout: float = field(default=300.0, metadata=RESUMABLE)
    """seconds a collective may wait for another process before the run fails, naming the rank"""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse settings that cannot make a run, naming the flag."""
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.block not in BLOCKS:
            raise UserError(f"--block {self.block!r}: choose one of {', '.join(BLOCKS)}")
        check_block_options(self)
        if self.global_batch_size < 1:
            raise UserError(f"--global-batch-size {self.global_batch_size} must be positive")
        if self.max_steps is None and self.epochs is None:
            raise UserError("give --max-steps or --epochs: the run needs an end")
        for name in ("max_steps", "epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} {value} must be at least 1 (leave it out for no limit)")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr {self.lr} must be a positive finite number")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise UserError(f"--grad-clip {self.grad_clip} must be a positive finite norm (leave it out: no clipping)")
        if self.image_size is not None and self.image_size < 1:
            raise UserError(f"--image-size {self.image_size} must be positive")
        if self.max_bad_steps < 1:
            raise UserError(f"--max-bad-steps {self.max_bad_steps} must be at least 1")
        if not (math.isfinite(self.dist_timeout) and self.dist_timeout > 0):
            raise UserError(f"--dist-timeout {self.dist_timeout} must be a positive number of seconds")
        for name in ("ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise UserError(f"--ema-decay {self.ema_decay} must lie in [0, 1]")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise UserError(f"--class-dropout-prob {self.class_dropout_prob} must lie in [0, 1)")
        if self.grad_accum < 1 or self.global_batch_size % self.grad_accum:
            raise UserError(f"--grad-accum {self.grad_accum} must be at least 1 and divide --global-batch-size "
                            f"{self.global_batch_size}")
        if not (math.isfinite(self.repa_coeff) and self.repa_coeff >= 0):
            raise UserError(f"--repa-coeff {self.repa_coeff} must be a finite number >= 0")
        if self.repa_width < 1:
            raise UserError(f"--repa-width {self.repa_width} must be positive")
        self.check_lr()

    def check_lr(self) -> None:
        """Refuse learning-rate settings that make no schedule, naming the flag."""
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(f"--lr-schedule {self.lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
        if self.lr <= 0:
            raise UserError(f"--lr {self.lr} must be positive")
        if self.lr_warmup < 0:
            raise UserError(f"--lr-warmup {self.lr_warmup} must be at least 0")
        if not 0.0 <= self.lr_min <= self.lr:
            raise UserError(f"--lr-min {self.lr_min} must lie in [0, --lr {self.lr}]")
        if self.lr_decay_steps is not None and self.lr_decay_steps <= self.lr_warmup:
            raise UserError(f"--lr-decay-steps {self.lr_decay_steps} must exceed --lr-warmup {self.lr_warmup}")

    def block_options(self) -> dict[str, str]:
        """The modern block options (--norm --qk-norm --mlp --pos) as keyword arguments of create_model."""
        return {name: getattr(self, name) for name in BLOCK_OPTIONS}

    def total_steps(self, steps_per_epoch: int) -> float:
        """The step the run ends at: max_steps or epochs x steps_per_epoch, whichever comes first."""
        return min(self.max_steps or math.inf, (self.epochs or math.inf) * steps_per_epoch)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def resumable_fields(cls) -> frozenset[str]:
        """The names of the settings that may change on resume (metadata RESUMABLE)."""
        return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("resumable"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
