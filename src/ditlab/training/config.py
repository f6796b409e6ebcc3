"""The configuration of a training run: the paper's recipe as defaults. Light (no torch): the
command line builds `ditlab train`'s flags from these fields (`ditlab.flags`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ditlab.errors import UserError
from ditlab.options import BLOCKS, LR_SCHEDULES, PRECISIONS


@dataclass(kw_only=True)
class TrainConfig:
    """Every setting of a run. Those in `training.resume.RESUMABLE` may change when a run is
    resumed; any other difference from the run stored in the results folder is refused."""

    data: str
    """'digits' (bundled, pixel space), 'fashion-mnist' (pixel space; the system's copy, the cache, or
    downloaded), a folder of IDX files, an image folder (ImageNet layout) or a latent cache"""
    results: str
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
    image_size: int | None = None
    """image resolution in pixels (the latent is image_size / 8 with the SD VAE); default: the data's own
    (digits 8, Fashion-MNIST 32: 28 padded; 16 is an area downsampling, a latent cache its size, an image
    folder 256)"""
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
    grad_accum: int = 1
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
    lr_decay_steps: int | None = None
    """the step the decay ends at (default: the run's end, from --max-steps or --epochs)"""
    max_steps: int | None = 7_000_000
    """stop after this many optimizer steps (at least 1)"""
    epochs: int | None = None
    """stop after this many passes over the data (at least 1; with --max-steps: whichever comes first)"""
    ckpt_every: int = 50_000
    """write a checkpoint every N steps (and at the end)"""
    keep_last: int = 0
    """keep only the newest K checkpoints (0 = all)"""
    sample_every: int = 10_000
    """write an EMA sample grid every N steps; 0 = never"""
    log_every: int = 100
    """log the mean loss terms to metrics.jsonl every N steps"""
    wandb: str | None = None
    """also log to this Weights & Biases project (needs the wandb extra; WANDB_MODE=offline works without network)"""
    seed: int = 0
    """the seed of the initial weights, the data order and every random draw"""
    precision: str = field(default="auto", metadata={"choices": PRECISIONS})
    """auto = bf16 autocast where the hardware does it well, else fp32"""
    num_workers: int = 4
    """data loader workers"""
    ema_decay: float = 0.9999
    """decay of the exponential moving average of the weights"""
    grad_clip: float | None = None
    """clip the global gradient norm to this value (default: off, as the paper)"""
    compile: bool = False
    """torch.compile each block"""
    grad_checkpointing: bool = False
    """recompute activations in the backward pass to save memory"""
    fsdp: bool = False
    """shard with FSDP2 per block instead of DDP"""
    sample_steps: int = 50
    """DDPM steps of the sample grids"""
    progress: bool = field(default=True, metadata={"flag": "--no-progress"})
    """show a progress bar on rank 0 (--no-progress: none)"""
    max_bad_steps: int = 5
    """stop after this many consecutive steps with a non-finite loss or gradient norm (each one's update is
    skipped: weights, EMA and optimizer untouched)"""
    dist_timeout: float = 300.0
    """seconds a collective may wait for another process before the run fails, naming the rank"""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse settings that cannot make a run, naming the flag."""
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.block not in BLOCKS:
            raise UserError(f"--block {self.block!r}: choose one of {', '.join(BLOCKS)}")
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
        from ditlab.training.lr_schedule import check_lr_settings

        check_lr_settings(self)

    def total_steps(self, steps_per_epoch: int) -> float:
        """The step the run ends at: max_steps or epochs x steps_per_epoch, whichever comes first."""
        return min(self.max_steps or math.inf, (self.epochs or math.inf) * steps_per_epoch)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
