"""Leftovers of interrupted writes: the temporary files `runtime.files` builds beside a target
(".NAME.tmp-PID") that a killed process (SIGKILL, power loss) could not remove. The next start of
the same command removes them from the folders it writes to."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

TEMP_PATTERN = re.compile(r"^\..+\.tmp-(\d+)$")  # runtime.files.temp_path


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files (or folders) of interrupted writes in `folder`; returns them.
    Those of a live process are kept, also in a folder the caller holds the lock of: another
    command (`ditlab sample --out RESULTS/...`) may be writing there."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for name in os.listdir(folder):
        m = TEMP_PATTERN.match(name)
        if not m or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
