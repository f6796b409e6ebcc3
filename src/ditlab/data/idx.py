"""The IDX format of MNIST and Fashion-MNIST (LeCun et al.): a big-endian header, then the array.

Header: two zero bytes, a type byte (0x08 unsigned byte, ... 0x0E double), the number of
dimensions, then each dimension as a big-endian uint32. The file is exactly the header plus
prod(dims) items; it may be gzipped (recognised by its magic bytes, not its name). Every check
failure is one line naming the file; a file is read whole, so nothing is kept from a bad one."""

from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ditlab.errors import UserError

GZIP_MAGIC = b"\x1f\x8b"
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
HEADER_BYTES = 4  # two zero bytes, the type byte, the number of dimensions
DIM_BYTES = 4


@dataclass(frozen=True)
class IdxArray:
    """One IDX file read and checked: its array and the SHA-256 of its uncompressed bytes."""

    array: np.ndarray
    sha256: str


def read_raw(path: str | Path) -> bytes:
    """The file's bytes, gunzipped when it starts with gzip's magic; a corrupt or truncated gzip
    stream is a one-line UserError naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from e
    if not data.startswith(GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: not a valid gzip file ({e}); replace it") from e


def parse_idx(data: bytes, where: str) -> np.ndarray:
    """The array held by IDX bytes, native byte order; `where` names the source in errors."""
    if len(data) < HEADER_BYTES or data[:2] != b"\x00\x00" or data[2] not in IDX_TYPES:
        raise UserError(f"{where}: not an IDX file (magic {data[:4].hex() or 'missing'}; expected 0000 then a "
                        "type byte 08-0e and the number of dimensions)")
    dtype, ndim = np.dtype(IDX_TYPES[data[2]]), data[3]
    body = HEADER_BYTES + DIM_BYTES * ndim
    if ndim == 0 or len(data) < body:
        raise UserError(f"{where}: IDX header with {ndim} dimensions is cut short ({len(data)} bytes)")
    dims = tuple(int.from_bytes(data[HEADER_BYTES + DIM_BYTES * i: HEADER_BYTES + DIM_BYTES * (i + 1)], "big")
                 for i in range(ndim))
    expected = body + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise UserError(f"{where}: IDX file {what}: dimensions {'x'.join(map(str, dims))} need {expected} bytes, "
                        f"it has {len(data)}")
    return np.frombuffer(data, dtype=dtype, offset=body).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> IdxArray:
    """Read and check one IDX file (gzipped or not)."""
    raw = read_raw(path)
    return IdxArray(parse_idx(raw, str(path)), hashlib.sha256(raw).hexdigest())


def read_shape(path: str | Path) -> tuple[int, ...]:
    """The dimensions an IDX file's header announces (its body unread and unchecked)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        with (gzip.open(path, "rb") if head == GZIP_MAGIC else open(path, "rb")) as f:
            data = f.read(HEADER_BYTES + DIM_BYTES * 255)
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: cannot read its IDX header ({e})") from e
    if len(data) < HEADER_BYTES or data[:2] != b"\x00\x00" or data[2] not in IDX_TYPES:
        raise UserError(f"{path}: not an IDX file (magic {data[:4].hex() or 'missing'})")
    ndim = data[3]
    if len(data) < HEADER_BYTES + DIM_BYTES * ndim:
        raise UserError(f"{path}: IDX header with {ndim} dimensions is cut short")
    return tuple(int.from_bytes(data[HEADER_BYTES + DIM_BYTES * i: HEADER_BYTES + DIM_BYTES * (i + 1)], "big")
                 for i in range(ndim))


def idx_bytes(array: np.ndarray) -> bytes:
    """`array` in the IDX format (uint8 arrays as type 0x08): the writer the tests use."""
    codes = {np.dtype(v).newbyteorder("="): k for k, v in IDX_TYPES.items()}
    code = codes[array.dtype.newbyteorder("=")]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(DIM_BYTES, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=IDX_TYPES[code]).tobytes()


def check_idx_file(path: Path) -> None:
    """It reads as an IDX file: magic, dimensions and length. (`ditlab.hub` checks a download of one of
    Fashion-MNIST's files with it.)"""
    read_idx(path)
