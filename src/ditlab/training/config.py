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
from ditlab.flags import check_fields
from ditlab.options import (
    BLOCK_OPTIONS,
    BLOCKS,
    FEATURE_SETS,
    FLOW_LOSS_WEIGHTS,
    FLOW_PATHS,
    FLOW_PREDICTIONS,
    LR_SCHEDULES,
    MAX_DIFFUSION_STEPS,
    MLPS,
    NORMS,
    OBJECTIVES,
    POSITIONS,
    PRECISIONS,
    QK_NORMS,
    TIME_SAMPLINGS,
    check_block_options,
)
from ditlab.sampling.config import MAX_STEPS, SampleConfig

MAX_TIMEOUT_S = 7 * 24 * 3600  # a week: past it a collective's timeout is a typo (and overflows timedelta)
RESUMABLE: Mapping[str, Any] = MappingProxyType({"resumable": True})
"""The metadata of a setting that may differ between a stored run and the command that resumes it:
what only changes how the run is carried out (its length, its logging, its parallelism, its float
rounding: --grad-accum, --fsdp, --precision), where its metrics also go (--wandb), and --lr-decay-steps
as far as `lr_schedule.check_resume` allows. Any other difference is refused."""
FLOW_SETTINGS = ("path", "prediction", "loss_weight", "time_sampling", "time_location", "time_scale", "train_eps")
"""The fields that set a flow's training, named as `diffusion.flow_matching.FlowConfig`'s (which reads them off a
run's config); they belong to --objective flow."""


def like_sample(name: str) -> Any:
    """A field that takes what `ditlab sample`'s field `name` takes (its default and choices), and may
    change on resume: online evaluation samples as `ditlab sample` does."""
    sample_field = next(f for f in dataclasses.fields(SampleConfig) if f.name == name)
    return field(default=sample_field.default, metadata={**sample_field.metadata, **RESUMABLE})


@dataclass(kw_only=True)
class TrainConfig:
    """Every setting of a run. Those whose metadata holds RESUMABLE may change when a run is
    resumed (`resumable_fields`); any other difference from the run stored in the results folder is
    refused."""

    data: str
    """'digits' (bundled, pixel space), 'fashion-mnist' (pixel space; the system's copy, the cache, or
    downloaded), a folder of IDX files, an image folder (ImageNet layout) or a latent cache"""
    results: str = field(metadata=RESUMABLE)
    """results folder: checkpoints/, samples/, metrics.jsonl, config.json"""
    model: str = "DiT-XL/2"
    """named config (ditlab.MODEL_CONFIGS); --depth, --hidden-size, --num-heads, --patch-size override it"""
    depth: int | None = field(default=None, metadata={"min": 1})
    """override the named config's depth"""
    hidden_size: int | None = field(default=None, metadata={"min": 1})
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
    DINOv2 name (dinov2_vitb14, dinov2_vitl14, ...), a DINOv2 weights file, or a denoising autoencoder ditlab
    trains once without labels on the data's training images (fashion-mnist-dae, digits-dae) (default: off)"""
    repa_depth: int | None = None
    """REPA: the block whose tokens are aligned (default: 8 for 24 or more blocks, as REPA's L and XL, else
    depth // 3, as REPA's B: 4 of 12)"""
    repa_coeff: float = 0.5
    """REPA: lambda, the weight of the alignment loss added to the diffusion or flow loss"""
    repa_width: int = 2048
    """REPA: the hidden width of the projector (REPA's 2048)"""
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
    objective: str = field(default="ddpm", metadata={"choices": OBJECTIVES})
    """what the model learns: ddpm (the paper's Gaussian diffusion) or flow (SiT's flow matching on an
    interpolant; --path, --prediction, --time-sampling ... set it)"""
    path: str = field(default="linear", metadata={"choices": FLOW_PATHS})
    """flow: the interpolant, linear (x_t = t x_1 + (1 - t) x_0, SiT's) or gvp (sin / cos)"""
    prediction: str = field(default="velocity", metadata={"choices": FLOW_PREDICTIONS})
    """flow: what the model predicts (velocity, SiT's default; noise; score)"""
    loss_weight: str = field(default="none", metadata={"choices": FLOW_LOSS_WEIGHTS})
    """flow: SiT's loss weight of noise / score prediction"""
    time_sampling: str = field(default="uniform", metadata={"choices": TIME_SAMPLINGS})
    """flow: training times uniform on SiT's interval, or logit-normal (Esser et al. 2024)"""
    time_location: float = 0.0
    """flow, logit-normal: the mean of the normal whose sigmoid is t"""
    time_scale: float = 1.0
    """flow, logit-normal: the standard deviation of that normal"""
    train_eps: float | None = None
    """flow: training times in [eps, 1 - eps] for noise / score prediction (default: SiT's 1e-3; velocity 0)"""
    learn_sigma: bool | None = field(default=None, metadata={"flag": "--learn-sigma"})
    """the model outputs 2C channels: ddpm learns the variance, loss = MSE + VLB, as the paper; flow drops the
    second half, as SiT (--no-learn-sigma: C channels; default: on for ddpm, off for flow)"""
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
    keep_last: int = field(default=0, metadata={**RESUMABLE, "min": 0})
    """keep only the newest K checkpoints (0 = all)"""
    sample_every: int = field(default=10_000, metadata={**RESUMABLE, "min": 0})
    """write an EMA sample grid every N steps; 0 = never"""
    log_every: int = field(default=100, metadata=RESUMABLE)
    """log the mean loss terms to metrics.jsonl every N steps"""
    wandb: str | None = field(default=None, metadata=RESUMABLE)
    """also log to this Weights & Biases project (needs the wandb extra; WANDB_MODE=offline works without network)"""
    seed: int = field(default=0, metadata={"min": 0})
    """the seed of the initial weights, the data order and every random draw"""
    precision: str = field(default="auto", metadata={**RESUMABLE, "choices": PRECISIONS})
    """auto = bf16 autocast where the hardware does it well, else fp32"""
    num_workers: int = field(default=4, metadata={**RESUMABLE, "min": 0})
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
    sample_steps: int = field(default=50, metadata={**RESUMABLE, "min": 1, "max": MAX_DIFFUSION_STEPS})
    """steps of the sample grids, with the objective's default sampler (ddpm: DDPM, flow: Euler)"""
    progress: bool = field(default=True, metadata={**RESUMABLE, "flag": "--no-progress"})
    """show a progress bar on rank 0 (--no-progress: none)"""
    max_bad_steps: int = field(default=5, metadata=RESUMABLE)
    """stop after this many consecutive steps with a non-finite loss or gradient norm (each one's update is
    skipped: weights, EMA and optimizer untouched)"""
    dist_timeout: float = field(default=300.0, metadata={**RESUMABLE, "max": MAX_TIMEOUT_S})
    """seconds a collective may wait for another process before the run fails, naming the rank"""

    eval_every: int = field(default=0, metadata=RESUMABLE)
    """evaluate the EMA weights every N steps and at the end (online evaluation; 0 = never): K images
    sampled as `ditlab sample` samples them (seed --seed, random labels), scored as `ditlab eval` scores them"""
    eval_samples: int = field(default=1000, metadata=RESUMABLE)
    """images per online evaluation (K)"""
    eval_ref: str | None = field(default=None, metadata=RESUMABLE)
    """what online evaluation compares against: a reference .npz (FID etc., as `ditlab eval`), an ADM batch
    name, or a judge (digits); default: the data's judge (digits)"""
    eval_features: str = field(default="inception", metadata=RESUMABLE)
    """feature spaces of a reference .npz, comma-separated: inception, dinov2 (as `ditlab eval --features`)"""
    eval_inception: str | None = field(default=None, metadata=RESUMABLE)
    """local Inception weights for online FID (as `ditlab eval --inception`)"""
    eval_dinov2: str | None = field(default=None, metadata=RESUMABLE)
    """DINOv2 weights file or released name for online FD-DINOv2 (as `ditlab eval --dinov2`)"""
    eval_sampler: str | None = like_sample("sampler")
    """the sampler of online evaluation (as `ditlab sample --sampler`; default: the objective's first)"""
    eval_steps: int | None = like_sample("steps")
    """sampling steps of online evaluation (as `ditlab sample --steps`; default: the objective's)"""
    eval_cfg_scale: float = like_sample("cfg_scale")
    """classifier-free guidance scale of online evaluation (as `ditlab sample --cfg-scale`)"""
    eval_guidance_channels: int | None = like_sample("guidance_channels")
    """guide only the first K latent channels in online evaluation (as `ditlab sample --guidance-channels`)"""
    eval_batch_size: int = like_sample("batch_size")
    """images per forward pass and process in online evaluation (as `ditlab sample --batch-size`)"""

    def __post_init__(self) -> None:
        if self.learn_sigma is None:  # the objective's own: the paper's learned variance; SiT's released half unused
            self.learn_sigma = self.objective == "ddpm"
        self.validate()

    def validate(self) -> None:
        """Refuse settings that cannot make a run, naming the flag."""
        check_fields(self)  # types, finite floats, the fields' bounds
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
        if self.lr <= 0:  # finite: check_fields
            raise UserError(f"--lr {self.lr} must be a positive finite number")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise UserError(f"--grad-clip {self.grad_clip} must be a positive finite norm (leave it out: no clipping)")
        if self.image_size is not None and self.image_size < 1:
            raise UserError(f"--image-size {self.image_size} must be positive")
        if self.max_bad_steps < 1:
            raise UserError(f"--max-bad-steps {self.max_bad_steps} must be at least 1")
        if self.dist_timeout <= 0:
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
        self._validate_objective()
        if self.repa_coeff < 0:
            raise UserError(f"--repa-coeff {self.repa_coeff} must be a finite number >= 0")
        if self.repa_width < 1:
            raise UserError(f"--repa-width {self.repa_width} must be positive")
        self.check_lr()
        self.check_eval()

    def check_eval(self) -> None:
        """Refuse online-evaluation settings that cannot run, naming the flag (before any step is trained)."""
        if self.eval_every < 0:
            raise UserError(f"--eval-every {self.eval_every} must be at least 0 (0: no online evaluation)")
        if not self.eval_every:
            return
        if self.fsdp:
            raise UserError("--eval-every with --fsdp: online evaluation samples with an unsharded EMA; train with "
                            "DDP, or evaluate the checkpoints with `ditlab sample` and `ditlab eval`")
        features = [f.strip() for f in self.eval_features.split(",")]
        checks = [
            (self.eval_samples >= 1, f"--eval-samples {self.eval_samples} must be positive"),
            (self.eval_batch_size >= 1, f"--eval-batch-size {self.eval_batch_size} must be positive"),
            (self.eval_steps is None or 1 <= self.eval_steps <= MAX_STEPS,
             f"--eval-steps {self.eval_steps} must be between 1 and {MAX_STEPS}"),
            (bool(features) and all(f in FEATURE_SETS for f in features),
             f"--eval-features {self.eval_features}: choose one or more of {', '.join(FEATURE_SETS)}, comma-separated"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

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

    def _validate_objective(self) -> None:
        if self.objective not in OBJECTIVES:
            raise UserError(f"--objective {self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        for name, choices in (("path", FLOW_PATHS), ("prediction", FLOW_PREDICTIONS),
                              ("loss_weight", FLOW_LOSS_WEIGHTS), ("time_sampling", TIME_SAMPLINGS)):  # fmt: skip
            value = getattr(self, name)
            if value not in choices:
                raise UserError(f"--{name.replace('_', '-')} {value!r}: choose one of {', '.join(choices)}")
        if self.objective != "flow":
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            changed = [name for name in FLOW_SETTINGS if getattr(self, name) != defaults[name]]
            if changed:
                raise UserError(f"--{changed[0].replace('_', '-')} sets a flow: it needs --objective flow")
        if self.time_scale <= 0:
            raise UserError(f"--time-scale {self.time_scale} must be a positive finite number")
        if self.train_eps is not None and not 0 <= self.train_eps < 0.5:
            raise UserError(f"--train-eps {self.train_eps} must lie in [0, 0.5)")

    def process_record(self) -> dict[str, Any]:
        """What `diffusion.protocol.process_from_record` builds the run's process from: the objective and its
        settings (a checkpoint's config holds the same keys)."""
        flow = {name: getattr(self, name) for name in FLOW_SETTINGS} if self.objective == "flow" else {}
        return {"objective": self.objective, "learn_sigma": self.learn_sigma, **flow}

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
