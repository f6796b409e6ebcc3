"""ADM's .npz batches, the one home of their format: sample batches (`arr_0` uint8 images
(N, H, W, C), `arr_1` labels (N,)) and reference batches (`arr_0` plus statistics, read by
`evaluation.batches`), and ditlab's addition, the protocol record of the settings that made a
sample batch (`protocol`, a 0-d unicode array holding JSON; `sampling.record` builds it).

The writer streams images into the archive as they arrive and the reader streams them out in
batches, so a 50K x 256 x 256 file (10 GB) is never held in memory. One-channel batches
(N, H, W, 1), as `ditlab sample` writes for a grayscale model, are read as RGB with the channel
repeated three times (as torch-fidelity reads grayscale images). Every layout error is one line
naming the file. Both `sampling/` (which writes) and `evaluation/` (which reads) import this
module; neither imports the other."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np

from ditlab.errors import UserError, UserFileNotFoundError
from ditlab.runtime.files import atomic_write, damaged_file_errors, fsync_file, temp_path, user_write_errors

IMAGES_KEY = "arr_0"  # uint8 images (N, H, W, C)
LABELS_KEY = "arr_1"  # int64 labels (N,)
PROTOCOL_KEY = "protocol"  # ditlab's addition: the settings that made the batch, a JSON string (0-d array)
ADM_IMAGES_KEY, ADM_LABELS_KEY = IMAGES_KEY, LABELS_KEY  # the names runtime.files gave them


class NpzWriter:
    """ADM's .npz written as the images arrive, so N of them never sit in memory at once:
    arr_0 (N, H, W, C) uint8 streamed in order, then arr_1 (N,) int64 labels at `close`. The file
    is a temporary one until `close` renames it onto `path`; `abort` (or leaving the `with` block
    without `close`) deletes it. The result is what `np.savez(path, images, labels)` writes."""

    def __init__(self, path: str | Path, shape: tuple[int, int, int, int]):
        self.path, self.shape, self.written = Path(path), tuple(shape), 0
        self.tmp = temp_path(self.path)
        with user_write_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
                self._entry = self._zip.open(IMAGES_KEY + ".npy", "w", force_zip64=True)
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                          "shape": self.shape}  # fmt: skip
                np.lib.format.write_array_header_1_0(self._entry, header)
            except BaseException:
                self.tmp.unlink(missing_ok=True)
                raise

    def write(self, images: np.ndarray) -> None:
        """Append (n, H, W, C) uint8 images."""
        if images.dtype != np.uint8 or images.shape[1:] != self.shape[1:]:
            raise ValueError(f"{self.path}: expected uint8 images (n, {', '.join(map(str, self.shape[1:]))}), "
                             f"got {images.dtype} {images.shape}")
        if self.written + len(images) > self.shape[0]:
            raise ValueError(f"{self.path}: more than the {self.shape[0]} images announced")
        with user_write_errors(self.path):
            self._entry.write(np.ascontiguousarray(images).reshape(-1).data)
        self.written += len(images)

    def close(self, labels: np.ndarray | None, extra: dict[str, np.ndarray] | None = None) -> None:
        """Finish arr_0, add arr_1 = labels (N,) (None: none, as for an unconditional model) and the
        arrays of `extra` under their names (e.g. PROTOCOL_KEY), rename."""
        if self.written != self.shape[0]:
            raise ValueError(f"{self.path}: {self.written} of {self.shape[0]} images written")
        with user_write_errors(self.path):
            self._entry.close()
            if labels is not None:
                with self._zip.open(LABELS_KEY + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(labels, dtype=np.int64))
            for name, array in (extra or {}).items():
                with self._zip.open(name + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)
            self._zip.close()
            fsync_file(self.tmp)
            os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self._entry.close()
            self._zip.close()
        except (OSError, ValueError):  # e.g. the disk is full: drop the archive's file without finishing it
            fp, self._zip.fp = self._zip.fp, None
            try:
                if fp is not None:
                    fp.close()
            except OSError:
                pass
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tmp.exists():
            self.abort()


def npz_members(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except zipfile.BadZipFile as e:
        raise UserError(f"{path}: not an .npz archive") from e


class NpzImages:
    """The `arr_0` images of an ADM .npz, read in order without loading the whole array.

    `num_images`, `shape` (H, W, 3); iterate with `batches(batch_size)` -> uint8 (B, H, W, 3).
    A one-channel file (N, H, W, 1) is read with its channel repeated to RGB (`channels` is 1)."""

    def __init__(self, path: str):
        self.path = path
        if IMAGES_KEY + ".npy" not in npz_members(path):
            raise UserError(f"{path}: no {IMAGES_KEY} (ADM batches hold uint8 images (N, H, W, 3) in {IMAGES_KEY})")
        with damaged_file_errors(path, ".npz batch"), zipfile.ZipFile(path) as z, z.open(IMAGES_KEY + ".npy") as f:
            shape, fortran, dtype = self._read_header(cast(zipfile.ZipExtFile, f))
        if dtype != np.uint8:
            raise UserError(f"{path}: {IMAGES_KEY} is {dtype}, expected uint8 images in [0, 255]")
        if len(shape) != 4 or shape[3] not in (1, 3) or shape[0] == 0:
            raise UserError(f"{path}: {IMAGES_KEY} has shape {shape}, expected uint8 (N, H, W, 3) or (N, H, W, 1) "
                            "with N >= 1")
        if fortran:
            raise UserError(f"{path}: {IMAGES_KEY} is stored in Fortran order; save it C-contiguous")
        self.num_images, self.channels = shape[0], shape[3]
        self.shape = (shape[1], shape[2], 3)

    def _read_header(self, f: zipfile.ZipExtFile) -> tuple[tuple[int, ...], bool, np.dtype]:
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        try:
            version = np.lib.format.read_magic(f)
            if version not in readers:
                raise UserError(f"unsupported .npy format version {version}")
            return readers[version](f)
        except ValueError as e:
            raise UserError(f"{self.path}: {IMAGES_KEY} is not a readable .npy array ({e})") from e

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 batches (B, H, W, 3) in file order; the last one may be shorter."""
        stored = (*self.shape[:2], self.channels)  # (H, W, C) as in the file
        per_image = int(np.prod(stored))
        with damaged_file_errors(self.path, ".npz batch"), zipfile.ZipFile(self.path) as z, \
                z.open(IMAGES_KEY + ".npy") as entry:
            f = cast(zipfile.ZipExtFile, entry)  # what ZipFile.open gives for reading: it has readinto
            self._read_header(f)
            for start in range(0, self.num_images, batch_size):
                count = min(batch_size, self.num_images - start)
                batch = np.empty((count, *stored), dtype=np.uint8)  # (B, H, W, C)
                view = memoryview(batch).cast("B")  # type: ignore[arg-type]  # numpy's stubs: a buffer from 3.12
                if f.readinto(view) != count * per_image:
                    raise UserError(f"{self.path}: {IMAGES_KEY} is truncated after {start} images")
                yield batch if self.channels == 3 else np.repeat(batch, 3, axis=3)  # (B, H, W, 3)


def check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise UserError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    return np.ascontiguousarray(images)


def save_samples(path: str, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Write a sample batch in ADM's layout: `arr_0` images uint8 (N, H, W, 3), `arr_1` labels (N,)."""
    arrays: dict[str, Any] = {IMAGES_KEY: check_images(images)}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (arrays[IMAGES_KEY].shape[0],):
            raise UserError(f"labels must be (N,) with N = {arrays[IMAGES_KEY].shape[0]}, got {labels.shape}")
        arrays[LABELS_KEY] = labels
    atomic_write(path, lambda f: np.savez(f, **arrays))


def record_array(record: Mapping[str, Any]) -> np.ndarray:
    """The record as the .npz stores it: a 0-d unicode array holding its JSON (np.load reads it
    without pickles)."""
    return np.array(json.dumps(record, sort_keys=True))


def read_record(npz_path: str | Path) -> dict[str, Any] | None:
    """The record a sample .npz holds (None for a batch without one, e.g. ADM's reference batches)."""
    with zipfile.ZipFile(npz_path) as z:
        if PROTOCOL_KEY + ".npy" not in z.namelist():
            return None
        with z.open(PROTOCOL_KEY + ".npy") as f:
            return json.loads(str(np.lib.format.read_array(f, allow_pickle=False)))


def read_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """A whole (small) sample batch: its images (N, H, W, C) uint8 as stored and labels (N,) (None
    without)."""
    with np.load(path) as f:
        return f[IMAGES_KEY], (f[LABELS_KEY] if LABELS_KEY in f.files else None)
