"""`ditlab extract-latents`: encode an image folder once into a latent cache (see latents.py).

Shard k holds the files k * shard_size ... (k + 1) * shard_size - 1 of the sorted folder. Rank 0
lists the shards that are not done yet and ranks take every world_size-th of them, so a resumed
run (on any number of ranks) encodes only what is missing. Each image is encoded with its
horizontal flip in one batch; a shard is written when its last image is encoded.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from ditlab.data.codecs import load_codec
from ditlab.data.config import ExtractConfig
from ditlab.data.images import ImageFolderDataset
from ditlab.data.latents import (
    STORAGE_DTYPES,
    file_problem,
    read_shard_meta,
    shard_name,
    write_index,
    write_shard,
)
from ditlab.errors import UserError
from ditlab.runtime.distributed import barrier, broadcast_object, distributed_session
from ditlab.runtime.lock import owned_folder
from ditlab.runtime.precision import vae_dtype

BARRIER_TIMEOUT = timedelta(hours=6)  # ranks may finish their shards far apart after a resume
SHARD_SETTINGS = ("image_size", "codec", "dtype", "latent_shape", "shard_size", "repa_encoder")  # in every shard


class _Files(torch.utils.data.Dataset):
    """Items (image, index, error) of some files of an image folder; a file that cannot be read
    gives a zero image and its one-line error instead of raising in a loader worker."""

    def __init__(self, images: ImageFolderDataset, indices: list[int]):
        self.images, self.indices = images, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        j = self.indices[i]
        try:
            return self.images[j][0], j, ""
        except ValueError as e:
            size = self.images.image_size
            return torch.zeros(3, size, size), j, str(e)


def _check_done(meta: dict[str, Any], settings: dict[str, Any], files: list[str], name: str, out: str) -> None:
    made = {k: meta.get(k) for k in SHARD_SETTINGS}
    want = {k: settings[k] for k in made}
    if made != want:
        diff = ", ".join(f"{k} {made[k]} (now {want[k]})" for k in made if made[k] != want[k])
        raise UserError(f"{out}/{name}.json was made with other settings: {diff}; use a new --out or the same flags")
    if sorted(meta["paths"] + [s["path"] for s in meta["skipped"]]) != sorted(files):
        raise UserError(f"{out}/{name}.json was made from other files (the image folder or --shard-size "
                         "changed); use a new --out")


def _pending(out: str, settings: dict[str, Any], shard_files: Callable[[int], list[str]], num_shards: int,
             rank: int, log: Callable[[str], None]) -> list[int]:
    """Shards not done yet, or done but since damaged (their size or checksum differs from the
    one recorded when written), listed by rank 0 and broadcast (every rank splits the same list)."""
    msg: list[Any] = [None, None]
    if rank == 0:
        try:
            todo = []
            for k in range(num_shards):
                meta = read_shard_meta(out, k)
                if meta is None:
                    todo.append(k)
                    continue
                _check_done(meta, settings, shard_files(k), shard_name(k), out)
                problem = file_problem(os.path.join(out, shard_name(k) + ".npy"), meta)
                if problem:
                    log(f"warning: {problem}; re-extracting it")
                    todo.append(k)
            msg = [todo, None]
        except ValueError as e:
            msg = [None, str(e)]
    todo, error = broadcast_object(msg)
    if error is not None:
        raise UserError(error)
    return todo


def _to_storage(x: torch.Tensor, dtype: str, paths: list[str], what: str) -> np.ndarray:
    """(B, 2, C, h, w) float32 -> numpy in the storage dtype; a non-finite value names its file."""
    computed = x.numpy()
    stored = computed.astype(STORAGE_DTYPES[dtype])
    for arr, hint in ((computed, "--precision fp32"), (stored, "--dtype float32")):
        bad = ~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)  # (B,)
        if bad.any():
            raise UserError(f"non-finite latent {what} for {paths[int(np.argmax(bad))]}; try {hint}")
    return stored


def extract_latents(data: str, out: str, *, log: Callable[[str], None] = print, **options: Any) -> dict[str, Any]:
    """Encode every image of the folder `data` into the latent cache `out` (resuming into it);
    options are ExtractConfig's fields.

    Returns a summary: "num_samples", "encoded" (images encoded by this rank in this run),
    "seconds", "images_per_s" (this rank), "skipped" (all skipped files of the cache, on rank 0)."""
    return run_extract(ExtractConfig(data=data, out=out, **options), log)


def run_extract(cfg: ExtractConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """`ditlab extract-latents` with the settings `cfg` (see extract_latents). --out has one owner for
    the run (`runtime.lock.owned_folder`: a second extraction into it is refused)."""
    with distributed_session(timeout=BARRIER_TIMEOUT) as info, owned_folder(cfg.out, "--out", info.rank == 0):
        rank, world, device = info.rank, info.world_size, info.device
        images = ImageFolderDataset(cfg.data, cfg.image_size)
        codec = load_codec(cfg.vae, device=device, dtype=vae_dtype(cfg.precision, device))
        if cfg.image_size % codec.downsample:
            raise UserError(f"--image-size {cfg.image_size} is not a multiple of {codec.downsample}, the "
                            f"downsampling factor of --vae {cfg.vae}")
        h = cfg.image_size // codec.downsample
        vae = os.path.expanduser(cfg.vae)
        encoder = None
        if cfg.repa_encoder is not None:
            from ditlab.models.repa_encoder import load_repa_encoder

            encoder = load_repa_encoder(cfg.repa_encoder, device)
        settings = {"image_size": cfg.image_size, "codec": os.path.abspath(vae) if os.path.isdir(vae) else cfg.vae,
                    "dtype": cfg.dtype, "latent_shape": [codec.latent_channels, h, h], "shard_size": cfg.shard_size,
                    "classes": images.classes, "data_root": os.path.abspath(cfg.data),
                    "repa_encoder": os.path.abspath(cfg.repa_encoder) if cfg.repa_encoder and
                    os.path.isfile(cfg.repa_encoder) else cfg.repa_encoder,
                    "repa_shape": list(encoder.feature_shape(3, cfg.image_size, device)) if encoder else None}
        os.makedirs(cfg.out, exist_ok=True)
        num_shards = math.ceil(len(images) / cfg.shard_size)

        def shard_files(k: int) -> list[str]:
            return [p for p, _ in images.samples[k * cfg.shard_size:(k + 1) * cfg.shard_size]]

        mine = _pending(cfg.out, settings, shard_files, num_shards, rank, log)[rank::world]
        workers = min(8, (os.cpu_count() or 1) // world) if cfg.num_workers is None else cfg.num_workers
        start = time.perf_counter()
        desc = f"rank {rank}/{world}" if world > 1 else "extract"
        encoded = _encode_shards(images, (codec, encoder), device, mine, settings, cfg, workers, desc, rank == 0)
        seconds = time.perf_counter() - start
        barrier()
        summary = {"num_samples": len(images), "encoded": encoded, "seconds": seconds,
                   "images_per_s": encoded / seconds if encoded else 0.0, "skipped": []}
        if rank == 0:
            _finish(cfg.out, settings, num_shards, len(images), summary, world, log)
        return summary


def _finish(out: str, settings: dict[str, Any], num_shards: int, n: int, summary: dict[str, Any], world: int,
            log: Callable[[str], None]) -> None:
    """Rank 0: check every shard is there, write the index, report."""
    metas = [read_shard_meta(out, k) for k in range(num_shards)]
    missing = [shard_name(k) for k, m in enumerate(metas) if m is None]
    if missing:
        raise UserError(f"{out}: shards {', '.join(missing[:3])} are missing after all ranks finished")
    index = write_index(out, settings, metas)
    summary.update(num_samples=index["num_samples"], skipped=index["skipped"])
    where = " on rank 0" if world > 1 else ""
    log(f"{out}: {index['num_samples']} latents {tuple(settings['latent_shape'])} of {n} images in "
        f"{num_shards} shards; this run encoded {summary['encoded']}{where} in {summary['seconds']:.1f} s "
        f"({summary['images_per_s']:.1f} images/s)")
    if index["skipped"]:
        log(f"skipped {len(index['skipped'])} unreadable file(s):")
        for s in index["skipped"]:
            log(f"  {s['path']}: {s['error']}")


def _pairs(x: torch.Tensor) -> torch.Tensor:
    """(2B, ...) the B images then their B flips -> (B, 2, ...) on the CPU."""
    b = len(x) // 2
    return x.view(2, b, *x.shape[1:]).transpose(0, 1).reshape(b, 2, *x.shape[1:]).cpu()


def _encode_pairs(codec, encoder: torch.nn.Module | None, device: torch.device, image: torch.Tensor, dtype: str,
                  paths: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:  # fmt: skip
    """Images (B, 3, H, W) and their flips in one VAE call -> storage mean, std, each (B, 2, C, h, w), and
    with a REPA encoder its features (B, 2, S, Dz) of the same images and flips (None without)."""
    x = image.to(device, non_blocking=True)  # (B, 3, H, W)
    both = torch.cat([x, x.flip(-1)])  # (2B, 3, H, W): images, then flips
    mean, std = codec.encode(both)  # (2B, C, h, w)
    stored = _to_storage(_pairs(mean), dtype, paths, "mean"), _to_storage(_pairs(std), dtype, paths, "std")
    features = None if encoder is None else _to_storage(_pairs(encoder(both)), dtype, paths, "REPA features")
    return (*stored, features)


def _encode_shards(images: ImageFolderDataset, networks: tuple[Any, torch.nn.Module | None], device: torch.device,
                   shards: list[int],
                   settings: dict[str, Any], cfg: ExtractConfig, workers: int, desc: str, main: bool) -> int:
    """Encode the files of `shards` (in order) with the VAE and the REPA encoder (None: none) of `networks`
    and write each shard when complete; returns the number of images encoded."""
    from tqdm import tqdm

    size = settings["shard_size"]
    files = [j for k in shards for j in range(k * size, min((k + 1) * size, len(images)))]
    loader = torch.utils.data.DataLoader(_Files(images, files), batch_size=cfg.batch_size, num_workers=workers,
                                         pin_memory=torch.cuda.is_available())
    common = {k: settings[k] for k in (*SHARD_SETTINGS, "repa_shape")}
    shard: dict[str, list] = {"mean": [], "std": [], "features": [], "labels": [], "paths": [], "skipped": []}
    encoded = 0
    with tqdm(total=len(files), unit="img", desc=desc, disable=not (cfg.progress and main), smoothing=0.05) as bar:
        for image, index, error in loader:
            index = index.tolist()
            paths = [images.samples[j][0] for j in index]
            ok = [i for i, e in enumerate(error) if not e]
            if ok:
                mean, std, features = _encode_pairs(*networks, device, image[ok], settings["dtype"],
                                                    [paths[i] for i in ok])
                encoded += len(ok)
            row = 0
            for i, j in enumerate(index):
                k = j // size
                if error[i] and not cfg.skip_bad_files:
                    raise UserError(f"{error[i]}; {shard_name(k)} not written (finished shards are kept): "
                                    "fix or remove the file, or pass --skip-bad-files")
                if error[i]:
                    shard["skipped"].append({"path": paths[i], "error": error[i]})
                else:
                    for key, value in (("mean", mean[row]), ("std", std[row]), ("labels", images.samples[j][1]),
                                       ("paths", paths[i])):
                        shard[key].append(value)
                    if features is not None:
                        shard["features"].append(features[row])
                    row += 1
                if j == min((k + 1) * size, len(images)) - 1:  # the shard's last file
                    _flush(cfg.out, k, shard, common)
                    shard = {key: [] for key in shard}
            bar.update(len(index))
    return encoded


def _flush(out: str, k: int, shard: dict[str, list], common: dict[str, Any]) -> None:
    c, h, w = common["latent_shape"]
    empty = np.zeros((0, 2, c, h, w), dtype=STORAGE_DTYPES[common["dtype"]])  # a shard of only skipped files
    mean = np.stack(shard["mean"]) if shard["mean"] else empty  # (n, 2, C, h, w)
    std = np.stack(shard["std"]) if shard["std"] else empty  # (n, 2, C, h, w)
    meta = {**common, "labels": shard["labels"], "paths": shard["paths"], "skipped": shard["skipped"]}
    features = None
    if common["repa_encoder"] is not None:
        s, dz = common["repa_shape"]
        features = np.stack(shard["features"]) if shard["features"] else np.zeros((0, 2, s, dz), mean.dtype)
    write_shard(out, k, mean, std, meta, features)

