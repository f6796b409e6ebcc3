"""Where a run's metrics go besides metrics.jsonl: TensorBoard (when installed) and Weights & Biases
(`--wandb PROJECT`). `MetricsLog` hands every logged row and every EMA sample grid to each sink, so
all of them see the same numbers at the same steps. Rank 0 only.

A W&B run's id is kept in the results folder (wandb-run-id), so a resumed run logs into the run it
continues; `WANDB_MODE=offline` writes it under results/wandb without touching the network."""

from __future__ import annotations

import importlib.util
import netrc
import os
import secrets
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from ditlab.errors import UserError
from ditlab.runtime.files import atomic_write_text
from ditlab.training.config import TrainConfig

WANDB_ID_FILE = "wandb-run-id"
WANDB_LOCAL_MODES = ("offline", "disabled", "dryrun")  # WANDB_MODE values that need no account
WANDB_HOST = "https://api.wandb.ai"  # WANDB_BASE_URL's default


class Sink(Protocol):
    def scalars(self, row: dict[str, float], step: int) -> None: ...
    def image(self, tag: str, path: Path, step: int) -> None: ...
    def close(self) -> None: ...


def tag(key: str) -> str:
    """A metric's name in the sinks: train/NAME, or the key itself when it names its group (eval/fid)."""
    return key if "/" in key else f"train/{key}"


def check_sinks(cfg: TrainConfig) -> None:
    """Refuse a requested sink whose package is missing (call on every rank, before training)."""
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise UserError(f"--wandb {cfg.wandb}: the wandb package is not installed (pip install 'ditlab[wandb]')")
    if cfg.wandb and not _wandb_can_log():
        raise UserError(f"--wandb {cfg.wandb}: no W&B API key (set WANDB_API_KEY, run `wandb login`, or set "
                        "WANDB_MODE=offline to log without an account)")


def _wandb_can_log() -> bool:
    """Whether W&B has what it needs to start a run: a local mode, or an API key (the environment's, or
    the one `wandb login` keeps in ~/.netrc for its host)."""
    if os.environ.get("WANDB_MODE", "").strip().lower() in WANDB_LOCAL_MODES or os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or WANDB_HOST).hostname or ""
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class TensorBoardSink:
    """Scalars as train/NAME (online evaluation's as eval/NAME), sample grids as images, in results/tensorboard."""

    def __init__(self, results: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(results / "tensorboard"))

    def scalars(self, row: dict[str, float], step: int) -> None:
        for k, v in row.items():
            self.writer.add_scalar(tag(k), v, step)

    def image(self, tag: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        grid = np.asarray(Image.open(path).convert("RGB"))  # (H, W, 3) uint8
        self.writer.add_image(tag, grid, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Scalars as train/NAME (online evaluation's as eval/NAME) and sample grids as wandb.Image, in one
    W&B run per results folder."""

    def __init__(self, results: Path, project: str, config: dict[str, Any]):
        import wandb

        self.wandb = wandb
        id_path = results / WANDB_ID_FILE
        run_id = id_path.read_text().strip() if id_path.is_file() else secrets.token_hex(8)  # a name, not a draw
        if not id_path.is_file():
            atomic_write_text(id_path, run_id + "\n")
        try:
            self.run = wandb.init(project=project, id=run_id, resume="allow", dir=str(results), config=config,
                                  name=results.resolve().name, reinit="create_new")
        except wandb.errors.Error as e:  # a key W&B refuses, an unknown project, no network
            raise UserError(f"--wandb {project}: {e}") from e

    def scalars(self, row: dict[str, float], step: int) -> None:
        self.run.log({tag(k): v for k, v in row.items()}, step=step)

    def image(self, tag: str, path: Path, step: int) -> None:
        self.run.log({tag: self.wandb.Image(str(path), caption=f"EMA samples, step {step}")}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_sinks(results: Path, cfg: TrainConfig) -> list[Sink]:
    """The sinks of a run: TensorBoard if its package is installed, W&B if --wandb names a project."""
    sinks: list[Sink] = []
    if importlib.util.find_spec("tensorboard") is not None:
        sinks.append(TensorBoardSink(results))
    if cfg.wandb:
        sinks.append(WandbSink(results, cfg.wandb, cfg.to_dict()))
    return sinks
