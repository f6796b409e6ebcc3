"""Write tests/data/golden_repa_reference.npz: weights, inputs and outputs of REPA's own code
(github.com/sihyun-yu/REPA: models/sit.py's SiT with its projector, loss.py's SILoss) for
tests/test_golden_repa.py to compare ditlab's projector and alignment loss with, without the
reference installed.

    python scripts/make_golden_repa.py --repo PATH/TO/sihyun-yu/REPA [--out FILE] [--ref-commit SHA]

Run it once, in an environment with the reference's imports (torch, numpy, timm). An empty stand-in
takes the place of torchvision (imported by timm, never used here). This script does not import ditlab.

What is stored, per variant ("plain"; "qknorm": timm's LayerNorm QK-norm, REPA's --qk-norm):
- "<variant>/<key>": a tiny SiT's state dict (8x8x4 input, patch 2, hidden 16, depth 3, 2 heads,
  10 classes, encoder_depth 2, one 24-wide encoder, projector width 64), every trainable tensor random
  (std 0.2, qkv 0.5, LayerNorm weights about 1) and float16-rounded (stored as float16);
- x, t (REPA's time in [0, 1]), y (with the null label): the inputs, float16-exact;
- "<variant>/out", "<variant>/zs": its forward (the velocity and the projection of block 2's tokens);
- "<variant>/proj_loss": SILoss's projection loss of zs against encoder features z (stored, random,
  float16-rounded), the batch mean; "<variant>/proj_loss_each": the same for each image alone."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_golden import randomized_with_norms, reference_commit, stub_torchvision, write_fixture  # noqa: E402  (the shared golden-script helpers)

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=16, decoder_hidden_size=16, depth=3,
            num_heads=2, num_classes=10, encoder_depth=2, z_dims=[24], projector_dim=64)
N = 3
WEIGHT_STD, QKV_STD = 0.2, 0.5
SEED = 0
VARIANTS = {"plain": {"qk_norm": False}, "qknorm": {"qk_norm": True}}
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "golden_repa_reference.npz"


class Projected:
    """A stand-in for the model in SILoss.__call__: returns a fixed (output, zs_tilde)."""

    def __init__(self, zs_tilde: list[torch.Tensor]):
        self.zs_tilde = zs_tilde

    def __call__(self, x, t, **kwargs):
        return torch.zeros_like(x), self.zs_tilde


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True, help="a checkout of github.com/sihyun-yu/REPA")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"where to write the fixture (default {DEFAULT_OUT})")
    parser.add_argument("--ref-commit", default=None, help="the checkout's commit, recorded in the fixture")
    args = parser.parse_args()

    stub_torchvision()
    sys.path.insert(0, args.repo)
    from loss import SILoss  # the reference
    from models.sit import SiT

    g = torch.Generator().manual_seed(SEED)
    C, S = TINY["in_channels"], TINY["input_size"]
    T = (S // TINY["patch_size"]) ** 2
    x = torch.randn(N, C, S, S, generator=g).half().float()
    t = torch.tensor([0.0, 0.37109375, 1.0])
    y = torch.tensor([3, TINY["num_classes"], 7])
    z = torch.randn(N, T, TINY["z_dims"][0], generator=g).half().float()  # the encoder's patch features
    out: dict[str, np.ndarray] = {"x": x.numpy().astype(np.float16), "t": t.numpy(), "y": y.numpy(),
                                  "z": z.numpy().astype(np.float16)}
    loss_fn = SILoss(prediction="v", path_type="linear", weighting="uniform")
    for i, (name, block_kwargs) in enumerate(VARIANTS.items()):
        torch.manual_seed(SEED + i)
        model = randomized_with_norms(SiT(path_type="linear", **TINY, **block_kwargs), SEED + i, WEIGHT_STD, QKV_STD)
        with torch.no_grad():
            velocity, zs = model(x, t, y)  # (N, C, H, W), [(N, T, z_dim)]
            _, proj_loss = loss_fn(Projected(zs), x, {}, zs=[z])
            each = [loss_fn(Projected([zs[0][j:j + 1]]), x[j:j + 1], {}, zs=[z[j:j + 1]])[1] for j in range(N)]
        params = dict(model.named_parameters())
        for key, value in model.state_dict().items():
            trainable = key in params and params[key].requires_grad
            out[f"{name}/{key}"] = value.numpy().astype(np.float16 if trainable else np.float32)
        out[f"{name}/out"], out[f"{name}/zs"] = velocity.numpy(), zs[0].numpy()
        out[f"{name}/proj_loss"] = np.float32(proj_loss)
        out[f"{name}/proj_loss_each"] = np.array([float(e) for e in each], dtype=np.float32)
    config = {"model": TINY, "variants": VARIANTS, "weight_std": WEIGHT_STD, "qkv_std": QKV_STD, "seed": SEED,
              "reference": "github.com/sihyun-yu/REPA", "commit": args.ref_commit or reference_commit(args.repo)}
    out["config"] = np.array(json.dumps(config))
    write_fixture(args.out, out)


if __name__ == "__main__":
    main()
