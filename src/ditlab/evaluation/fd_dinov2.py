"""FD-DINOv2 as EDM2's `calculate_metrics.py` computes it (Karras et al. 2024; the DINOv2 detector
of Stein et al. 2023's dgm-eval): the CLS token of DINOv2 ViT-L/14 of every image, resized to
224x224 with torch's antialiased bicubic resampling of the uint8 values (EDM2's default
`resize_mode='torch'`), scaled to [0, 1] and normalised with ImageNet's mean and std.

dgm-eval itself resizes with PIL's bicubic filter on uint8 images (EDM2's `resize_mode='pil'`, "slow
reference implementation"); EDM2 made its published FD-DINOv2 numbers with the torch resize, which
it calls "almost the same". We follow EDM2: its tables are the numbers later papers compare with,
and the torch resize runs on the GPU, batched. The record (`feature_record`) names the network,
its weights' SHA-256 and this preprocessing, so a number is never compared across them unawares.

A reference file made by `ditlab eval --save-ref` stores the reference's DINOv2 features
(`feats_dinov2`, for precision and recall), their statistics (`mu_dinov2`, `sigma_dinov2`) and the
record (`dinov2_record`); they are used only when the record matches the network in use."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ditlab.errors import UserError
from ditlab.evaluation.dinov2 import DinoVisionTransformer, arch_name, load_dinov2
from ditlab.evaluation.metrics import FeatureStats

RESIZE = 224  # EDM2 / dgm-eval resize every image to 224x224 (16x16 patches of 14)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIXEL_MAX = 255.0
PREPROCESSING = ("EDM2 calculate_metrics DINOv2Detector, resize_mode 'torch': uint8 as float32, bicubic antialiased "
                 "resize to 224x224, / 255, minus ImageNet mean (0.485, 0.456, 0.406), over std (0.229, 0.224, 0.225); "
                 "the normalised CLS token")
FEATURES_KEY, MU_KEY, SIGMA_KEY, RECORD_KEY = "feats_dinov2", "mu_dinov2", "sigma_dinov2", "dinov2_record"


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, 3, H, W) -> float32 (N, 3, 224, 224), EDM2's DINOv2 input."""
    x = F.interpolate(images.to(torch.float32), size=(RESIZE, RESIZE), mode="bicubic", antialias=True)
    x = x / PIXEL_MAX
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return (x - mean) / std


@torch.inference_mode()
def dinov2_batch(model: DinoVisionTransformer, batch: np.ndarray) -> torch.Tensor:
    """CLS features (B, D) float32 on the model's device of uint8 images (B, H, W, 3)."""
    device = model.cls_token.device
    x = torch.from_numpy(batch).to(device, non_blocking=True).permute(0, 3, 1, 2)  # (B, 3, H, W)
    return model(preprocess(x)).float()


def dinov2_features(model: DinoVisionTransformer, batches: Iterable[np.ndarray]) -> torch.Tensor:
    """CLS features (N, D) of every image of uint8 batches (B, H, W, 3), in order."""
    return torch.cat([dinov2_batch(model, b) for b in batches])


def dinov2_weights(path_or_name: str | None, progress: bool = False) -> str:
    """A local weights file, or a released name (`dinov2_vitl14_pretrain.pth`, ...) fetched into
    $DITLAB_HOME; None: FD-DINOv2's ViT-L/14."""
    from ditlab.hub import DINOV2_NAME, RELEASED, fetch

    name = path_or_name or DINOV2_NAME
    if os.path.exists(name):
        return name
    if name in RELEASED and RELEASED[name].kind == "dinov2":
        return str(fetch(name, progress))
    if path_or_name is None or os.sep in name or name.endswith((".pth", ".pt")):
        return name  # load_dinov2 says the file is missing
    names = ", ".join(n for n, e in RELEASED.items() if e.kind == "dinov2")
    raise UserError(f"--dinov2 {name}: no such file, nor a released name ({names})")


def load_network(path: str, device: torch.device) -> tuple[DinoVisionTransformer, dict[str, Any]]:
    """The network of a weights file and its record: which network, which weights, which preprocessing."""
    from ditlab.hub import file_sha256

    model = load_dinov2(path, device)
    record = {"network": arch_name(model.cfg), "weights": os.path.basename(path),
              "weights_sha256": file_sha256(Path(path)), "feature_dim": model.cfg.embed_dim,
              "preprocessing": PREPROCESSING}
    return model, record


def load_stored(path: str, record: dict[str, Any]) -> tuple[torch.Tensor, FeatureStats] | None:
    """The reference's stored DINOv2 features (N, D) and statistics, or None when it stores none.
    Stored ones made by another network or preprocessing are refused, naming both."""
    from ditlab.evaluation.batches import check_valid_stats

    with zipfile.ZipFile(path) as z:
        members = {m.removesuffix(".npy") for m in z.namelist()}
    keys = (FEATURES_KEY, MU_KEY, SIGMA_KEY, RECORD_KEY)
    if not any(k in members for k in keys):
        return None
    if not all(k in members for k in keys):
        raise UserError(f"{path}: has {', '.join(k for k in keys if k in members)} but not "
                        f"{', '.join(k for k in keys if k not in members)}")
    with np.load(path, allow_pickle=False) as z:
        stored = json.loads(str(z[RECORD_KEY]))
        theirs = (stored.get("weights_sha256"), stored.get("preprocessing"))
        if theirs != (record["weights_sha256"], record["preprocessing"]):
            raise UserError(f"{path}: its DINOv2 features were made by {stored.get('network')} "
                            f"({stored.get('weights')}, SHA-256 {str(theirs[0])[:12]}), not by {record['network']} "
                            f"({record['weights']}, SHA-256 {record['weights_sha256'][:12]}) with this preprocessing; "
                            "make the reference again with --save-ref")
        feats, mu, sigma = z[FEATURES_KEY], np.asarray(z[MU_KEY], np.float64), np.asarray(z[SIGMA_KEY], np.float64)
    d = record["feature_dim"]
    if feats.ndim != 2 or feats.shape[1] != d or mu.shape != (d,) or sigma.shape != (d, d):
        raise UserError(f"{path}: {FEATURES_KEY} {feats.shape}, {MU_KEY} {mu.shape}, {SIGMA_KEY} {sigma.shape}; "
                        f"expected (N, {d}), ({d},), ({d}, {d})")
    check_valid_stats(mu, sigma, path, (MU_KEY, SIGMA_KEY))
    return torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)), FeatureStats(mu, sigma)


def stored_arrays(features: torch.Tensor, stats: FeatureStats, record: dict[str, Any]) -> dict[str, np.ndarray]:
    """The arrays a reference file stores for DINOv2 (see `load_stored`)."""
    return {FEATURES_KEY: features.cpu().numpy().astype(np.float32), MU_KEY: stats.mu, SIGMA_KEY: stats.sigma,
            RECORD_KEY: np.array(json.dumps(record, sort_keys=True))}
