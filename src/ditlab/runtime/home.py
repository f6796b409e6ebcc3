"""ditlab's cache folder, `$DITLAB_HOME` (default `~/.cache/ditlab`): downloads by name (`ditlab.hub`)
and what is measured once per machine (the CPU bf16 answer, `runtime.bf16_probe`)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The cache folder: $DITLAB_HOME, default ~/.cache/ditlab."""
    return Path(os.environ.get("DITLAB_HOME") or "~/.cache/ditlab").expanduser()
