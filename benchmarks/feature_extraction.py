"""Feature extraction throughput of `ditlab eval`'s two networks side by side: the FID InceptionV3
(ADM's path: TF1 bilinear resize to 299, pool_3 and the sFID features) and FD-DINOv2's ViT-L/14
(EDM2's path: antialiased bicubic resize to 224, ImageNet normalisation, the CLS token), both with
random weights in their real layouts, on the same uint8 256x256 batches (the ImageNet protocol's
size), timed in alternating rounds (ABBA) so that the shared machine's load hits both alike.

    PYTHONPATH=src python benchmarks/feature_extraction.py [--batch-size 4 --rounds 4 --out FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from dit_common import alternate, conditions, summarize, write_result  # noqa: E402

from ditlab.evaluation.dinov2 import DinoVisionTransformer, hub_config  # noqa: E402
from ditlab.evaluation.evaluate import _full_fp32  # noqa: E402
from ditlab.evaluation.fd_dinov2 import RESIZE, dinov2_batch  # noqa: E402
from ditlab.evaluation.inception import InceptionV3, random_state_dict  # noqa: E402


def dinov2_macs(cfg, tokens: int) -> float:
    """Multiply-accumulates of one image through the ViT: per block qkv, proj, the two attention
    matmuls and the MLP; plus the patch embedding."""
    d, h = cfg.embed_dim, cfg.hidden
    per_block = tokens * (3 * d * d + d * d + 2 * d * h) + 2 * tokens * tokens * d
    return cfg.depth * per_block + (tokens - 1) * 3 * cfg.patch_size ** 2 * d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=1, help="timed batches per network per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--arch", default="vitl14", help="DINOv2 size (default vitl14, FD-DINOv2's)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cond = conditions(device, args.threads)

    inception = InceptionV3()
    inception.load_state_dict(random_state_dict(0), strict=False)  # no BN step counters in the real file
    inception = inception.to(device).eval().requires_grad_(False)
    torch.manual_seed(0)
    cfg = hub_config(args.arch)
    dinov2 = DinoVisionTransformer(cfg).to(device).eval().requires_grad_(False)
    batch = np.random.default_rng(0).integers(0, 256, (args.batch_size, args.image_size, args.image_size, 3),
                                              dtype=np.uint8)  # (B, H, W, 3) as NpzImages yields them

    def run_inception() -> None:
        with torch.inference_mode():
            pool, _ = inception(torch.from_numpy(batch).to(device).permute(0, 3, 1, 2))
            pool.cpu()

    def run_dinov2() -> None:
        dinov2_batch(dinov2, batch).cpu()

    with _full_fp32():
        times = alternate({"inception": run_inception, "dinov2": run_dinov2}, device, args.warmup, args.rounds,
                          args.steps, log=lambda s: print(s, file=sys.stderr, flush=True))
    rate = {k: args.batch_size / statistics.median(v) for k, v in times.items()}
    tokens = 1 + (RESIZE // cfg.patch_size) ** 2
    result = {
        "benchmark": "feature_extraction",
        "networks": {
            "inception": "InceptionV3 (TF graph 2015-12-05 layout), random weights; uint8 -> 299x299 -> pool_3, "
                         "spatial",
            "dinov2": f"DINOv2 {args.arch} (official layout, {sum(t.numel() for t in dinov2.parameters()) / 1e6:.1f}M "
                      f"parameters), random weights; uint8 -> 224x224 -> CLS ({cfg.embed_dim})",
        },
        "dinov2_gmacs_per_image": dinov2_macs(cfg, tokens) / 1e9,
        "input": f"uint8 {args.image_size}x{args.image_size}x3, batch {args.batch_size}",
        "precision": "float32 (TF32 off, as ditlab eval runs)",
        "inception": {"images_per_s": rate["inception"], **summarize(times["inception"])},
        "dinov2": {"images_per_s": rate["dinov2"], **summarize(times["dinov2"])},
        "ratio_inception_to_dinov2": rate["inception"] / rate["dinov2"],
        "seconds_per_50k_images": {k: 50_000 / r for k, r in rate.items()},
        "conditions": cond,
        "note": "the machine is shared: the load average is recorded; the ratio, measured in alternating "
                "rounds, is what holds",
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
