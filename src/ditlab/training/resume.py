"""Resume: everything that makes "run the same command again" continue a run exactly.

A run's state is its newest checkpoint (a `checkpoints.state.TrainingState`); its data position
and every random draw are functions of (seed, step, rank), so restoring the weights, the EMA, the
optimizer and the step is all there is to it. Here: which settings may change on resume, the
refusal of another run's folder or other data, saving and restoring the state through DDP or FSDP
wrappers, and dropping the metrics a crashed run logged past its last checkpoint.

A damaged newest checkpoint (truncated, flipped bytes) is moved aside to NAME.damaged with a
one-line warning and the run resumes from the one before it; a torn last line of metrics.jsonl
(a crash mid-write) is dropped with a warning."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ditlab.checkpoints.state import TrainingState, checkpoint_path, list_checkpoints, load_state, save_state
from ditlab.errors import UserError, one_line
from ditlab.runtime.distributed import DistInfo, barrier, broadcast_object
from ditlab.runtime.files import atomic_write_text
from ditlab.training.config import TrainConfig
from ditlab.training.data import absolute_path, with_data_defaults

RESUMABLE = TrainConfig.resumable_fields()
"""Settings that may differ between the stored run and the command that resumes it: the fields
whose metadata says so (`training.config.RESUMABLE`)."""
DAMAGED_SUFFIX = ".damaged"


def warn(message: str) -> None:
    print(f"ditlab train: warning: {message}", file=sys.stderr, flush=True)


def config_differences(stored: dict[str, Any], current: TrainConfig) -> list[str]:
    """Run-defining settings that differ between a stored run and `current`."""
    now = current.to_dict()
    # a setting that a run stored by an older ditlab lacks had its default there
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    stored = {**defaults, **stored}
    stored = {**stored, **{k: absolute_path(stored[k]) for k in ("data", "vae") if isinstance(stored.get(k), str)}}
    return [
        f"{k}: {stored.get(k)!r} -> {now[k]!r}"
        for k in sorted(now)
        if k not in RESUMABLE and stored.get(k) != now[k]
    ]


def _newest_readable(folder: Path) -> tuple[Path, TrainingState] | None:
    """The newest checkpoint of `folder` that reads and verifies; each damaged newer one is moved
    aside (NAME.damaged, never deleted) with a one-line warning. None: no checkpoint at all."""
    found = list_checkpoints(folder)
    for i in range(len(found) - 1, -1, -1):
        path = found[i][1]
        try:
            return path, load_state(path)
        except UserError as e:
            aside = path.with_name(path.name + DAMAGED_SUFFIX)
            os.replace(path, aside)
            before = f"resuming from {found[i - 1][1].name}" if i else "no earlier checkpoint"
            warn(f"{one_line(e)}; moved it to {aside.name}; {before}")
    if found:
        raise UserError(f"{folder}: every checkpoint is damaged (moved to *{DAMAGED_SUFFIX}); use a new --results "
                        "folder or restore one")
    return None


def _stored_config(results: Path) -> dict[str, Any] | None:
    path = results / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path}: not a ditlab run config ({one_line(e)}); fix or remove it") from e


def newest_state(cfg: TrainConfig, info: DistInfo) -> tuple[TrainingState | None, TrainConfig]:
    """(the newest readable checkpoint of the results folder, None for a new run; `cfg` with the
    data's defaults filled in). Refuses a folder that holds a run with other settings (from its
    checkpoint, or its config.json before the first)."""
    results = Path(cfg.results)
    msg: list[Any] = [None, None]
    found = None
    if info.is_main:
        try:
            found = _newest_readable(results / "checkpoints")
            msg = [found and found[0], None]
        except UserError as e:
            msg = [None, str(e)]
    newest, error = broadcast_object(msg)
    if error is not None:
        raise UserError(error)
    state = found[1] if found else load_state(newest) if newest is not None else None
    stored = state.config if state is not None else _stored_config(results)
    cfg = with_data_defaults(cfg, stored)
    if stored is not None:
        diffs = config_differences(stored, cfg)
        if diffs:
            raise UserError(f"{results} holds a run with another config ({'; '.join(diffs)}): "
                            "use a new --results folder or the stored settings")
    return state, cfg


def check_world_size(state: TrainingState, info: DistInfo) -> None:
    """Resuming on another number of processes is allowed (torchrun's elastic restarts do it), with a
    warning: the data order is the same, but the per-rank random draws are not the uninterrupted run's."""
    if state.world_size is not None and state.world_size != info.world_size and info.is_main:
        warn(f"resuming a run of {state.world_size} process(es) on {info.world_size}: the data order is kept, but "
             "the random draws (timesteps, noise, flips) from now on differ from the uninterrupted run's")


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
         step: int, run: dict[str, Any]) -> Path:
    """Write the run's state at `step` as a checkpoint (rank 0 writes; a collective under FSDP);
    returns its path. `run` holds what the weights do not: steps_per_epoch, dataset_size,
    model_config, vae, class_names, metrics (the row in progress)."""
    model_sd, ema_sd, opt_sd = full_state_dicts(model, ema, opt)
    if info.is_main:
        epoch, batch = divmod(step, run["steps_per_epoch"])
        state = TrainingState(model=model_sd, ema=ema_sd, opt=opt_sd, step=step, epoch=epoch, batch_in_epoch=batch,
                              dataset_size=run["dataset_size"], config=cfg.to_dict(),
                              model_config=run["model_config"], vae=run["vae"], world_size=info.world_size,
                              class_names=run.get("class_names"), metrics=run.get("metrics"))
        save_state(Path(cfg.results) / "checkpoints", state, cfg.keep_last)
    barrier()
    return checkpoint_path(Path(cfg.results) / "checkpoints", step)


def start_results(results: Path, cfg: TrainConfig, step: int) -> None:
    """The results folder of a run starting or resuming at `step` (rank 0): its config.json, written
    once (what a later command is checked against before the first checkpoint exists), and its
    metrics.jsonl cut back to the checkpoint resumed from."""
    results.mkdir(parents=True, exist_ok=True)
    config_path = results / "config.json"
    if not config_path.exists():
        atomic_write_text(config_path, json.dumps(cfg.to_dict(), indent=2) + "\n")
    truncate_metrics(results / "metrics.jsonl", step)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines of metrics.jsonl that a crashed run logged after the checkpoint at `step`."""
    if not path.exists():
        return
    keep = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            row = json.loads(line) if line else None
            if row is not None and row["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            warn(f"{path} line {n} is torn or not a metrics row (a crash while writing it?): dropped it")
    atomic_write_text(path, "".join(line + "\n" for line in keep))
