"""The training loop: the paper's recipe on one CPU process or many GPUs under torchrun.

Run the same command on the same results folder to resume: the newest checkpoint holds the
weights, the EMA, the optimizer and the step; the data position and every random draw are
functions of (seed, step, rank), so a resumed run continues exactly as if never stopped.

Faults: the results folder is locked for the run (`runtime.lock`), leftovers of interrupted
writes are removed at the start (`runtime.temps`), non-finite steps are skipped and counted
(`training.guard`), and SIGTERM / SIGINT save before exiting (`training.preempt`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ditlab.checkpoints.state import TrainingState, checkpoint_path
from ditlab.data.codecs import Codec
from ditlab.diffusion.protocol import Process
from ditlab.errors import UserError
from ditlab.models.configs import create_model
from ditlab.models.dit import DiT
from ditlab.runtime.distributed import DistInfo, all_reduce_mean, distributed_session, launched_by_torchrun
from ditlab.runtime.lock import owned_folder
from ditlab.runtime.precision import resolve_precision
from ditlab.training import lr_schedule, resume
from ditlab.training.accumulate import check_micro_batches
from ditlab.training.config import TrainConfig
from ditlab.training.data import TrainingData, open_training_data
from ditlab.training.ema import make_ema
from ditlab.training.guard import NonFiniteGuard, TrainingDiverged, weights_finite
from ditlab.training.metrics import MetricsLog
from ditlab.training.online_eval import OnlineEval
from ditlab.training.order import RankBatchSampler
from ditlab.training.parallel import apply_parallelism
from ditlab.training.preempt import Preemption, health_group, is_timeout, silent_rank_error, stop
from ditlab.training.repa import Alignment
from ditlab.training.repa_run import open_alignment, repa_model_options, with_repa_module
from ditlab.training.sinks import check_sinks
from ditlab.training.step import TrainStep, draw_aligned_step_inputs, draw_step_inputs, step_seed


def _model_for(cfg: TrainConfig, data: TrainingData, repa_dim: int = 0) -> DiT:
    num_classes = data.num_classes if cfg.num_classes is None else cfg.num_classes
    if 0 < num_classes < data.num_classes:  # labels >= num_classes would fail at the first batch holding one
        raise UserError(f"--num-classes {num_classes} is below the {data.num_classes} classes of --data {cfg.data} "
                        "(leave it out to use the data's, or 0 for an unconditional model)")
    return create_model(
        cfg.model, input_size=data.size, in_channels=data.channels, num_classes=num_classes,
        depth=cfg.depth, hidden_size=cfg.hidden_size, num_heads=cfg.num_heads, patch_size=cfg.patch_size,
        block=cfg.block, learn_sigma=cfg.learn_sigma, class_dropout_prob=cfg.class_dropout_prob, **cfg.block_options(),
        **repa_model_options(cfg, repa_dim),
    )  # fmt: skip


def train(cfg: TrainConfig, device: str | None = None, dataset: Dataset | None = None,
          repa_encoder: torch.nn.Module | None = None) -> dict[str, Any]:
    """Train until max_steps / epochs; returns a summary dict. `device` forces "cpu" or "cuda";
    `dataset`, a map-style Dataset of (x (C, H, W), label), replaces --data (training.custom_data);
    `repa_encoder`, any frozen module mapping clean images (N, C, H, W) in [-1, 1] to patch features
    (N, S, Dz), turns REPA on with it (instead of --repa-encoder; the run records "module:<class>").

    On SIGTERM / SIGINT it saves and raises `training.preempt.TrainingInterrupted` (a SystemExit)."""
    cfg.validate()
    check_sinks(cfg)  # before the results folder is made
    cfg = with_repa_module(cfg, repa_encoder)
    if cfg.fsdp and not launched_by_torchrun():
        raise UserError("--fsdp shards the model over processes: launch it with "
                        "`torchrun --nproc_per_node=N -m ditlab train ... --fsdp`")
    with distributed_session(device, timedelta(seconds=cfg.dist_timeout)) as info:
        health = health_group(info.distributed)
        with owned_folder(cfg.results, "--results", info.is_main, temps_in=("", "checkpoints", "samples")):
            try:
                return _train(cfg, info, dataset, repa_encoder)
            except RuntimeError as e:  # a collective that timed out: name the rank that stopped answering
                if info.distributed and is_timeout(e):
                    raise silent_rank_error(cfg.dist_timeout, info.rank, health) from e
                raise


@dataclass
class _Parts:
    """What a run trains with, once built (and restored on resume)."""

    model: DiT  # the DiT itself
    ema: torch.nn.Module
    wrapped: torch.nn.Module  # the model behind DDP / FSDP, what the step calls
    opt: torch.optim.Optimizer
    diffusion: Process
    train_step: TrainStep
    alignment: Alignment | None  # REPA's encoder and lambda (None: no REPA)


def _open_data(cfg: TrainConfig, info: DistInfo, dataset: Dataset | None) -> tuple[TrainingData, int, float]:
    """The run's data, its steps per epoch and the step the run ends at."""
    if dataset is None:
        assert cfg.image_size is not None  # resume.newest_state filled it in
        data = open_training_data(cfg.data, cfg.image_size, cfg.vae, info.device)
    else:
        from ditlab.training.custom_data import dataset_training_data

        data = dataset_training_data(dataset, cfg.num_classes)
    steps_per_epoch = len(data) // cfg.global_batch_size
    if steps_per_epoch == 0:
        raise UserError(f"--global-batch-size {cfg.global_batch_size} exceeds the {len(data)} training images")
    return data, steps_per_epoch, cfg.total_steps(steps_per_epoch)


def _build(cfg: TrainConfig, info: DistInfo, data: TrainingData, steps_per_epoch: int,
           state: TrainingState | None,
           repa_encoder: torch.nn.Module | None = None) -> tuple[_Parts, int, Path | None]:  # fmt: skip
    """The model, EMA, optimizer and step, restored from `state` on resume; (parts, step, last checkpoint)."""
    from ditlab.diffusion.protocol import process_from_record

    alignment, repa_dim = open_alignment(cfg, data, info.device, repa_encoder)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every run of this config
    model = _model_for(cfg, data, repa_dim).to(info.device)
    ema = make_ema(model)
    diffusion: Process = process_from_record(cfg.process_record())  # the objective's: Diffusion or FlowMatching
    wrapped, opt = apply_parallelism(model, ema, cfg, info)
    step, last_good = 0, None
    if state is not None:
        resume.check_same_data(state, cfg, len(data))
        lr_schedule.check_resume(state.config, cfg, steps_per_epoch)
        resume.check_world_size(state, info)
        resume.restore(wrapped, ema, opt, state)
        step = state.step
        last_good = checkpoint_path(Path(cfg.results) / "checkpoints", step)
    train_step = TrainStep(wrapped, ema, opt, diffusion, resolve_precision(cfg.precision, info.device), info.device,
                           cfg.ema_decay, cfg.grad_clip, repa_coeff=cfg.repa_coeff if alignment else None)
    return _Parts(model, ema, wrapped, opt, diffusion, train_step, alignment), step, last_good


def _train(cfg: TrainConfig, info: DistInfo, dataset: Dataset | None = None,
           repa_encoder: torch.nn.Module | None = None) -> dict[str, Any]:
    if cfg.global_batch_size % info.world_size:
        raise UserError(f"--global-batch-size {cfg.global_batch_size} is not divisible by "
                        f"the {info.world_size} processes")
    check_micro_batches(cfg.global_batch_size, info.world_size, cfg.grad_accum)
    state, cfg = resume.newest_state(cfg, info)
    data, steps_per_epoch, total = _open_data(cfg, info, dataset)
    parts, step, last_good = _build(cfg, info, data, steps_per_epoch, state, repa_encoder)
    pending = state.metrics if state is not None else None
    del state  # the weights now live in the modules
    model, ema, wrapped, opt, diffusion, train_step = (parts.model, parts.ema, parts.wrapped, parts.opt,
                                                       parts.diffusion, parts.train_step)
    run = {"steps_per_epoch": steps_per_epoch, "dataset_size": len(data), "model_config": model.config,
           "vae": data.codec_spec, "class_names": getattr(data.dataset, "classes", None)}
    check_sinks(cfg)  # a missing sink's package is refused before anything is written
    if info.is_main:
        resume.start_results(Path(cfg.results), cfg, step)  # config.json; metrics.jsonl cut back to `step`
    log = MetricsLog(Path(cfg.results), info, cfg, resume_step=step, total=total, description=data.description)
    log.restore(pending)
    sample_codec = _grid_codec(data, info) if cfg.sample_every else None
    dropout = model.cfg.class_dropout_prob if model.num_classes else None  # None: no labels
    guard = NonFiniteGuard(cfg.max_bad_steps, info.device)
    online = _online_eval(cfg, info, data, diffusion, model)
    if online is not None and online.due(step, total):  # a checkpointed step whose evaluation never finished
        online.run(ema, step, log)
    started = time.time()
    with Preemption(info.distributed, timedelta(seconds=cfg.dist_timeout)) as preempt:
        while step < total:
            epoch, start = divmod(step, steps_per_epoch)
            batches = RankBatchSampler(len(data), cfg.global_batch_size, info.rank, info.world_size,
                                       cfg.seed, epoch, start)
            loader = DataLoader(data.dataset, batch_sampler=batches, num_workers=cfg.num_workers,
                                pin_memory=info.device.type == "cuda", persistent_workers=False)
            for batch in loader:
                seed, features = step_seed(cfg.seed, step, info.rank), None
                if parts.alignment is None:
                    inputs = draw_step_inputs(data, batch, diffusion, info.device, seed, dropout)
                else:
                    inputs, features = draw_aligned_step_inputs(data, batch, diffusion, info.device, seed, dropout,
                                                                parts.alignment)
                lr_schedule.set_lr(opt, lr_schedule.lr_at(cfg, step, steps_per_epoch))
                terms, grad_norm, bad = train_step(*inputs, micro_batches=cfg.grad_accum, features=features)
                step += 1
                guard.update(bad, step)
                log.accumulate(terms, grad_norm, bad)
                log.step_done()
                signum = preempt.agreed()
                if step % cfg.log_every == 0 or step == total:
                    log.write(step, lr=opt.param_groups[0]["lr"], reduce=all_reduce_mean)
                    guard.check(last_good)
                if cfg.sample_every and step % cfg.sample_every == 0:
                    log.image(_sample_grid(ema, diffusion, data, sample_codec, cfg, info, step), step)
                if step % cfg.ckpt_every == 0 or step == total or signum:
                    run["metrics"] = log.pending(all_reduce_mean)
                    last_good = _checkpoint(wrapped, ema, opt, cfg, info, step, run, guard, last_good)
                if signum:
                    log.close()
                    raise stop(signum, step, str(last_good), info.is_main)
                if online is not None and online.due(step, total):
                    online.run(ema, step, log)
                if step >= total:
                    break
    log.close()
    skipped = guard.check(last_good)
    if skipped and info.is_main:
        resume.warn(f"{skipped} step(s) had a non-finite loss or gradient norm; their updates were skipped")
    return {"step": step, "seconds": time.time() - started, "results": str(cfg.results), "rank": info.rank,
            "skipped": skipped}


def _checkpoint(model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig,
                info: DistInfo, step: int, run: dict[str, Any], guard: NonFiniteGuard, last_good: Path | None) -> Path:
    """Save a checkpoint, unless the run has diverged or its weights are not finite (then raise,
    naming the last good checkpoint). Returns the new checkpoint's path."""
    guard.check(last_good)
    finite = torch.tensor(float(weights_finite(model, ema)), device=info.device)
    if all_reduce_mean(finite).item() < 1:
        raise TrainingDiverged(f"step {step}: the weights are not finite, no checkpoint written; last good "
                               f"checkpoint: {last_good or 'none'}; lower --lr or set --grad-clip")
    return resume.save(model, ema, opt, cfg, info, step, run)


def _online_eval(cfg: TrainConfig, info: DistInfo, data: TrainingData, process: Process,
                 model: DiT) -> OnlineEval | None:  # fmt: skip
    """The run's online evaluation (None without --eval-every), its settings checked before the first step."""
    if not cfg.eval_every:
        return None
    from ditlab.data.classes import class_names

    names = class_names(model.num_classes, stored=getattr(data.dataset, "classes", None))
    return OnlineEval(cfg, info, data, process, names)


def _grid_codec(data: TrainingData, info: DistInfo) -> Codec | None:
    """The codec that decodes sample grids (None in pixel space)."""
    if data.kind == "pixels" or data.codec is not None:
        return data.codec
    from ditlab.data.codecs import load_codec

    try:
        return load_codec(data.codec_spec, device=info.device)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise UserError(f"sample grids need the VAE the cache was made with ({e}); pass --sample-every 0 "
                         "to train without grids") from e


def _sample_grid(ema: torch.nn.Module, diffusion: Process, data: TrainingData, codec: Codec | None, cfg: TrainConfig,
                 info: DistInfo, step: int) -> Path | None:  # fmt: skip
    """An EMA sample grid: up to 8 classes x 8 images (or 64 unconditional), fixed seeds; its path on
    rank 0 (None elsewhere). Rank 0 samples alone, except under FSDP where the sharded EMA needs every rank."""
    if not (info.is_main or cfg.fsdp):
        return None
    from ditlab.sampling.generate import generate, save_grid, to_uint8

    classes = min(8, data.num_classes) if ema.num_classes else 0
    per = 8
    labels = torch.arange(classes).repeat_interleave(per) if classes else None
    n = classes * per if classes else 64
    images = generate(
        ema, diffusion, labels, cfg.seed, range(n), latent_shape=(data.channels, data.size, data.size), codec=codec,
        device=info.device, steps=cfg.sample_steps, sampler=diffusion.sampler_names[0],
        clip_denoised=data.kind == "pixels",
    )  # fmt: skip
    if not info.is_main:
        return None
    path = Path(cfg.results) / "samples" / f"step-{step:07d}.png"
    save_grid(to_uint8(images), path, nrow=per)
    return path
