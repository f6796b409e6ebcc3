"""The training loop: the paper's recipe on one CPU process or many GPUs under torchrun.

Run the same command on the same results folder to resume: the newest checkpoint holds the
weights, the EMA, the optimizer and the step; the data position and every random draw are
functions of (seed, step, rank), so a resumed run continues exactly as if never stopped."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ditlab.checkpoints.state import list_checkpoints, load_checkpoint, save_checkpoint
from ditlab.errors import UserError
from ditlab.models import create_model
from ditlab.runtime.distributed import DistInfo, all_reduce_mean, barrier, broadcast_object, distributed_session
from ditlab.runtime.precision import resolve_precision
from ditlab.runtime.seeds import TRAIN_STEP, derive_seed
from ditlab.training.config import TrainConfig, config_differences
from ditlab.training.data import TrainingData, open_training_data
from ditlab.training.ema import make_ema
from ditlab.training.metrics import MetricsLog
from ditlab.training.order import RankBatchSampler
from ditlab.training.parallel import apply_parallelism, full_state_dicts, load_full_state_dicts
from ditlab.training.step import TrainStep


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of every random draw of one rank at one step."""
    return derive_seed(TRAIN_STEP, seed, step, rank)


def step_inputs(data: TrainingData, batch: list[torch.Tensor], diffusion: Any, device: torch.device,
                seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x0 (N, C, H, W), labels (N,), step indices t (N,) and noise (N, C, H, W) of one step, every
    random draw a function of `seed` (drawn on the device: no host sync)."""
    torch.manual_seed(seed)  # label dropout inside the model draws from the global generator
    gen = torch.Generator(device=device).manual_seed(seed)
    x0, y = data.to_model_input(batch, device, gen)
    t = diffusion.sample_timesteps(x0.shape[0], device, generator=gen)
    noise = torch.randn(x0.shape, device=device, generator=gen)
    return x0, y, t, noise


def _resume_state(cfg: TrainConfig, info: DistInfo) -> dict[str, Any] | None:
    """The newest checkpoint of the results folder (None for a new run); refuses another run's folder."""
    results = Path(cfg.results)
    newest = list_checkpoints(results / "checkpoints")[-1:] if info.is_main else None
    newest = broadcast_object(newest)
    stored_cfg = None
    ckpt = None
    if newest:
        ckpt = load_checkpoint(newest[0][1])
        stored_cfg = ckpt["config"]
    elif (results / "config.json").is_file():
        stored_cfg = json.loads((results / "config.json").read_text())
    if stored_cfg is not None:
        diffs = config_differences(stored_cfg, cfg)
        if diffs:
            raise UserError(f"{results} holds a run with another config ({'; '.join(diffs)}): "
                             "use a new --results folder or the stored settings")
    return ckpt


def _model_for(cfg: TrainConfig, data: TrainingData) -> torch.nn.Module:
    num_classes = data.num_classes if cfg.num_classes is None else cfg.num_classes
    return create_model(
        cfg.model, input_size=data.size, in_channels=data.channels, num_classes=num_classes,
        depth=cfg.depth, hidden_size=cfg.hidden_size, num_heads=cfg.num_heads, patch_size=cfg.patch_size,
        block=cfg.block, learn_sigma=cfg.learn_sigma, class_dropout_prob=cfg.class_dropout_prob,
    )  # fmt: skip


def train(cfg: TrainConfig, device: str | None = None) -> dict[str, Any]:
    """Train until max_steps / epochs; returns a summary dict. `device` forces "cpu" or "cuda"."""
    cfg.validate()
    with distributed_session(device) as info:
        return _train(cfg, info)


def _train(cfg: TrainConfig, info: DistInfo) -> dict[str, Any]:
    from ditlab.diffusion import Diffusion

    results = Path(cfg.results)
    if cfg.global_batch_size % info.world_size:
        raise UserError(f"--global-batch-size {cfg.global_batch_size} is not divisible by "
                         f"the {info.world_size} processes")
    ckpt = _resume_state(cfg, info)
    data = open_training_data(cfg.data, cfg.image_size, cfg.vae, info.device)
    steps_per_epoch = len(data.dataset) // cfg.global_batch_size
    if steps_per_epoch == 0:
        raise UserError(f"--global-batch-size {cfg.global_batch_size} exceeds the {len(data.dataset)} training images")
    total = min(cfg.max_steps or math.inf, (cfg.epochs or math.inf) * steps_per_epoch)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every run of this config
    model = _model_for(cfg, data).to(info.device)
    ema = make_ema(model)
    diffusion = Diffusion(learn_sigma=cfg.learn_sigma)
    step = 0
    if ckpt is not None:
        if ckpt.get("dataset_size") != len(data.dataset):
            raise UserError(f"--data {cfg.data} has {len(data.dataset)} items, the run in {results} was trained "
                             f"on {ckpt.get('dataset_size')}: the data changed")
        step = int(ckpt["step"])
    amp_dtype = resolve_precision(cfg.precision, info.device)
    wrapped, opt = apply_parallelism(model, ema, cfg, info)
    if ckpt is not None:
        load_full_state_dicts(wrapped, ema, opt, ckpt)
        del ckpt
    train_step = TrainStep(wrapped, ema, opt, diffusion, amp_dtype, info.device, cfg.ema_decay,
                           cfg.grad_clip or None)

    log = MetricsLog(results, info, cfg, resume_step=step, total=total, description=data.description)
    sample_codec = _grid_codec(data, info) if cfg.sample_every else None
    started = time.time()
    while step < total:
        epoch, start = divmod(step, steps_per_epoch)
        batches = RankBatchSampler(len(data.dataset), cfg.global_batch_size, info.rank, info.world_size,
                                   cfg.seed, epoch, start)
        loader = DataLoader(data.dataset, batch_sampler=batches, num_workers=cfg.num_workers,
                            pin_memory=info.device.type == "cuda", persistent_workers=False)
        for batch in loader:
            x0, y, t, noise = step_inputs(data, batch, diffusion, info.device, step_seed(cfg.seed, step, info.rank))
            terms, grad_norm = train_step(x0, t, y if model.num_classes else None, noise)
            step += 1
            log.accumulate(terms, grad_norm)
            log.step_done()
            if step % cfg.log_every == 0 or step == total:
                log.write(step, lr=opt.param_groups[0]["lr"], reduce=all_reduce_mean)
            if cfg.sample_every and step % cfg.sample_every == 0:
                _sample_grid(ema, diffusion, data, sample_codec, cfg, info, step)
            if step % cfg.ckpt_every == 0 or step == total:
                _save(wrapped, ema, opt, cfg, info, step, steps_per_epoch, data, model.config)
            if step >= total:
                break
    log.close()
    return {"step": step, "seconds": time.time() - started, "results": str(results), "rank": info.rank}


def _save(model, ema, opt, cfg: TrainConfig, info: DistInfo, step: int, steps_per_epoch: int, data: TrainingData,
          model_config: dict[str, Any]) -> None:
    model_sd, ema_sd, opt_sd = full_state_dicts(model, ema, opt)  # collective under FSDP
    if info.is_main:
        state = {
            "model": model_sd, "ema": ema_sd, "opt": opt_sd, "step": step,
            "epoch": step // steps_per_epoch, "batch_in_epoch": step % steps_per_epoch,
            "dataset_size": len(data.dataset), "config": cfg.to_dict(), "model_config": model_config,
            "vae": data.codec_spec,
        }  # fmt: skip
        save_checkpoint(Path(cfg.results) / "checkpoints", step, state, cfg.keep_last)
    barrier()


def _grid_codec(data: TrainingData, info: DistInfo):
    """The codec that decodes sample grids (None in pixel space)."""
    if data.kind == "pixels" or data.codec is not None:
        return data.codec
    from ditlab.data.codecs import load_codec

    try:
        return load_codec(data.codec_spec, device=info.device)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise UserError(f"sample grids need the VAE the cache was made with ({e}); pass --sample-every 0 "
                         "to train without grids") from e


def _sample_grid(ema, diffusion, data: TrainingData, codec, cfg: TrainConfig, info: DistInfo, step: int) -> None:
    """An EMA sample grid: up to 8 classes x 8 images (or 64 unconditional), fixed seeds.

    Rank 0 samples alone, except under FSDP where the sharded EMA needs every rank."""
    if not (info.is_main or cfg.fsdp):
        return
    from ditlab.sampling.generate import generate, save_grid, to_uint8

    classes = min(8, data.num_classes) if ema.num_classes else 0
    per = 8
    labels = torch.arange(classes).repeat_interleave(per) if classes else None
    n = classes * per if classes else 64
    images = generate(
        ema, diffusion, labels, cfg.seed, range(n), latent_shape=(data.channels, data.size, data.size), codec=codec,
        device=info.device, steps=cfg.sample_steps, sampler="ddpm", clip_denoised=data.kind == "pixels",
    )  # fmt: skip
    if info.is_main:
        save_grid(to_uint8(images), Path(cfg.results) / "samples" / f"step-{step:07d}.png", nrow=per)
