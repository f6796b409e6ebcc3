"""One owner per folder: an exclusive OS lock (flock) on a file in it, held for as long as a command
works there and released by the kernel when its process ends, however it ends. So a second
`ditlab train` on the same --results (or `extract-latents` on the same --out) is refused in one
line naming the holder's PID, and a folder whose owner crashed is free again at once (a stale lock
file never blocks a resume: the file stays, its lock does not)."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ditlab.errors import UserError

LOCK_NAME = ".ditlab.lock"


class FolderInUseError(UserError):
    """Another process holds the folder's lock."""


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"


def acquire(folder: str | os.PathLike, flag: str) -> int:
    """Lock `folder` (made if missing) for this process; returns the lock's file descriptor. `flag`
    names the folder's option in errors ("--results"). Raises FolderInUseError if another holds it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise UserError(f"{flag} {folder}: cannot use the folder ({e.strerror or e})") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _holder(fd)
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise FolderInUseError(f"{flag} {folder} is in use by another ditlab process (PID {holder}); "
                                   "wait for it to finish or use another folder") from e
        raise UserError(f"{flag} {folder}: cannot lock {LOCK_NAME} ({e.strerror or e})") from e
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # who holds it, for the message above (not data)
    return fd


def release(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextmanager
def owned_folder(folder: str | os.PathLike, flag: str, is_main: bool = True,
                 temps_in: tuple[str, ...] = ("",)) -> Iterator[None]:  # fmt: skip
    """Hold `folder`'s lock for the `with` block: rank 0 (`is_main`) takes it, and every rank of a
    torchrun job fails with its one line if it cannot. As the folder's one owner it first removes
    the temporary files that interrupted writes left in `temps_in` (subfolders, "" the folder).
    A folder this call made is removed again if the block fails with nothing in it but the lock
    (a refused command writes nothing)."""
    from ditlab.runtime.distributed import broadcast_object
    from ditlab.runtime.temps import remove_stale_temps

    fd, error, made = None, None, is_main and not Path(folder).exists()
    if is_main:
        try:
            fd = acquire(folder, flag)
            for sub in temps_in:
                remove_stale_temps(Path(folder) / sub)
        except UserError as e:
            error = e
    message = broadcast_object(None if error is None else str(error))
    try:
        if error is not None:
            raise error
        if message is not None:
            raise UserError(message)
        yield
    except BaseException:
        if made and fd is not None and _only_the_lock(Path(folder)):
            release(fd)
            fd = None
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        if fd is not None:
            release(fd)


def _only_the_lock(folder: Path) -> bool:
    """Whether `folder` holds nothing but its lock file (and empty folders)."""
    return all(p.name == LOCK_NAME or (p.is_dir() and not any(p.iterdir())) for p in folder.rglob("*"))
