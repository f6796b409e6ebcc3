"""The learning rate of each optimizer step: a linear warmup, then constant (the paper's), cosine
or linear decay to a floor. A pure function of the step index and the run's settings, so a resumed
run sets exactly the learning rates the uninterrupted one set. Light: no torch."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ditlab.errors import UserError
from ditlab.training.config import TrainConfig

if TYPE_CHECKING:
    from torch.optim import Optimizer


def check_lr_settings(cfg: TrainConfig) -> None:
    """Refuse learning-rate settings that make no schedule, naming the flag (`TrainConfig.check_lr`,
    part of its validation)."""
    cfg.check_lr()


def decay_end(cfg: TrainConfig, steps_per_epoch: int) -> float:
    """The step at which the decay reaches --lr-min: --lr-decay-steps, or the run's end."""
    return cfg.lr_decay_steps if cfg.lr_decay_steps is not None else cfg.total_steps(steps_per_epoch)


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate of optimizer step `step` (0-based: the first step is 0).

    Warmup: lr * (step + 1) / warmup for step < warmup (the first step is not wasted at 0).
    Then, with p = (step - warmup) / (end - warmup) clipped to [0, 1]: constant lr; cosine
    lr_min + (lr - lr_min) (1 + cos(pi p)) / 2; linear lr - (lr - lr_min) p. The constant schedule
    without warmup returns `cfg.lr` itself, so the paper's recipe is unchanged bit for bit."""
    if step < cfg.lr_warmup:
        return cfg.lr * (step + 1) / cfg.lr_warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    end = decay_end(cfg, steps_per_epoch)
    p = min(1.0, max(0.0, (step - cfg.lr_warmup) / max(end - cfg.lr_warmup, 1)))
    if cfg.lr_schedule == "cosine":
        return cfg.lr_min + (cfg.lr - cfg.lr_min) * 0.5 * (1.0 + math.cos(math.pi * p))
    return cfg.lr - (cfg.lr - cfg.lr_min) * p


def set_lr(opt: Optimizer, lr: float) -> None:
    """Give every parameter group of the optimizer `opt` the learning rate `lr`."""
    for group in opt.param_groups:
        group["lr"] = lr


def check_resume(stored: dict[str, Any], cfg: TrainConfig, steps_per_epoch: int) -> None:
    """A resumed run may extend --max-steps / --epochs, but not when that moves the end of its decay
    (the learning rates of the steps already taken would then differ from the new run's)."""
    if cfg.lr_schedule == "constant":
        return
    before = decay_end(TrainConfig.from_dict(stored), steps_per_epoch)
    now = decay_end(cfg, steps_per_epoch)
    if before != now:
        raise UserError(f"--lr-schedule {cfg.lr_schedule} of the run in {cfg.results} decays until step "
                        f"{before:g}, this command until {now:g}: keep --max-steps / --epochs, or pass "
                        f"--lr-decay-steps {before:g}")
