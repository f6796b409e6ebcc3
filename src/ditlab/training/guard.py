"""Non-finite training caught without a host sync per step.

Each step hands its `bad` flag (a 0-dim bool tensor on the device: the loss or the gradient norm
is not finite; `TrainStep` has already skipped that step's update) to `NonFiniteGuard.update`,
which keeps three counters on the device: steps skipped in all, the current streak of consecutive
bad steps, and the step at which a streak first reached the limit. The loop reads them only where
it syncs anyway: at log steps and before every checkpoint (`check`), and stops the run with one
line naming the step and the last good checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ditlab.errors import UserError


class TrainingDiverged(UserError):
    """The run made `max_bad_steps` consecutive non-finite steps, or its weights are not finite."""


class NonFiniteGuard:
    """Device-side counters of non-finite steps; `limit` consecutive ones stop the run."""

    def __init__(self, limit: int, device: torch.device):
        self.limit = limit
        self.skipped = torch.zeros((), dtype=torch.long, device=device)  # bad steps in all (this process)
        self.streak = torch.zeros((), dtype=torch.long, device=device)  # consecutive bad steps up to now
        self.tripped = torch.full((), -1, dtype=torch.long, device=device)  # step the streak hit the limit

    def update(self, bad: torch.Tensor, step: int) -> None:
        """Count step `step` (1-based: the step just taken), bad a 0-dim bool tensor."""
        self.skipped += bad
        self.streak = torch.where(bad, self.streak + 1, torch.zeros_like(self.streak))
        hit = (self.streak >= self.limit) & (self.tripped < 0)
        self.tripped = torch.where(hit, torch.full_like(self.tripped, step), self.tripped)

    def read(self) -> tuple[int, int]:
        """(steps skipped so far, step the limit was reached or -1): one host sync."""
        skipped, tripped = torch.stack([self.skipped, self.tripped]).tolist()
        return skipped, tripped

    def check(self, last_good: Path | None) -> int:
        """Raise TrainingDiverged if the limit was reached; else the number of steps skipped so far."""
        skipped, tripped = self.read()
        if tripped >= 0:
            raise TrainingDiverged(
                f"training diverged: {self.limit} consecutive steps up to step {tripped} had a non-finite loss "
                f"or gradient norm (their updates were skipped); last good checkpoint: {last_good or 'none'}; "
                "lower --lr or set --grad-clip")
        return skipped


def weights_finite(*modules: nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of `modules` is finite (one host sync; a
    sharded DTensor is checked shard by shard, which each rank must do)."""
    flags = []
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            if t.is_floating_point():
                local = t.to_local() if hasattr(t, "to_local") else t
                flags.append(torch.isfinite(local.detach()).all())
    return bool(torch.stack(flags).all()) if flags else True
