"""Atomic writes, the only way ditlab writes a file: build the new file (or folder) under a
temporary name beside the target, flush it to disk, then rename it into place, so a reader (or a
crash) never sees a half-written one. (ADM's .npz batch, streamed the same way, is `data.npz`'s:
its old names here load it on first use.)"""

from __future__ import annotations

import errno
import os
import shutil
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from ditlab.errors import UserError, UserWriteError, one_line
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
    torch.save wrap the OSError of a full disk in a RuntimeError of their own), else the first
    OSError with any errno, else None."""
    seen: set[int] = set()
    first = None
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            if e.errno in WRITE_ERRORS:
                return e
            first = first or e
        e = e.__cause__ or e.__context__
    return first


def _no_space(folder: Path) -> bool:
    """Whether the file system of `folder` has (almost) no space left for this user."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < LOW_SPACE_BYTES


def write_error(e: BaseException, path: Path) -> UserWriteError | None:
    """A one-line UserWriteError naming `path` when `e` failed a write for a reason of the
    machine (disk full, no permission, read-only, any other errno the system gave, named as it
    is), else None (then `e` is a bug to show). Without an errno, a file system with (almost) no
    space left is taken to be the reason."""
    if isinstance(e, UserWriteError):
        return e
    cause = _os_cause(e)
    code = cause.errno if cause is not None else None
    if code is None and not isinstance(e, ValueError) and _no_space(path.parent if path.parent.is_dir() else Path(".")):
        code = errno.ENOSPC
    if code is None:
        return None
    reason = WRITE_ERRORS.get(code) or os.strerror(code).lower()  # the real errno, e.g. under /proc
    error = UserWriteError(f"{reason} writing {path}")
    error.errno = code
    return error


def check_output_file(path: str | os.PathLike, flag: str, makes_parents: bool = False) -> None:
    """Refuse, before any work, an output file that cannot be written where it is named: an existing
    folder (or anything else but a file) at its name, or (unless the writer `makes_parents`) a parent
    that is no folder."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_file():
        raise UserError(f"{flag} {path}: a folder (or other non-file) is there; give a file name")
    parent = p.absolute().parent
    if not makes_parents and not parent.is_dir():
        missing = "is not a folder" if parent.exists() else "does not exist"
        raise UserError(f"{flag} {path}: folder {parent} {missing}")


@contextmanager
def damaged_file_errors(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn the errors of reading a damaged archive (a failed CRC, a bad zlib stream, a short member)
    into one UserError naming `path` as a damaged `what`; a file in ditlab's download cache is also
    said to be deleted (to be downloaded again)."""
    try:
        yield
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        from ditlab.runtime.home import home

        cached = Path(path).resolve().parent == home().resolve()
        hint = ": delete it (ditlab's download cache) and run again to download it" if cached else ""
        raise UserError(f"{path}: damaged {what} ({one_line(e)}){hint}") from e


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


def _umask() -> int:
    """This process's umask, read without changing it where the system says it (Linux /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give the files under `path` (or `path` itself) the mode a plain open() gives them (0666 less
    the umask): libraries that write their own files (safetensors: 0600) do not decide who reads them."""
    mode = 0o666 & ~_umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if p.is_file() and not p.is_symlink():
            os.chmod(p, mode)


def atomic_replace(dst: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call write(tmp) with a temporary path beside `dst` (it may make a file or a folder there),
    give its files the umask's mode, then rename it onto `dst`. A file replaces a file in one rename
    (never a folder); a new folder moves an existing `dst` aside first and removes it once the folder
    is in place. On failure `dst` is left as it was."""
    dst = Path(dst)
    with user_write_errors(dst):
        dst.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = temp_path(dst), dst.with_name(f".{dst.name}.old-{os.getpid()}")
    try:
        with user_write_errors(dst):
            write(tmp)
            follow_umask(tmp)
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
