"""The settings of `ditlab sample`, validated before anything is loaded. Light (no torch): the
command line builds its flags from these fields (`ditlab.flags`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ditlab.errors import UserError
from ditlab.flags import check_fields
from ditlab.options import (
    DEVICES,
    LABEL_MODES,
    MAX_CFG_SCALE,
    MAX_DIFFUSION_STEPS,
    OBJECTIVE_SAMPLERS,
    OBJECTIVES,
    PRECISIONS,
    WEIGHT_SETS,
)

MAX_GRID_IMAGES = 1024  # a .png grid beyond this is a mistake: use .npz or --png-dir
OUT_KINDS = (".png", ".npz")
MAX_STEPS = MAX_DIFFUSION_STEPS
ALL_SAMPLERS = tuple(s for samplers in OBJECTIVE_SAMPLERS.values() for s in samplers)


def check_balanced(n: int, k: int) -> None:
    """The rule of balanced labels, for `ditlab sample --labels balanced` and a study's alike: N
    images over K classes must be a multiple of K (exactly N / K each); the error names the nearest."""
    if n % k:
        candidates = [v for v in (n // k * k, (n // k + 1) * k) if v > 0]
        best = min(abs(v - n) for v in candidates)
        nearest = " or ".join(str(v) for v in candidates if abs(v - n) == best)
        raise UserError(f"--num-samples {n}: --labels balanced needs a multiple of the {k} classes; "
                        f"the nearest is {nearest}")


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
    steps: int | None = None
    """sampling steps: ddpm's respaced as ADM does, a flow's time grid intervals (default: the checkpoint's
    process's, 250 for both, the paper's and SiT's)"""
    sampler: str | None = field(default=None, metadata={"choices": ALL_SAMPLERS})
    """a ddpm checkpoint: ddpm (ancestral, the paper's), ddim, or dpm++2m (20-25 steps); a flow checkpoint:
    euler, heun (ODE), sde-euler, sde-heun (SDE) or dopri5 (adaptive) (default: the first of its process's)"""
    objective: str | None = field(default=None, metadata={"choices": OBJECTIVES})
    """the process of a file that does not record one (the authors' state dict, a diffusers folder): ddpm or
    flow (default: the checkpoint's; ddpm where it says none)"""
    cfg_scale: float = field(default=1.0, metadata={"min": 0.0, "max": MAX_CFG_SCALE})
    """classifier-free guidance scale; 1.0 = none. The paper's FID-50K uses 1.5, its figures 4.0"""
    guidance_channels: int | None = field(default=None, metadata={"min": 1})
    """guide only the first K latent channels; 3 reproduces the reference code and its published FID
    (default: all)"""
    guidance_interval: list[float] | None = field(default=None, metadata={"nargs": 2, "metavar": ("LO", "HI"),
                                                                          "infinite": True})
    """guide only the steps whose EDM noise level sigma lies in (LO, HI] (Kynkaanniemi et al. 2024): sigma =
    sqrt((1 - alpha_bar) / alpha_bar) for DDPM, (1 - t) / t on flow's linear path; 0 0 guides nowhere, 0 inf
    everywhere; unguided steps cost one model call, not two (default: every step)"""
    guidance_t: list[float] | None = field(default=None, metadata={"nargs": 2, "metavar": ("LO", "HI"),
                                                                   "infinite": True})
    """guide only the steps whose time lies in [LO, HI] in the process's own t: DDPM's original timestep
    (0-999), flow's t (0 noise, 1 data; REPA's guidance_low L, guidance_high H are 1-H 1-L)"""
    guide_ckpt: str | None = field(default=None, metadata={"metavar": "PATH|NAME"})
    """autoguidance (Karras et al. 2024): a checkpoint (path or released name) of the same latent space and
    process, e.g. an earlier or smaller model, whose prediction replaces the unconditional one: D = D_guide +
    W (D_main - D_guide) with --cfg-scale W, both conditional"""
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
        check_fields(self)  # types, finite floats, the fields' bounds
        out = Path(self.out).expanduser()
        if out.suffix.lower() not in OUT_KINDS:
            raise UserError(f"--out {self.out}: give a .png (one grid) or a .npz (ADM's sample format) file")
        if not self.classes and self.num_samples is None:
            raise UserError("give --classes C ... (a grid of those classes) or --num-samples N")
        from ditlab.runtime.files import check_output_file

        check_output_file(out, "--out", makes_parents=True)
        n = self.num_images
        checks = [
            (n >= 1, f"--num-samples {n} must be positive"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size} must be positive"),
            (self.seed >= 0, f"--seed {self.seed} must be non-negative"),
            (self.steps is None or 1 <= self.steps <= MAX_STEPS, f"--steps {self.steps} must be between 1 and "
                                                                  f"{MAX_STEPS}"),
            (self.sampler is None or self.sampler in ALL_SAMPLERS,
             f"--sampler {self.sampler}: choose one of {', '.join(ALL_SAMPLERS)}"),
            (self.objective is None or self.objective in OBJECTIVES,
             f"--objective {self.objective}: choose one of {', '.join(OBJECTIVES)}"),
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
        self._check_guidance()

    def _check_guidance(self) -> None:
        from ditlab.diffusion.guidance import Guidance

        for flag, value in (("--guidance-interval", self.guidance_interval), ("--guidance-t", self.guidance_t)):
            if value is not None and len(value) != 2:
                raise UserError(f"{flag} takes two numbers LO HI, got {len(value)}")
        if self.guidance_interval is not None and self.guidance_t is not None:
            raise UserError("give --guidance-interval (in sigma) or --guidance-t (in t), not both")
        if self.guide_ckpt is not None and self.cfg_scale == 1.0:
            raise UserError(f"--guide-ckpt {self.guide_ckpt} guides with --cfg-scale W: give W != 1")
        try:
            Guidance(scale=self.cfg_scale, interval=self.guidance_interval, t_interval=self.guidance_t)
        except UserError as e:
            flag = "--guidance-interval" if self.guidance_interval is not None else "--guidance-t"
            raise UserError(f"{flag}: {e}" if "interval" in str(e) else f"--cfg-scale: {e}") from e

    @property
    def num_images(self) -> int:
        return len(self.classes or []) if self.num_samples is None else self.num_samples

    @property
    def out_path(self) -> Path:
        return Path(self.out).expanduser()
