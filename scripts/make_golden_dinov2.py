"""Write tests/data/golden_dinov2_reference.npz: weights, inputs and features of the official DINOv2
model code (github.com/facebookresearch/dinov2: dinov2/models/vision_transformer.py and its layers),
for tests/test_dinov2.py to compare ditlab with, without the reference installed.

    python scripts/make_golden_dinov2.py --dinov2-repo PATH/TO/facebookresearch/dinov2 [--out FILE] [--ref-commit SHA]

Run it once in an environment with torch and numpy (xformers absent or disabled: the reference then
runs its plain PyTorch attention and SwiGLU). This script does not import ditlab.

What is stored (float32 unless said otherwise):
- two tiny ViTs at patch 14 built by the reference's `DinoVisionTransformer` with the hub's settings
  (LayerScale, no block chunks), width 64, 2 heads of 32, MLP ratio 2, depth 2, a position embedding for 70x70
  images (5x5 patches): "plain" (GELU MLP, no registers, bicubic interpolation with the 0.1 offset,
  as dinov2_vit*14) and "reg" (SwiGLU FFN as ViT-g, 4 registers, antialiased interpolation without
  offset, as dinov2_vit*14_reg). Every parameter is random and rounded to float16 (stored as
  float16; the reference ran with exactly these values in float32), under "<name>/<key>";
- inputs (rounded to float16), under "input/<H>x<W>", at 42x42 and 56x42 (the position embedding
  interpolated) and 70x70 (the stored one), and each model's x_norm_clstoken, x_norm_regtokens and
  x_norm_patchtokens of them under "<name>/<H>x<W>/...";
- the official layout of the eight hub models (dinov2_vit{s,b,l,g}14 and their _reg variants):
  every key and shape of the state dict `torch.hub` loads strictly, built on the meta device, as
  JSON in "hub_layouts"."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_golden import half_rounded, reference_commit, write_fixture  # noqa: E402  (the shared golden-script helpers)

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "golden_dinov2_reference.npz"
TINY = dict(patch_size=14, img_size=70, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2, init_values=1.0,
            block_chunks=0)
MODELS = {
    "plain": dict(ffn_layer="mlp", num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1),
    "reg": dict(ffn_layer="swiglufused", num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0),
}
SIZES = ((42, 42), (56, 42), (70, 70))  # (H, W): interpolated, interpolated non-square, the stored grid
BATCH = 2
WEIGHT_STD = 0.05
HUB_MODELS = ("dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14")
SEED = 0


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random, rounded to float16 values: scales (LayerNorm weights, LayerScale
    gammas) 1 + 0.1 N(0, 1), everything else WEIGHT_STD N(0, 1). Eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            scale = name.endswith("gamma") or (".norm" in name or name.startswith("norm")) and name.endswith("weight")
            p.copy_(half_rounded(1.0 + 0.1 * noise if scale else WEIGHT_STD * noise))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dinov2-repo", required=True, help="a checkout of github.com/facebookresearch/dinov2")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"where to write the fixture (default {DEFAULT_OUT})")
    parser.add_argument("--ref-commit", default=None, help="the checkout's commit, recorded in the fixture")
    args = parser.parse_args()
    os.environ["XFORMERS_DISABLED"] = "1"  # the reference's plain PyTorch paths
    warnings.filterwarnings("ignore", message="xFormers")
    sys.path.insert(0, str(Path(args.dinov2_repo).resolve()))
    from dinov2.hub import backbones
    from dinov2.models import vision_transformer as vits

    torch.set_num_threads(1)
    commit = args.ref_commit or reference_commit(args.dinov2_repo)
    store: dict[str, np.ndarray] = {}
    g = torch.Generator().manual_seed(SEED)
    inputs = {f"{h}x{w}": half_rounded(torch.randn(BATCH, 3, h, w, generator=g)) for h, w in SIZES}
    for size, x in inputs.items():
        store[f"input/{size}"] = x.half().numpy()
    for i, (name, kwargs) in enumerate(MODELS.items()):
        model = randomized(vits.DinoVisionTransformer(**TINY, **kwargs,
                                                      block_fn=partial(vits.Block, attn_class=vits.MemEffAttention)),
                           seed=SEED + 1 + i)
        for key, value in model.state_dict().items():
            store[f"{name}/{key}"] = value.half().numpy()
        for size, x in inputs.items():
            with torch.no_grad():
                out = model.forward_features(x)
            where = f"{name}/{size}"
            for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens"):
                store[f"{where}/{key}"] = out[key].numpy()

    layouts = {}
    for hub in HUB_MODELS:
        for reg in (False, True):
            build = getattr(backbones, hub + ("_reg" if reg else ""))
            with torch.device("meta"):
                model = build(pretrained=False)
            name = hub + ("_reg4" if reg else "")
            layouts[name] = {k: list(v.shape) for k, v in model.state_dict().items()}
    store["hub_layouts"] = np.array(json.dumps(layouts))
    store["config"] = np.array(json.dumps({"tiny": TINY, "models": MODELS, "sizes": SIZES, "batch": BATCH,
                                           "weight_std": WEIGHT_STD, "seed": SEED, "reference_commit": commit,
                                           "torch": torch.__version__}))
    write_fixture(args.out, store)


if __name__ == "__main__":
    main()
