"""The protocol every training objective implements (the paper's Gaussian diffusion, SiT's flow
matching beside it), and the registry that rebuilds one from the record a checkpoint stores.

Training draws a batch's times with `sample_timesteps` and takes `training_losses`; sampling calls
`generate` with the guidance as one value. `to_record` is the JSON a run stores; a record without
"objective" (every checkpoint written before there was a second one, and the authors' files) is
the paper's Diffusion."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from ditlab.diffusion.flow_matching import FlowMatching
from ditlab.diffusion.gaussian import ModelFn
from ditlab.diffusion.guidance import Guidance
from ditlab.diffusion.process import Diffusion
from ditlab.errors import UserError

Generators = torch.Generator | Sequence[torch.Generator] | None
DEFAULT_OBJECTIVE = "ddpm"  # what a record without "objective" holds


class Process(Protocol):
    """A training objective and its samplers."""

    objective: str
    """Its name in PROCESSES and in the records ("ddpm", "flow")."""
    sampler_names: tuple[str, ...]
    """The samplers `generate` takes; the first is the default."""
    default_steps: int
    """Sampling steps when none are asked for."""

    def sample_timesteps(self, n: int, device: torch.device | str | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """(n,) times of a training batch, drawn from `generator`."""
        ...

    def training_losses(self, model: ModelFn, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                        noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Loss terms of data x (N, C, H, W) at times t (N,): at least "loss" (N,)."""
        ...

    def generate(self, model: ModelFn, noise: torch.Tensor, y: torch.Tensor | None = None, *, steps: int,
                 sampler: str, guidance: Guidance, generator: Generators = None, progress: bool = False,
                 clip_denoised: bool = False) -> torch.Tensor:
        """Data (N, C, H, W) from noise (N, C, H, W) and labels y (N,) (None: unconditional).
        clip_denoised: the data lies in [-1, 1] (pixel space), predictions of it may be clamped."""
        ...

    def to_record(self) -> dict[str, Any]:
        """Its settings as JSON-able values, "objective" among them."""
        ...


PROCESSES: dict[str, Callable[[dict[str, Any]], Process]] = {
    "ddpm": Diffusion.from_record,
    "flow": FlowMatching.from_record,
}
"""objective -> the function that rebuilds its process from a record."""


def process_from_record(record: dict[str, Any] | None) -> Process:
    """The process a record describes (a `to_record` dict, or a run's config): by its "objective";
    None or a record without one is the paper's Diffusion (its "learn_sigma" read where present)."""
    record = dict(record or {})
    objective = str(record.get("objective") or DEFAULT_OBJECTIVE)
    if objective not in PROCESSES:
        raise UserError(f"objective {objective!r}: this ditlab knows {', '.join(PROCESSES)}")
    return PROCESSES[objective](record)
