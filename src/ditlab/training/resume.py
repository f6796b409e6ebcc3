"""Resume: everything that makes "run the same command again" continue a run exactly.

A run's state is its newest checkpoint (a `checkpoints.state.TrainingState`); its data position
and every random draw are functions of (seed, step, rank), so restoring the weights, the EMA, the
optimizer and the step is all there is to it. Here: which settings may change on resume, the
refusal of another run's folder or other data, saving and restoring the state through DDP or FSDP
wrappers, and dropping the metrics a crashed run logged past its last checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ditlab.checkpoints.state import TrainingState, list_checkpoints, load_state, save_state
from ditlab.errors import UserError
from ditlab.runtime.distributed import DistInfo, barrier, broadcast_object
from ditlab.runtime.files import atomic_write_text
from ditlab.training.config import TrainConfig

# Settings that may differ between the stored run and the command that resumes it.
RESUMABLE = frozenset({
    "max_steps", "epochs", "ckpt_every", "keep_last", "sample_every", "log_every", "num_workers",
    "compile", "grad_checkpointing", "fsdp", "sample_steps", "progress", "precision", "results",
})  # fmt: skip
# Gradient accumulation changes only the float rounding (like fsdp and precision), W&B only where the
# metrics also go; the decay horizon may move only as far as lr_schedule.check_resume allows.
RESUMABLE = RESUMABLE | {"grad_accum", "wandb", "lr_decay_steps"}


def config_differences(stored: dict[str, Any], current: TrainConfig) -> list[str]:
    """Run-defining settings that differ between a stored run and `current`."""
    now = current.to_dict()
    return [
        f"{k}: {stored.get(k)!r} -> {now[k]!r}"
        for k in sorted(now)
        if k not in RESUMABLE and stored.get(k) != now[k]
    ]


def newest_state(cfg: TrainConfig, info: DistInfo) -> TrainingState | None:
    """The newest checkpoint of the results folder (None for a new run); refuses a folder that
    holds a run with other settings (from its checkpoint, or its config.json before the first)."""
    results = Path(cfg.results)
    newest = list_checkpoints(results / "checkpoints")[-1:] if info.is_main else None
    newest = broadcast_object(newest)
    state, stored = None, None
    if newest:
        state = load_state(newest[0][1])
        stored = state.config
    elif (results / "config.json").is_file():
        stored = json.loads((results / "config.json").read_text())
    if stored is not None:
        diffs = config_differences(stored, cfg)
        if diffs:
            raise UserError(f"{results} holds a run with another config ({'; '.join(diffs)}): "
                            "use a new --results folder or the stored settings")
    return state


def check_same_data(state: TrainingState, cfg: TrainConfig, dataset_size: int) -> None:
    if state.dataset_size != dataset_size:
        raise UserError(f"--data {cfg.data} has {dataset_size} items, the run in {cfg.results} was trained "
                        f"on {state.dataset_size}: the data changed")


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _raw(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def full_state_dicts(model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict, dict]:
    """Unsharded CPU state dicts of the model, the EMA and the optimizer (parameter names as keys).

    A collective under FSDP: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    raw, opts = _raw(model), _options()
    return (get_model_state_dict(raw, options=opts), get_model_state_dict(ema, options=opts),
            get_optimizer_state_dict(raw, opt, options=opts))


def restore(model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer, state: TrainingState) -> None:
    """Load a saved state's model, EMA and optimizer into (possibly sharded or wrapped) modules."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    raw, opts = _raw(model), _options()
    set_model_state_dict(raw, state.model, options=opts)
    set_model_state_dict(ema, state.ema, options=opts)
    set_optimizer_state_dict(raw, opt, state.opt, options=opts)


def save(model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig, info: DistInfo,
         step: int, run: dict[str, Any]) -> None:
    """Write the run's state at `step` as a checkpoint (rank 0 writes; a collective under FSDP).
    `run` holds what the weights do not: steps_per_epoch, dataset_size, model_config, vae, class_names."""
    model_sd, ema_sd, opt_sd = full_state_dicts(model, ema, opt)
    if info.is_main:
        epoch, batch = divmod(step, run["steps_per_epoch"])
        state = TrainingState(model=model_sd, ema=ema_sd, opt=opt_sd, step=step, epoch=epoch, batch_in_epoch=batch,
                              dataset_size=run["dataset_size"], config=cfg.to_dict(),
                              model_config=run["model_config"], vae=run["vae"],
                              class_names=run.get("class_names"))
        save_state(Path(cfg.results) / "checkpoints", state, cfg.keep_last)
    barrier()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines of metrics.jsonl that a crashed run logged after the checkpoint at `step`."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))
