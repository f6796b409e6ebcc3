"""The latent cache: sharded, memory-mappable posteriors of every image and of its mirror image.

Layout of a cache folder:

    index.json            written last: format, image_size, codec, latent_shape, dtype, classes,
                          shards (name and count), skipped files; its presence marks a finished cache
    labels.npy            (num_samples,) int64, the labels of all shards in shard order
    shard-000000.npy      (n, 2, 2, C, h, w) in `dtype`: axis 1 is (mean, std), axis 2 is
                          (the image, its horizontal flip); scaled by the codec's latent scale
    shard-000000.repa.npy (n, 2, S, Dz) in `dtype`, only with `extract-latents --repa-encoder`: the
                          encoder's patch features of the image and of its flip (REPA's targets)
    shard-000000.json     the shard's settings, labels, source paths (relative to the image
                          folder), skipped files, and the size and SHA-256 of its .npy (computed
                          while it was written); written after its .npy, so it marks the shard done

Opening a cache checks every shard's size and checksum (and labels.npy's) against the index and
names the file that differs: a flipped byte or a truncated shard is refused before training starts.
`ditlab extract-latents` on the cache again re-extracts a damaged or missing shard.

Every file is written to a temporary name and renamed, so an interrupted writer leaves no half
file. Mean and std are stored as float16 by default: half the disk and page cache of float32
(ImageNet at 256x256: 42 GB instead of 84), and its rounding error (at most 2**-11 of the value,
under 0.001 for the |z| < 4 of scaled SD latents) is ten times below the smallest noise the
diffusion adds (sqrt(beta_1) = 0.01 at t = 0). float32 is there for exact work; stds below
float16's normal range (6e-5) keep an absolute error under 3e-8.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

import numpy as np
import torch

from ditlab.errors import UserError, UserFileNotFoundError, one_line
from ditlab.runtime.files import atomic_write, atomic_write_text

INDEX_NAME = "index.json"
LABELS_NAME = "labels.npy"
FORMAT = "ditlab-latent-cache"
VERSION = 1
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}
HASH_CHUNK = 1 << 23  # bytes per read when a shard's checksum is verified
REPAIR_HINT = "re-run `ditlab extract-latents` with the same flags to re-extract it"
# Shards whose SHA-256 matched, by (size, mtime): a cache is hashed whole once, not at every start.
VERIFIED_NAME = ".verified.json"


def is_latent_cache(path: str) -> bool:
    """True when `path` is a finished latent cache (its index file exists)."""
    return os.path.isfile(os.path.join(path, INDEX_NAME))


def shard_name(k: int) -> str:
    return f"shard-{k:06d}"


def write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


class _HashingWriter:
    """A write-only file that passes every byte on to `f` and into a SHA-256 as it goes."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def write(self, data: bytes | memoryview) -> int:
        self.sha256.update(data)
        self.bytes += memoryview(data).nbytes
        return self.f.write(data)


def save_hashed(path: str, arr: np.ndarray) -> dict[str, Any]:
    """np.save `arr` to `path` atomically; returns {"bytes", "sha256"} of the file, hashed while
    it was written (np.save streams the array in chunks through the writer)."""
    record: dict[str, Any] = {}

    def write(f: BinaryIO) -> None:
        w = _HashingWriter(f)
        np.save(w, arr)
        record.update(bytes=w.bytes, sha256=w.sha256.hexdigest())

    atomic_write(path, write)
    return record


def file_problem(path: str, record: dict[str, Any]) -> str | None:
    """Why the file at `path` is not the one `record` ({"bytes", "sha256"}) describes (missing,
    truncated, damaged), or None when it is. A record without a checksum checks nothing."""
    if "sha256" not in record:
        return None
    try:
        size = os.path.getsize(path)
    except OSError:
        return f"{path}: missing"
    if size != record["bytes"]:
        return f"{path}: {'truncated' if size < record['bytes'] else 'grown'} ({size} bytes, {record['bytes']} written)"
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            sha.update(chunk)
    if sha.hexdigest() != record["sha256"]:
        return f"{path}: damaged (its SHA-256 differs from the one recorded when it was written)"
    return None


def _npy_header(f: BinaryIO) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) of the .npy file open in `f`."""
    version = np.lib.format.read_magic(f)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f"unsupported .npy version {version}")
    shape, _, dtype = readers[version](f)
    return tuple(shape), dtype, f.tell()


REPA_SUFFIX = ".repa.npy"  # a shard's cached REPA features


def write_shard(root: str, k: int, mean: np.ndarray, std: np.ndarray, meta: dict[str, Any],
                features: np.ndarray | None = None) -> None:  # fmt: skip
    """Write shard k: mean and std (n, 2, C, h, w) already cast to the storage dtype, optionally REPA's
    features (n, 2, S, Dz), and its meta (settings, "labels", "paths", "skipped") with each .npy's size
    and checksum; the .json goes last and marks it done."""
    data = np.stack([mean, std], axis=1)  # (n, 2, 2, C, h, w): (mean, std) x (image, flip)
    base = os.path.join(root, shard_name(k))
    record = save_hashed(base + ".npy", data)
    if features is not None:
        record["repa"] = save_hashed(base + REPA_SUFFIX, features)
    write_json(base + ".json", {**meta, "count": len(data), **record})


def read_shard_meta(root: str, k: int) -> dict[str, Any] | None:
    """The meta of shard k if the shard is done, else None."""
    path = os.path.join(root, shard_name(k) + ".json")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(root, shard_name(k) + ".npy")):
        return None
    with open(path) as f:
        return json.load(f)


def write_index(root: str, settings: dict[str, Any], metas: list[dict[str, Any]]) -> dict[str, Any]:
    """Write labels.npy then index.json for the finished shards `metas` (in shard order)."""
    labels = np.array([y for m in metas for y in m["labels"]], dtype=np.int64)
    labels_record = save_hashed(os.path.join(root, LABELS_NAME), labels)
    index = {
        "format": FORMAT,
        "version": VERSION,
        **settings,
        "num_samples": int(len(labels)),
        "labels_file": labels_record,
        "shards": [{"name": shard_name(k), "count": m["count"], **{key: m[key] for key in ("bytes", "sha256", "repa")
                                                                   if key in m}} for k, m in enumerate(metas)],
        "skipped": [s for m in metas for s in m["skipped"]],
    }
    write_json(os.path.join(root, INDEX_NAME), index)
    return index


def read_index(root: str) -> dict[str, Any]:
    """The index of the cache at `root`; a one-line error if it is missing or not ours."""
    path = os.path.join(root, INDEX_NAME)
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"{root}: not a latent cache (no {INDEX_NAME}; make one with "
                                    "`ditlab extract-latents`)")
    with open(path) as f:
        index = json.load(f)
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise UserError(f"{path}: not a {FORMAT} version {VERSION} index")
    return index


class LatentCacheDataset(torch.utils.data.Dataset):
    """A latent cache read through memory maps (each process opens the shards it touches).

    Item: (mean, std, label) with mean and std float32 (2, C, h, w), index 0 the image and 1 its
    horizontal flip, scaled; label int. Attributes from the index: classes, num_classes,
    latent_shape (C, h, w), image_size, codec, dtype (the storage dtype)."""

    def __init__(self, root: str, verify: bool = True):
        self.root = root
        self.index = read_index(root)
        self.classes: list[str] = self.index["classes"]
        self.num_classes = len(self.classes)
        self.latent_shape: tuple[int, int, int] = tuple(self.index["latent_shape"])
        self.image_size: int = self.index["image_size"]
        self.codec: str = self.index["codec"]
        self.dtype: str = self.index["dtype"]
        counts = np.array([s["count"] for s in self.index["shards"]], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])  # (num_shards + 1,)
        labels_path = os.path.join(root, LABELS_NAME)
        problem = file_problem(labels_path, self.index.get("labels_file", {}))
        if problem:
            raise UserError(f"{problem}; {REPAIR_HINT}")
        self.labels = np.load(labels_path)  # (num_samples,) int64
        if len(self.labels) != self._starts[-1] or self._starts[-1] != self.index["num_samples"]:
            raise UserError(f"{root}: {LABELS_NAME} holds {len(self.labels)} labels, the index "
                             f"{self.index['num_samples']} samples; re-run `ditlab extract-latents`")
        self._check_labels()
        self._check_shards(verify)
        self._shards: dict[int, np.ndarray] = {}
        self._features: dict[int, np.ndarray] = {}
        self.repa_shape: tuple[int, int] | None = None  # (S, Dz) once use_repa_features is called

    def use_repa_features(self, encoder: str) -> tuple[int, int]:
        """Make items carry the cached REPA features of `encoder` (the --repa-encoder the cache was made
        with): checks every shard's features file (shape, size, checksum); returns (S, Dz)."""
        made = self.index.get("repa_encoder")
        if made != encoder:
            raise UserError(f"--repa-encoder {encoder}: the latent cache {self.root} holds "
                            f"{'no REPA features' if made is None else f'the features of {made}'}; make one with "
                            f"`ditlab extract-latents --repa-encoder {encoder}`")
        S, Dz = self.index["repa_shape"]
        for k, shard in enumerate(self.index["shards"]):
            path = self._shard_path(k)[: -len(".npy")] + REPA_SUFFIX
            problem = file_problem(path, shard.get("repa", {}))
            if problem is None:
                with open(path, "rb") as f:
                    shape, dtype, _ = _npy_header(f)
                if shape != (shard["count"], 2, S, Dz) or dtype != STORAGE_DTYPES[self.dtype]:
                    problem = f"{path}: holds {dtype} {shape}, the index says {self.dtype} {(shard['count'], 2, S, Dz)}"
            if problem:
                raise UserError(f"{problem}; {REPAIR_HINT}")
        self.repa_shape = (S, Dz)
        return S, Dz

    def _check_labels(self) -> None:
        """Every label must name one of the cache's classes (0 ... num_classes - 1)."""
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= self.num_classes))
        if len(bad):
            k, row = self.locate(int(bad[0]))
            raise UserError(f"{os.path.join(self.root, LABELS_NAME)}: label {self.labels[bad[0]]} (item {row} of "
                            f"{self.index['shards'][k]['name']}) is out of range for the {self.num_classes} classes "
                            f"of {os.path.join(self.root, INDEX_NAME)}; {len(bad)} such label(s)")

    def _shard_path(self, k: int) -> str:
        return os.path.join(self.root, self.index["shards"][k]["name"] + ".npy")

    def _check_shards(self, verify: bool) -> None:
        """Each shard's .npy header against the index, its size against its header (a truncated
        file), and with `verify` its SHA-256 against the index (threads: hashlib releases the GIL)."""
        for k, shard in enumerate(self.index["shards"]):
            path = self._shard_path(k)
            try:
                with open(path, "rb") as f:
                    shape, dtype, offset = _npy_header(f)
            except (OSError, ValueError) as e:
                raise UserError(f"{path}: cannot read it as a shard ({one_line(e)}); {REPAIR_HINT}") from e
            want = (shard["count"], 2, 2, *self.latent_shape)
            if tuple(shape) != want or dtype != STORAGE_DTYPES[self.dtype]:
                raise UserError(f"{path}: holds {dtype} {tuple(shape)}, the index says {self.dtype} {want}")
            size, need = os.path.getsize(path), offset + int(np.prod(shape)) * dtype.itemsize
            if size < need:
                raise UserError(f"{path}: truncated ({size} of {need} bytes); {REPAIR_HINT}")
        if verify:
            self._verify_checksums()

    def _verify_checksums(self) -> None:
        """SHA-256 of every shard against the index, in threads (hashlib releases the GIL); shards
        already verified unchanged (same size and mtime, same index entry) are skipped, so resuming
        a run on an ImageNet cache does not hash its 40 GB again."""
        stamp_path = os.path.join(self.root, VERIFIED_NAME)
        try:
            with open(stamp_path) as f:
                stamp = json.load(f)
        except (OSError, ValueError):
            stamp = {}

        def key(k: int) -> list:
            st, shard = os.stat(self._shard_path(k)), self.index["shards"][k]
            return [st.st_size, st.st_mtime_ns, shard.get("sha256")]

        todo = [k for k in range(len(self.index["shards"])) if stamp.get(str(k)) != key(k)]
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            problems = list(pool.map(lambda k: file_problem(self._shard_path(k), self.index["shards"][k]), todo))
        problem = next((p for p in problems if p), None)
        if problem:
            raise UserError(f"{problem}; {REPAIR_HINT}")
        if todo:
            try:  # a read-only cache is verified at every start instead
                atomic_write_text(stamp_path, json.dumps({str(k): key(k) for k in range(len(self.index["shards"]))}))
            except OSError:
                pass

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_shards": {}, "_features": {}}  # memory maps are reopened in each worker

    def _shard(self, k: int) -> np.ndarray:
        arr = self._shards.get(k)
        if arr is None:  # the header and size were checked when the cache was opened
            arr = self._shards[k] = np.load(self._shard_path(k), mmap_mode="r")
        return arr

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, row) of item `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a cache of {len(self)}")
        k = int(np.searchsorted(self._starts, index, side="right")) - 1
        return k, index - int(self._starts[k])

    def source(self, index: int) -> str:
        """The source image of item `index`, relative to the image folder it was made from."""
        k, row = self.locate(index)
        with open(os.path.join(self.root, self.index["shards"][k]["name"] + ".json")) as f:
            return json.load(f)["paths"][row]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        """(mean, std, label), and with use_repa_features the features (2, S, Dz) float32 of the image and its flip."""
        k, row = self.locate(index)
        item = torch.from_numpy(self._shard(k)[row].astype(np.float32))  # (2, 2, C, h, w)
        if self.repa_shape is None:
            return item[0], item[1], int(self.labels[index])
        features = self._features.get(k)
        if features is None:
            path = self._shard_path(k)[: -len(".npy")] + REPA_SUFFIX
            features = self._features[k] = np.load(path, mmap_mode="r")
        return item[0], item[1], int(self.labels[index]), torch.from_numpy(features[row].astype(np.float32))


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One training latent per sample: a random flip, then a fresh draw from its posterior.

    mean, std: (N, 2, C, h, w) as the cache gives them (index 1 of axis 1 is the flip), on any
    device; generator: on the same device, the only source of randomness (first N flips, then
    N * C * h * w normals). Returns mean + std * eps, (N, C, h, w), in mean's dtype."""
    return sample_latents_paired(mean, std, None, generator)[0]


def sample_latents_paired(mean: torch.Tensor, std: torch.Tensor, paired: torch.Tensor | None,
                          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sample_latents (the same draws), also picking the same side of `paired` (N, 2, ...), e.g. the cached
    REPA features of the image and of its flip: (latents (N, C, h, w), paired[:, flip] (N, ...) or None)."""
    n = mean.shape[0]
    flip = torch.randint(0, 2, (n,), generator=generator, device=mean.device)  # (N,)
    rows = torch.arange(n, device=mean.device)
    m, s = mean[rows, flip], std[rows, flip]  # (N, C, h, w) each
    eps = torch.randn(m.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return m + s * eps, None if paired is None else paired[rows, flip.to(paired.device)]
