"""The settings of `ditlab sample`, validated before anything is loaded. Light (no torch): the
command line builds its flags from these fields (`ditlab.flags`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ditlab.errors import UserError
from ditlab.options import DEVICES, LABEL_MODES, PRECISIONS, SAMPLERS, WEIGHT_SETS

MAX_GRID_IMAGES = 1024  # a .png grid beyond this is a mistake: use .npz or --png-dir
OUT_KINDS = (".png", ".npz")
MAX_STEPS = 1000  # the length of DiT's diffusion process


@dataclass(kw_only=True)
class SampleConfig:
    """What to sample from which checkpoint, how, and where to write it."""

    ckpt: str
    """checkpoint file or diffusers folder, or a released name (DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt) fetched
    into $DITLAB_HOME"""
    out: str
    """FILE.png (one grid) or FILE.npz (ADM's sample format); the record of the settings goes beside it as FILE.json"""
    classes: list[str] | None = None
    """classes by id or name ("golden retriever", an unambiguous prefix): one image each, or with --num-samples
    cycled through"""
    num_samples: int | None = None
    """number of images (classes uniformly random unless --classes or --labels balanced)"""
    labels: str = field(default="random", metadata={"choices": LABEL_MODES})
    """random (uniform, the paper's FID-50K) or balanced (exactly N / K images of each class, or of each of
    --classes, in a fixed shuffled order)"""
    captions: bool = False
    """write each image's class name under it in a .png grid"""
    model: str | None = None
    """named config, e.g. DiT-XL/2: gives the authors' state dicts their number of heads; checked against the
    weights"""
    image_size: int | None = None
    """image resolution, checked against the checkpoint (default: the checkpoint's)"""
    vae: str | None = None
    """hub id, local AutoencoderKL folder, or 'pixel' (default: the codec a ditlab checkpoint was trained with,
    pixel for digits and Fashion-MNIST, else stabilityai/sd-vae-ft-ema)"""
    steps: int = 250
    """sampling steps, respaced as ADM does (250 is the paper's)"""
    sampler: str = field(default="ddpm", metadata={"choices": SAMPLERS})
    """ddpm (ancestral, the paper's), ddim, or dpm++2m (20-25 steps)"""
    cfg_scale: float = 1.0
    """classifier-free guidance scale; 1.0 = none. The paper's FID-50K uses 1.5, its figures 4.0"""
    guidance_channels: int | None = None
    """guide only the first K latent channels; 3 reproduces the reference code and its published FID
    (default: all)"""
    seed: int = 0
    """image i is drawn from seed and i alone"""
    batch_size: int = 32
    """images per forward pass, per process"""
    precision: str = field(default="auto", metadata={"choices": PRECISIONS})
    """autocast of the DiT forward: auto = bf16 on CUDA and on CPUs where a probe measures bf16 faster, else fp32;
    the diffusion maths stay fp32, the VAE runs in fp32 unless bf16/fp16 is asked for"""
    weights: str = field(default="ema", metadata={"choices": WEIGHT_SETS})
    """EMA or raw weights, for checkpoints that hold both"""
    png_dir: str | None = None
    """also write every image as PNG_DIR/{index:06d}.png"""
    nrow: int | None = None
    """images per row of a .png grid (default 8)"""
    device: str | None = field(default=None, metadata={"choices": DEVICES})
    """default: cuda when available"""
    progress: bool = field(default=True, metadata={"flag": "--no-progress"})
    """show a progress bar (--no-progress: none)"""

    def __post_init__(self) -> None:
        out = Path(self.out).expanduser()
        if out.suffix.lower() not in OUT_KINDS:
            raise UserError(f"--out {self.out}: give a .png (one grid) or a .npz (ADM's sample format) file")
        if not self.classes and self.num_samples is None:
            raise UserError("give --classes C ... (a grid of those classes) or --num-samples N")
        n = self.num_images
        checks = [
            (n >= 1, f"--num-samples {n} must be positive"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size} must be positive"),
            (self.seed >= 0, f"--seed {self.seed} must be non-negative"),
            (1 <= self.steps <= MAX_STEPS, f"--steps {self.steps} must be between 1 and {MAX_STEPS}"),
            (self.sampler in SAMPLERS, f"--sampler {self.sampler}: choose one of {', '.join(SAMPLERS)}"),
            (self.precision in PRECISIONS, f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)}"),
            (self.weights in WEIGHT_SETS, f"--weights {self.weights}: choose {' or '.join(WEIGHT_SETS)}"),
            (self.nrow is None or self.nrow >= 1, f"--nrow {self.nrow} must be positive"),
            (self.labels in LABEL_MODES, f"--labels {self.labels}: choose {' or '.join(LABEL_MODES)}"),
            (not self.captions or out.suffix.lower() == ".png", f"--captions: only a .png grid has captions, "
                                                                 f"not --out {self.out}"),
            (out.suffix.lower() != ".png" or n <= MAX_GRID_IMAGES,
             f"--out {self.out}: a grid of {n} images; above {MAX_GRID_IMAGES} write a .npz or use --png-dir"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def num_images(self) -> int:
        return len(self.classes or []) if self.num_samples is None else self.num_samples

    @property
    def out_path(self) -> Path:
        return Path(self.out).expanduser()
