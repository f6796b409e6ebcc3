"""Write tests/data/golden_lightningdit_reference.npz: weights, inputs and forward outputs of tiny
random LightningDiTs (github.com/hustvl/LightningDiT, its models/ package), one per block option
and the released combination, for tests/test_golden_lightningdit.py to compare ditlab with,
without the reference installed.

    python scripts/make_golden_lightningdit.py --repo PATH/TO/hustvl/LightningDiT [--out FILE] [--ref-commit SHA]

Run it once, in an environment with the reference's imports (torch, numpy, timm, einops). Stand-ins
(empty modules) take the place of what it imports and this script never uses: torchvision (imported
by timm) and fairscale (imported by models/rmsnorm.py for LLaMA's parallel layers, not for RMSNorm);
torch.compile, which decorates its forwards, is made the identity (the eager code is the definition).
This script does not import ditlab, so the fixture is independent of it.

What is stored: the config (JSON), and per variant "<name>/<key>" its full state dict: every
trainable tensor random (std 0.2 about 0, the qkv projections 0.5 for peaked attention, norm weights
about 1) and rounded to float16 (stored as float16; the reference ran with exactly these values in
float32), its buffers and sin-cos table as the reference computed them (float32); the inputs x
(float16-rounded), t (flow time in [0, 1]), y (with the null label), and "<name>/out", the
eval-mode forward in float32."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_golden import randomized_with_norms, reference_commit, stub_packages, write_fixture  # noqa: E402  (the shared golden-script helpers)

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=16, depth=2, num_heads=2, num_classes=10)
N = 3  # batch
WEIGHT_STD = 0.2
QKV_STD = 0.5  # larger: peaked attention, so that the positions (RoPE) and QK-norm move the output clearly
SEED = 0
# name -> LightningDiT's switches; each option alone, the released combination, and all together.
VARIANTS = {
    "rmsnorm": dict(use_rmsnorm=True),
    "qknorm": dict(use_qknorm=True),  # LayerNorm QK-norm (its norm follows use_rmsnorm)
    "qknorm_rmsnorm": dict(use_qknorm=True, use_rmsnorm=True),  # RMSNorm QK-norm
    "swiglu": dict(use_swiglu=True),
    "rope": dict(use_rope=True),
    "released": dict(use_rmsnorm=True, use_swiglu=True, use_rope=True),
    "all": dict(use_rmsnorm=True, use_qknorm=True, use_swiglu=True, use_rope=True),
}
STUBBED = ("torchvision", "fairscale")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "golden_lightningdit_reference.npz"


def eager_compile(fn=None, **kwargs):
    """torch.compile as the identity, with or without arguments."""
    return fn if fn is not None else (lambda f: f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True, help="a checkout of github.com/hustvl/LightningDiT")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"where to write the fixture (default {DEFAULT_OUT})")
    parser.add_argument("--ref-commit", default=None, help="the checkout's commit, recorded in the fixture")
    args = parser.parse_args()

    stub_packages(*STUBBED)
    torch.compile = eager_compile
    sys.path.insert(0, args.repo)
    from models.lightningdit import LightningDiT  # the reference

    g = torch.Generator().manual_seed(SEED)
    C, S = TINY["in_channels"], TINY["input_size"]
    x = (torch.randn(N, C, S, S, generator=g)).half().float()
    t = torch.tensor([0.0, 0.37109375, 1.0])  # flow time, float16-exact
    y = torch.tensor([3, TINY["num_classes"], 7])  # the middle one is the null label
    out: dict[str, np.ndarray] = {"x": x.numpy().astype(np.float16), "t": t.numpy(), "y": y.numpy()}
    for i, (name, switches) in enumerate(VARIANTS.items()):
        torch.manual_seed(SEED + i)
        reference = LightningDiT(**TINY, learn_sigma=False, **switches)
        model = randomized_with_norms(reference, SEED + i, WEIGHT_STD, QKV_STD)
        with torch.no_grad():
            output = model(x, t, y)  # (N, C, H, W)
        for key, value in model.state_dict().items():
            trainable = key in dict(model.named_parameters()) and dict(model.named_parameters())[key].requires_grad
            out[f"{name}/{key}"] = value.numpy().astype(np.float16 if trainable else np.float32)
        out[f"{name}/out"] = output.numpy()
    config = {"model": TINY, "variants": VARIANTS, "weight_std": WEIGHT_STD, "qkv_std": QKV_STD, "seed": SEED,
              "reference": "github.com/hustvl/LightningDiT", "commit": args.ref_commit or reference_commit(args.repo)}
    out["config"] = np.array(json.dumps(config))
    write_fixture(args.out, out)


if __name__ == "__main__":
    main()
