"""The settings of `ditlab extract-latents`. Light (no torch): the command line builds its flags
from these fields (`ditlab.flags`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ditlab.errors import UserError
from ditlab.flags import check_fields
from ditlab.options import LATENT_DTYPES, PRECISIONS


@dataclass(kw_only=True)
class ExtractConfig:
    """Which images to encode with which VAE, into which latent cache."""

    data: str
    """image folder in the ImageNet layout: DATA/<class>/<image>"""
    out: str
    """latent cache folder (created; an interrupted run resumes into it)"""
    image_size: int = 256
    """ADM center crop size in pixels"""
    vae: str = "stabilityai/sd-vae-ft-ema"
    """hub id, local folder (AutoencoderKL.save_pretrained), or 'pixel'"""
    batch_size: int = 32
    """images per VAE call, each encoded with its flip"""
    skip_bad_files: bool = False
    """skip unreadable images and list them at the end (default: stop at the first one)"""
    shard_size: int = 1000
    """images per shard file"""
    num_workers: int | None = None
    """image decoding processes per rank (default min(8, CPUs / ranks))"""
    precision: str = field(default="auto", metadata={"choices": PRECISIONS})
    """VAE compute precision; auto is fp16 on CUDA, fp32 on CPU"""
    dtype: str = field(default="float16", metadata={"choices": LATENT_DTYPES})
    """storage dtype of mean and std"""
    repa_encoder: str | None = None
    """also cache REPA's targets: this frozen encoder's patch features of every image and of its flip (a released
    DINOv2 name, a DINOv2 weights file, or fashion-mnist-dae / digits-dae), for `train --repa-encoder` with the
    same value (default: none)"""
    progress: bool = field(default=True, metadata={"flag": "--no-progress"})
    """show a progress bar (--no-progress: none)"""

    def __post_init__(self) -> None:
        check_fields(self)  # types, non-empty paths
        for flag, value in (("--batch-size", self.batch_size), ("--shard-size", self.shard_size),
                            ("--image-size", self.image_size)):
            if value < 1:
                raise UserError(f"{flag} {value} must be positive")
        if self.num_workers is not None and self.num_workers < 0:
            raise UserError(f"--num-workers {self.num_workers} must be 0 or more")
        if self.dtype not in LATENT_DTYPES:
            raise UserError(f"--dtype {self.dtype}: choose {', '.join(LATENT_DTYPES)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)}")
