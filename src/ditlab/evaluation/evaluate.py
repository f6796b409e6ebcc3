"""`ditlab eval`: FID, sFID, IS, precision and recall of a sample batch against a reference batch,
computed as ADM's evaluator (openai/guided-diffusion `evaluations/evaluator.py`) computes them, and
FD-DINOv2 with precision and recall in DINOv2's feature space (`evaluation.fd_dinov2`)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ditlab.data.npz import NpzImages
from ditlab.errors import UserError
from ditlab.evaluation.batches import load_stats
from ditlab.evaluation.dinov2 import DinoVisionTransformer
from ditlab.evaluation.inception import InceptionV3, default_weights_path, load_inception
from ditlab.evaluation.metrics import (
    PR_NEIGHBOURS,
    FeatureStats,
    feature_stats,
    frechet_distance,
    inception_score,
    precision_recall,
)
from ditlab.options import FEATURE_SETS

DEFAULT_BATCH_SIZE = 64  # ADM's evaluator batch
PROTOCOL_SAMPLES = 50_000  # FID-50K: FID is biased by the sample count, so only equal counts compare
INCEPTION_RECORD = {
    "network": "InceptionV3, TF graph 2015-12-05 (weights-inception-2015-12-05-6726825d.pth)",
    "preprocessing": "ADM evaluator: TF1 bilinear resize to 299x299, (x - 128) / 128; pool_3 (2048) for FID, "
                     "precision, recall; mixed_6/conv channels 0..6 (2023) for sFID; unbiased logits for IS",
}


@contextlib.contextmanager
def _full_fp32() -> Iterator[None]:
    """Switch off TF32 convolutions and matmuls (cuDNN enables TF32 convolutions by default):
    features and distances are meant in full float32. Restores the previous settings."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _device(name: str | None) -> torch.device:
    """The --device flag as a torch device: default cuda when available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name}: not a torch device (cpu, cuda, cuda:1, ...)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here")
    return device


@torch.inference_mode()
def extract_features(
    model: InceptionV3, images: NpzImages, batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inception features of every image of a batch file, in file order, float32 on the model's
    device: pool_3 (N, 2048) and spatial (N, 2023)."""
    device = model.fc.weight.device
    pools, spatials = [], []
    with _full_fp32():
        for batch in _progress(images, batch_size, progress):
            x = torch.from_numpy(batch).to(device, non_blocking=True).permute(0, 3, 1, 2)  # (B, 3, H, W)
            pool, spatial = model(x)
            pools.append(pool)
            spatials.append(spatial)
    return torch.cat(pools), torch.cat(spatials)


def evaluate(
    samples_path: str,
    ref_path: str,
    inception_path: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | None = None,
    progress: bool = False,
    features: Sequence[str] = ("inception",),
    dinov2_path: str | None = None,
) -> dict[str, Any]:
    """The metrics of the `arr_0` images of `samples_path` against `ref_path` in each feature space
    of `features` ("inception", "dinov2").

    "inception": ADM's five numbers, fid, sfid, is, precision, recall. Statistics stored in a file
    (`mu`, `sigma`, `mu_s`, `sigma_s`) are used as ADM uses them; otherwise they are computed from
    its images. Precision and recall always use the images of both files (ADM's reference batches
    hold 10K images for this). Without `inception_path` the weights come from torch hub's folder
    or are fetched (`ditlab.hub`).
    "dinov2": fd_dinov2, precision_dinov2, recall_dinov2 in EDM2's FD-DINOv2 feature space
    (`evaluation.fd_dinov2`), with the reference's stored DINOv2 features when it has them (made
    by `ditlab eval --save-ref`); `dinov2_path` a weights file or released name (default ViT-L/14).

    Returns a JSON-ready dict: the metrics, how many images and which statistics were used, the
    network and preprocessing of each feature space ("features"), the sample batch's protocol
    record (None if it has none) and the protocol warnings (one line each). `ref_path` may name
    ADM's batch (imagenet256, imagenet512), or a judge (digits, fashion-mnist: `evaluation.judges`),
    whose scores it returns instead."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    from ditlab.evaluation.judges import evaluate_with_judge, is_judge

    if is_judge(ref_path) and not os.path.exists(ref_path):  # a judge's name: its scores instead
        return evaluate_with_judge(samples_path, ref_path, progress)
    features = check_features(features)
    from ditlab.data.npz import read_record

    files = {"samples": samples_path, "ref": reference_path(ref_path, progress)}
    images = {name: NpzImages(path) for name, path in files.items()}  # layout errors before any compute
    for imgs in images.values():
        if imgs.num_images <= PR_NEIGHBOURS:
            raise UserError(f"{imgs.path}: {imgs.num_images} images; precision/recall need more than {PR_NEIGHBOURS}")
    record = read_record(samples_path)
    torch_device = _device(device)
    # Every network and stored statistic is loaded (and refused) before the first feature is computed.
    if "inception" in features:
        inception_stored = {name: load_stats(path) for name, path in files.items()}
        inception = load_inception(inception_weights(inception_path, progress), torch_device)
    if "dinov2" in features:
        from ditlab.evaluation import fd_dinov2

        dinov2, dinov2_record = fd_dinov2.load_network(fd_dinov2.dinov2_weights(dinov2_path, progress), torch_device)
        dinov2_stored = fd_dinov2.load_stored(files["ref"], dinov2_record)
    result: dict[str, Any] = {}
    records: dict[str, Any] = {}
    if "inception" in features:
        result.update(_inception_metrics(inception, inception_stored, images, batch_size, progress))
        records["inception"] = INCEPTION_RECORD
    if "dinov2" in features:
        result.update(_dinov2_metrics(dinov2, dinov2_stored, images, batch_size, progress))
        records["dinov2"] = dinov2_record
    result.update({
        "num_samples": images["samples"].num_images,
        "num_ref": images["ref"].num_images,
        "ref": files["ref"],
        "features": records,
        "protocol": record,
        "warnings": protocol_warnings(images["samples"], images["ref"], record),
    })
    bad = [k for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:  # the output is strict JSON: no NaN or Infinity
        raise UserError(f"{samples_path} against {ref_path}: {', '.join(bad)} not finite "
                        f"({', '.join(f'{k} {result[k]}' for k in bad)}); check the images and statistics")
    return result


def check_features(features: Sequence[str] | str) -> tuple[str, ...]:
    """--features as a tuple of known feature spaces, in FEATURE_SETS order; one line naming a bad one."""
    if isinstance(features, str):
        features = [f.strip() for f in features.split(",")]
    unknown = [f for f in features if f not in FEATURE_SETS]
    if unknown or not features:
        raise UserError(f"--features {','.join(features)}: choose one or more of {', '.join(FEATURE_SETS)}, "
                        "comma-separated")
    return tuple(f for f in FEATURE_SETS if f in features)


def _inception_metrics(model: InceptionV3, stored: dict[str, dict[str, FeatureStats] | None],
                       images: dict[str, NpzImages], batch_size: int, progress: bool) -> dict[str, Any]:
    """ADM's five numbers and which statistics made them (`stored`: each file's stored statistics or None)."""
    feats = {name: extract_features(model, imgs, batch_size, progress) for name, imgs in images.items()}
    stats = {
        name: stored[name] or {"pool": feature_stats(feats[name][0]), "spatial": feature_stats(feats[name][1])}
        for name in images
    }
    with _full_fp32(), torch.inference_mode():
        logits = model.logits(feats["samples"][0])  # (N, 1008)
        precision, recall = precision_recall(feats["ref"][0], feats["samples"][0])
    s, r = stats["samples"], stats["ref"]
    return {
        "fid": frechet_distance(s["pool"].mu, s["pool"].sigma, r["pool"].mu, r["pool"].sigma),
        "sfid": frechet_distance(s["spatial"].mu, s["spatial"].sigma, r["spatial"].mu, r["spatial"].sigma),
        "is": inception_score(logits),
        "precision": precision,
        "recall": recall,
        "samples_stats": "stored" if stored["samples"] else "computed",
        "ref_stats": "stored" if stored["ref"] else "computed",
    }


def _dinov2_metrics(model: DinoVisionTransformer, stored: tuple[torch.Tensor, FeatureStats] | None,
                    images: dict[str, NpzImages], batch_size: int, progress: bool) -> dict[str, Any]:
    """FD-DINOv2 and precision / recall in its feature space (`stored`: the reference's stored
    DINOv2 features and statistics, or None to compute them from its images)."""
    from ditlab.evaluation import fd_dinov2

    with _full_fp32():
        samples = fd_dinov2.dinov2_features(model, _progress(images["samples"], batch_size, progress))
        if stored is None:
            ref = fd_dinov2.dinov2_features(model, _progress(images["ref"], batch_size, progress))
            ref_stats = feature_stats(ref)
        else:
            ref, ref_stats = stored[0].to(samples.device), stored[1]
        s = feature_stats(samples)
        with torch.inference_mode():
            precision, recall = precision_recall(ref, samples)
    return {
        "fd_dinov2": frechet_distance(s.mu, s.sigma, ref_stats.mu, ref_stats.sigma),
        "precision_dinov2": precision,
        "recall_dinov2": recall,
        "ref_stats_dinov2": "computed" if stored is None else "stored",
    }


def _progress(images: NpzImages, batch_size: int, progress: bool) -> Iterator[np.ndarray]:
    """The uint8 batches (B, H, W, 3) of a batch file, behind a progress bar if asked."""
    batches = images.batches(batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, total=-(-images.num_images // batch_size), desc=images.path, unit="batch")
    return batches


def reference_path(ref: str, progress: bool = False) -> str:
    """A reference batch file: `ref` itself, or ADM's batch of a name (imagenet256, imagenet512)
    fetched into $DITLAB_HOME when no such local file exists."""
    from ditlab.hub import REFERENCE_BATCHES, fetch

    if ref in REFERENCE_BATCHES and not os.path.exists(ref):
        return str(fetch(REFERENCE_BATCHES[ref], progress))
    return ref


def inception_weights(path: str | None, progress: bool = False) -> str:
    """--inception PATH if given; else torch hub's copy if there is one (torch-fidelity's place);
    else the weights fetched into $DITLAB_HOME."""
    if path is not None:
        return path
    if os.path.isfile(default_weights_path()):
        return default_weights_path()
    from ditlab.hub import INCEPTION_NAME, fetch

    return str(fetch(INCEPTION_NAME, progress))


def protocol_warnings(samples: NpzImages, ref: NpzImages, record: dict[str, Any] | None) -> list[str]:
    """One line for each way the batches stray from the protocol: other image sizes (the sample
    batch's recorded size, else its images'), or a sample count other than 50,000."""
    warnings = []
    size = (record["image_size"],) * 2 if record and record.get("image_size") else samples.shape[:2]
    if tuple(size) != tuple(ref.shape[:2]):
        warnings.append(f"{samples.path} holds {size[0]}x{size[1]} images but {ref.path} {ref.shape[0]}x"
                        f"{ref.shape[1]}: metrics across image sizes are not comparable")
    if samples.num_images != PROTOCOL_SAMPLES:
        warnings.append(f"{samples.path} holds {samples.num_images} images, not the protocol's {PROTOCOL_SAMPLES}: "
                        "FID depends on the sample count, compare only equal counts")
    return warnings

