"""The names a user chooses among, as plain tuples importable without torch, so that the command
line's parser is built without loading the library. Each registry that implements a choice
(`diffusion.SAMPLERS`, `models.BLOCKS`, `checkpoints.formats.READERS` ...) is checked against
its tuple here by the tests."""

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""--precision: auto (bf16 autocast where the hardware does it well, else fp32), fp32, bf16, fp16."""
SAMPLERS = ("ddpm", "ddim", "dpm++2m")
"""--sampler: ancestral DDPM (the paper's), DDIM, DPM-Solver++(2M)."""
BLOCKS = ("adaln-zero", "adaln", "cross-attn", "in-context")
"""--block: the four block designs of the paper's section 3.2, adaLN-Zero the default."""
FORMATS = ("ditlab", "original", "diffusers", "safetensors")
"""Checkpoint formats `ditlab sample` reads and `ditlab convert` writes."""
WEIGHT_SETS = ("ema", "model")
"""--weights: the EMA weights (sampled from by default) or the raw trained ones."""
DEVICES = ("cpu", "cuda")
"""--device: forced; by default cuda when available."""
LATENT_DTYPES = ("float16", "float32")
"""--dtype of a latent cache's stored mean and std."""
LABEL_MODES = ("random", "balanced")
"""--labels: each image's class uniformly random (the paper's FID-50K), or exactly N / K of each class."""
LR_SCHEDULES = ("constant", "cosine", "linear")
"""--lr-schedule: after the warmup, constant (the paper's), cosine or linear decay to --lr-min."""
MAX_DIFFUSION_STEPS = 1000
"""The length of DiT's diffusion process: the most sampling steps any flag may ask for."""
MAX_CFG_SCALE = 100.0
"""The largest classifier-free guidance scale a flag accepts (the paper's figures use 4; past 100 it is a typo)."""
