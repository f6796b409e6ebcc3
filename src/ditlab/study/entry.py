"""One entry of a study: a training run and its place in the grid (`study.spec` makes them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditlab.training.config import TrainConfig


@dataclass(frozen=True)
class Entry:
    """One training run of the study and its place in the grid."""

    name: str
    size: str
    patch_size: int
    block: str
    seed: int
    model: dict[str, int]
    """depth, hidden_size, num_heads of its size."""
    train: dict[str, Any]
    """The shared `ditlab train` settings (everything of TrainConfig but results and max_steps), its
    objective and that one's settings among them."""
    options: dict[str, str] = field(default_factory=dict)
    """The modern block options this entry sets (norm, qk_norm, mlp, pos); absent ones are the paper's."""
    eval_steps: tuple[int, ...] = ()
    """Its own evaluation points where they differ from the study's (an ablation at equal compute)."""
    grid_name: str = ""
    """Its name from the grid, before an ablation renames it."""

    @property
    def objective(self) -> str:
        return str(self.train.get("objective", "ddpm"))

    def train_config(self, results: Path, max_steps: int, progress: bool) -> TrainConfig:
        own: dict[str, Any] = {**self.model, **self.options}  # its size (depth, width, heads) and block options
        return TrainConfig(**self.train, results=str(results), max_steps=max_steps, progress=progress,
                           model="DiT-S/2", patch_size=self.patch_size, block=self.block, seed=self.seed,
                           **own)  # fmt: skip


def setting_tag(key: str, value: Any) -> str:
    """How a setting reads in an entry's name: a string as itself (`logit-normal`), a number after its
    key (`time-scale0.5`, `depth2`)."""
    return str(value) if isinstance(value, str) else f"{key.replace('_', '-')}{value:g}"
