"""Atomic writes, the only way ditlab writes a file: build the new file (or folder) under a
temporary name beside the target, flush it to disk, then rename it into place, so a reader (or a
crash) never sees a half-written one. (ADM's .npz batch, streamed the same way, is `data.npz`'s:
its old names here load it on first use.)"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from ditlab.errors import UserWriteError
from ditlab.lazy import lazy_exports

# the names of ADM's .npz batch that lived here, now in data.npz (a string: runtime imports no data module)
__getattr__, _ = lazy_exports("ditlab.runtime.files", {"ditlab.data.npz": "ADM_IMAGES_KEY ADM_LABELS_KEY PROTOCOL_KEY "
                                                                          "NpzWriter"})

# errno -> how a failed write is told to the user (a full disk, a folder not writable)
WRITE_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.EFBIG: "file too large for this file system or limit",
}
LOW_SPACE_BYTES = 1 << 20  # a write that failed with less free space than this failed for lack of it


def _os_cause(e: BaseException) -> OSError | None:
    """The first OSError with a user-side errno in the exception chain of `e` (libraries such as
    torch.save wrap the OSError of a full disk in a RuntimeError of their own)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in WRITE_ERRORS:
            return e
        e = e.__cause__ or e.__context__
    return None


def _no_space(folder: Path) -> bool:
    """Whether the file system of `folder` has (almost) no space left for this user."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < LOW_SPACE_BYTES


def write_error(e: BaseException, path: Path) -> UserWriteError | None:
    """A one-line UserWriteError naming `path` when `e` failed a write for a reason of the
    machine (disk full, no permission, read-only), else None (then `e` is a bug to show)."""
    if isinstance(e, UserWriteError):
        return e
    cause = _os_cause(e)
    code = cause.errno if cause is not None else None
    if code is None and not isinstance(e, ValueError) and _no_space(path.parent if path.parent.is_dir() else Path(".")):
        code = errno.ENOSPC
    if code is None:
        return None
    error = UserWriteError(f"{WRITE_ERRORS[code]} writing {path}")
    error.errno = code
    return error


@contextmanager
def user_write_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a write of `path` that fails for a full disk, a missing permission or a read-only
    file system into one UserWriteError naming `path` (chained to the original error)."""
    try:
        yield
    except Exception as e:
        mapped = write_error(e, Path(path))
        if mapped is None or mapped is e:
            raise
        raise mapped from e


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def temp_path(dst: Path) -> Path:
    """Where a write of `dst` is built: a hidden name beside it, unique to this process."""
    return dst.with_name(f".{dst.name}.tmp-{os.getpid()}")


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_replace(dst: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call write(tmp) with a temporary path beside `dst` (it may make a file or a folder there),
    then rename it onto `dst`. A file replaces a file in one rename (never a folder); a new folder
    moves an existing `dst` aside first and removes it once the folder is in place. On failure `dst`
    is left as it was."""
    dst = Path(dst)
    with user_write_errors(dst):
        dst.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = temp_path(dst), dst.with_name(f".{dst.name}.old-{os.getpid()}")
    try:
        with user_write_errors(dst):
            write(tmp)
        if tmp.is_dir() and (dst.exists() or dst.is_symlink()):  # a folder cannot be renamed over dst
            os.replace(dst, old)
            try:
                os.replace(tmp, dst)
            except BaseException:
                os.replace(old, dst)
                raise
            _remove(old)
        else:
            os.replace(tmp, dst)
    finally:
        _remove(tmp)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call write(f) on a binary file that is flushed to disk and then renamed onto `path`."""

    def to_file(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())

    atomic_replace(path, to_file)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))
