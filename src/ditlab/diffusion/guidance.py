"""Guidance as a value: what a sampler does with the model's conditional and unconditional
predictions, handed to `Process.generate` as one object rather than flags threaded through
each caller. Today classifier-free guidance (Ho & Salimans, 2022); the guidance interval and
autoguidance add their fields here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Guidance:
    """Classifier-free guidance: scale s (1: none), the channels it applies to (None: all) and the
    null label of the unconditional branch (None: the model's own `null_class`)."""

    scale: float = 1.0
    channels: int | None = None
    null_class: int | None = None
