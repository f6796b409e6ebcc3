"""Atomic writes: build the new file (or folder) under a temporary name beside the target, then
rename it into place, so a reader (or a crash) never sees a half-written one."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_replace(dst: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call write(tmp) with a temporary path beside `dst` (it may make a file or a folder there),
    then rename it onto `dst`. A file replaces a file in one rename (never a folder); a new folder
    moves an existing `dst` aside first and removes it once the folder is in place. On failure `dst`
    is left as it was."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    try:
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
