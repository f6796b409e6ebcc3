"""The labels of a `ditlab sample` run: --classes (ids or names) resolved against the
checkpoint's class names, cycled or balanced; or uniformly random, or balanced over all classes."""

from __future__ import annotations

import torch

from ditlab.data.classes import class_ids
from ditlab.errors import UserError
from ditlab.sampling.config import SampleConfig
from ditlab.sampling.generate import balanced_labels, random_labels


def run_labels(cfg: SampleConfig, names: list[str], source: str) -> tuple[torch.Tensor | None, str, list[int] | None]:
    """((N,) long labels or None for an unconditional model, the label mode, the resolved --classes).

    `names` are the checkpoint's class names (index = label; empty: unconditional). The mode is
    "random", "balanced", or "classes" (the given classes cycled through)."""
    if not names:
        if cfg.classes:
            raise UserError(f"--classes: {source} holds an unconditional DiT")
        if cfg.labels == "balanced":
            raise UserError(f"--labels balanced: {source} holds an unconditional DiT")
        return None, "unconditional", None
    classes = class_ids(cfg.classes, names) if cfg.classes else None
    n = cfg.num_images
    if cfg.labels == "balanced":
        pool = sorted(set(classes)) if classes else list(range(len(names)))
        return balanced_labels(cfg.seed, n, pool), "balanced", classes
    if classes:
        return torch.tensor([classes[i % len(classes)] for i in range(n)], dtype=torch.long), "classes", classes
    return random_labels(cfg.seed, range(n), len(names)), "random", None
