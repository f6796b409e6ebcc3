"""The names a user chooses among, as plain tuples importable without torch, so that the command
line's parser is built without loading the library. Each registry that implements a choice
(`diffusion.SAMPLERS`, `models.BLOCKS`, `checkpoints.formats.READERS` ...) is checked against
its tuple here by the tests."""

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""--precision: auto (bf16 autocast where the hardware does it well, else fp32), fp32, bf16, fp16."""
SAMPLERS = ("ddpm", "ddim", "dpm++2m")
"""--sampler of a DDPM checkpoint: ancestral DDPM (the paper's), DDIM, DPM-Solver++(2M)."""
FLOW_SAMPLERS = ("euler", "heun", "sde-euler", "sde-heun", "dopri5")
"""--sampler of a flow checkpoint: Euler and Heun ODE, Euler-Maruyama and Heun SDE, adaptive dopri5."""
OBJECTIVE_SAMPLERS = {"ddpm": SAMPLERS, "flow": FLOW_SAMPLERS}
"""--objective -> its samplers, the first the default (`diffusion.protocol.PROCESSES` holds the processes)."""
OBJECTIVES = tuple(OBJECTIVE_SAMPLERS)
"""--objective: the paper's Gaussian diffusion (ddpm) or flow matching on an interpolant (SiT's flow)."""
FLOW_PATHS = ("linear", "gvp")
"""--path of a flow: linear (x_t = t x_1 + (1 - t) x_0) or gvp (sin / cos)."""
FLOW_PREDICTIONS = ("velocity", "noise", "score")
"""--prediction of a flow model."""
FLOW_LOSS_WEIGHTS = ("none", "velocity", "likelihood")
"""--loss-weight of noise / score prediction (SiT's)."""
TIME_SAMPLINGS = ("uniform", "logit-normal")
"""--time-sampling of a flow's training times."""
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
FEATURE_SETS = ("inception", "dinov2")
"""--features of `ditlab eval`: ADM's Inception metrics, FD-DINOv2 (EDM2's protocol); comma-separated."""
NORMS = ("layernorm", "rmsnorm")
"""--norm: the blocks' and the final layer's normalisation; LayerNorm (the paper's) or RMSNorm (LightningDiT)."""
QK_NORMS = ("none", "rmsnorm", "layernorm")
"""--qk-norm: normalise queries and keys per head before attention (LightningDiT's QK-norm), or not."""
MLPS = ("gelu", "swiglu")
"""--mlp: the paper's GELU MLP, or LightningDiT's SwiGLU of hidden width int(2/3 x mlp_ratio x D)."""
POSITIONS = ("sincos", "sincos+rope", "rope")
"""--pos: the fixed 2-D sin-cos table (the paper's), the table plus 2-D rotary q/k (LightningDiT's), or rotary only."""
BLOCK_OPTIONS = {"norm": NORMS, "qk_norm": QK_NORMS, "mlp": MLPS, "pos": POSITIONS}
"""The modern block options (DiTConfig fields, `train` and `flops` flags) and their choices, the paper's first."""


def check_block_options(settings: object) -> None:
    """Refuse, naming the flag, a block option of `settings` (a DiTConfig or TrainConfig) not among its choices."""
    from ditlab.errors import UserError

    for name, choices in BLOCK_OPTIONS.items():
        value = getattr(settings, name)
        if value not in choices:
            raise UserError(f"--{name.replace('_', '-')} {value!r}: choose one of {', '.join(choices)}")
MAX_DIFFUSION_STEPS = 1000
"""The length of DiT's diffusion process: the most sampling steps any flag may ask for."""
MAX_CFG_SCALE = 100.0
"""The largest classifier-free guidance scale a flag accepts (the paper's figures use 4; past 100 it is a typo)."""
