"""`ditlab eval --save-ref OUT.npz IMAGES`: a reference batch made once from real images, so that
later evaluations read its statistics instead of computing them again.

IMAGES is a folder, flat or in the ImageNet layout (ADM's center crop to `image_size`, as DiT trains), an
ADM-layout .npz (its images as they are; Inception statistics it already stores, as ADM's batches
do, are kept rather than recomputed from its images), or the name of ADM's batch (imagenet256,
imagenet512). OUT is ADM's layout: `arr_0` the images (precision and recall need them), `arr_1`
the labels where known, `mu`, `sigma`, `mu_s`, `sigma_s` for "inception", and for "dinov2" the
features, statistics and record of `evaluation.fd_dinov2`. The file is written atomically; an
existing OUT is never overwritten: one that already holds every requested feature space (made by
the same DINOv2 weights) is the cache and is used as it is."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ditlab.data.npz import NpzImages
from ditlab.errors import UserError
from ditlab.evaluation.batches import load_stats
from ditlab.evaluation.metrics import FeatureStats, feature_stats

DEFAULT_IMAGE_SIZE = 256  # the paper's resolution, for folders of real images


class FolderImages:
    """The images of a folder, ADM-center-cropped: in the ImageNet layout (`ROOT/<class>/...`, labels
    the sorted class order) or flat (`ROOT/<image>`, no labels). `num_images`, `shape` (S, S, 3),
    `labels` (N,) or None, `batches(batch_size)` -> uint8 (B, S, S, 3), as `NpzImages` reads a file."""

    def __init__(self, root: str, image_size: int):
        from ditlab.data.images import IMAGE_EXTENSIONS, scan_image_folder

        if image_size < 1:
            raise UserError(f"--image-size {image_size} must be positive")
        self.path, self.image_size = root, image_size
        with os.scandir(root) as it:
            entries = sorted(it, key=lambda e: e.name)
        if any(e.is_dir() and not e.name.startswith(".") for e in entries):
            _, self.samples = scan_image_folder(root)
            self.labels: np.ndarray | None = np.array([label for _, label in self.samples], dtype=np.int64)
        else:
            self.samples = [(e.name, -1) for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
            self.labels = None
            if not self.samples:
                raise UserError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) and no class subfolders")
        self.num_images, self.shape = len(self.samples), (image_size, image_size, 3)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        from ditlab.data.images import center_crop_arr, load_rgb

        for start in range(0, self.num_images, batch_size):
            part = self.samples[start : start + batch_size]
            yield np.stack([center_crop_arr(load_rgb(os.path.join(self.path, p)), self.image_size) for p, _ in part])


def open_source(source: str, image_size: int | None, progress: bool) -> tuple[NpzImages | FolderImages, Any]:
    """(the images of IMAGES, its labels (N,) or None)."""
    from ditlab.evaluation.evaluate import reference_path

    if os.path.isdir(source):
        folder = FolderImages(source, image_size or DEFAULT_IMAGE_SIZE)
        return folder, folder.labels
    if image_size is not None:
        raise UserError(f"--image-size {image_size}: only for a folder of images; {source} is a batch file, "
                        "used at its own size")
    path = reference_path(source, progress)
    images = NpzImages(path)
    with np.load(path, allow_pickle=False) as z:
        labels = z["arr_1"] if "arr_1" in z.files and z["arr_1"].shape == (images.num_images,) else None
    return images, labels


def save_ref(out: str, source: str, features: Sequence[str] = ("inception",), image_size: int | None = None,
             inception_path: str | None = None, dinov2_path: str | None = None, batch_size: int = 64,
             device: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Write the reference batch OUT from IMAGES (see the module); returns a JSON-ready summary:
    out, images, image_shape, features, per feature space "stored" (kept from IMAGES), "computed"
    or "cached" (OUT already held it), and the feature spaces' records."""
    from ditlab.data.npz import NpzWriter
    from ditlab.evaluation import fd_dinov2
    from ditlab.evaluation.evaluate import INCEPTION_RECORD, _device, _full_fp32, check_features, inception_weights
    from ditlab.evaluation.inception import load_inception

    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    features = check_features(features)
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise UserError(f"--save-ref {out}: folder {folder} does not exist")
    torch_device = _device(device)
    dinov2 = fd_dinov2.load_network(fd_dinov2.dinov2_weights(dinov2_path, progress), torch_device) \
        if "dinov2" in features else None
    records = {"inception": INCEPTION_RECORD} if "inception" in features else {}
    if dinov2:
        records["dinov2"] = dinov2[1]
    if os.path.exists(out):
        return _cached(out, features, dinov2[1] if dinov2 else None, records)

    images, labels = open_source(source, image_size, progress)
    kept = load_stats(images.path) if "inception" in features and isinstance(images, NpzImages) else None
    inception = load_inception(inception_weights(inception_path, progress), torch_device) \
        if "inception" in features and kept is None else None
    pools, spatials, dinos = [], [], []
    batches = images.batches(batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, total=-(-images.num_images // batch_size), desc=f"{source} -> {out}", unit="batch")
    with NpzWriter(out, (images.num_images, *images.shape)) as writer, _full_fp32(), torch.inference_mode():
        for batch in batches:  # uint8 (B, H, W, 3)
            writer.write(batch)
            if inception is not None:
                pool, spatial = inception(torch.from_numpy(batch).to(torch_device).permute(0, 3, 1, 2))
                pools.append(pool)
                spatials.append(spatial)
            if dinov2 is not None:
                dinos.append(fd_dinov2.dinov2_batch(dinov2[0], batch))
        extra: dict[str, np.ndarray] = {}
        if "inception" in features:
            if kept:
                pool, spatial = kept["pool"], kept["spatial"]
            else:
                pool, spatial = feature_stats(torch.cat(pools)), feature_stats(torch.cat(spatials))
            extra.update(_inception_arrays(pool, spatial))
        if dinov2 is not None:
            feats = torch.cat(dinos)
            extra.update(fd_dinov2.stored_arrays(feats, feature_stats(feats), dinov2[1]))
        writer.close(labels, extra)
    made = {f: "computed" for f in features}
    if kept:
        made["inception"] = "stored"
    return {"out": out, "images": images.num_images, "image_shape": list(images.shape), "features": made,
            "records": records}


def _inception_arrays(pool: FeatureStats, spatial: FeatureStats) -> dict[str, np.ndarray]:
    from ditlab.evaluation.batches import STATS_KEYS

    return {STATS_KEYS["pool"][0]: pool.mu, STATS_KEYS["pool"][1]: pool.sigma,
            STATS_KEYS["spatial"][0]: spatial.mu, STATS_KEYS["spatial"][1]: spatial.sigma}


def _cached(out: str, features: tuple[str, ...], record: dict[str, Any] | None,
            records: dict[str, Any]) -> dict[str, Any]:
    """The summary of an existing OUT that holds every requested feature space; else one line."""
    from ditlab.evaluation import fd_dinov2

    images = NpzImages(out)
    missing = [f for f in features if f == "inception" and load_stats(out) is None
               or f == "dinov2" and (record is None or fd_dinov2.load_stored(out, record) is None)]
    if missing:
        raise UserError(f"--save-ref {out}: exists without the {', '.join(missing)} statistics; it is not "
                        f"overwritten: write another file from it (--save-ref NEW.npz {out})")
    return {"out": out, "images": images.num_images, "image_shape": list(images.shape),
            "features": {f: "cached" for f in features}, "records": records}
