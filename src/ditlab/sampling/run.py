"""`ditlab sample`: a DiT checkpoint (any format `checkpoints.formats` reads) to a PNG grid, ADM's
.npz and/or a folder of PNGs, on one process or split over the ranks of torchrun.

The work goes in rounds of W * B images (W ranks, B = batch size per rank): in round k rank r
samples images k*W*B + r*B ... + B - 1. Rank 0 gathers each round's uint8 images, which are then
in index order, and streams them into the .npz; so rank 0 holds W * B images at a time whatever
N is (FID-50K at 256x256 is 9.8 GB), no per-rank partial files exist, and the only file in
progress is rank 0's temporary .npz, renamed at the end and removed on failure. Every image
depends on (seed, index) alone, so neither the split nor the batch size changes the result."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ditlab.diffusion.guidance import Guidance
from ditlab.errors import UserError
from ditlab.runtime.autocast import AUTOCAST_NAMES as AUTOCAST_NAMES  # their old home
from ditlab.runtime.autocast import AutocastModel as AutocastModel
from ditlab.runtime.distributed import DistInfo, barrier, distributed_session, sigterm_exits
from ditlab.sampling.config import SampleConfig
from ditlab.sampling.pipeline import SamplingPipeline
from ditlab.sampling.record import RECORD_TEXT_KEY, record_array, record_json, record_path


def rank_indices(n: int, batch_size: int, rank: int, world: int, round_: int) -> range:
    """The image indices rank `rank` samples in round `round_` (empty past the end)."""
    start = round_ * world * batch_size + rank * batch_size
    return range(min(start, n), min(start + batch_size, n))


def gather_round(pixels: torch.Tensor, n: int, batch_size: int, info: DistInfo, round_: int) -> np.ndarray | None:
    """All ranks' (b_r, H, W, C) uint8 images of a round, in index order, on rank 0 (None elsewhere).
    Every rank sends B rows (zero padded): collectives need equal shapes."""
    if not info.distributed:
        return pixels.cpu().numpy()
    padded = pixels.new_zeros((batch_size, *pixels.shape[1:]))  # (B, H, W, C)
    padded[: len(pixels)] = pixels
    if not info.is_main:
        dist.gather(padded, None, dst=0)
        return None
    parts = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.gather(padded, parts, dst=0)
    counts = [len(rank_indices(n, batch_size, r, info.world_size, round_)) for r in range(info.world_size)]
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu().numpy()  # (sum of counts, H, W, C)


def sample_to_files(ckpt: str, out: str, **options: Any) -> dict[str, Any]:
    """Sample from the checkpoint `ckpt` into `out` (.png grid or .npz); options are SampleConfig's
    fields. Runs alone or as one rank of torchrun. Returns a summary dict (on every rank;
    "seconds" and "images_per_s" cover sampling, decoding and writing, not loading)."""
    return run_sample(SampleConfig(ckpt=ckpt, out=out, **options))


def run_sample(cfg: SampleConfig) -> dict[str, Any]:
    """`ditlab sample` with the settings `cfg` (see sample_to_files)."""
    with distributed_session(cfg.device) as info, sigterm_exits():
        if info.is_main:  # leftovers of a killed run's .npz (a live process's own are kept)
            from ditlab.runtime.temps import remove_stale_temps

            remove_stale_temps(cfg.out_path.parent)
        job = _prepare(cfg, info)
        started = time.perf_counter()
        _sample_rounds(cfg, job, info)
        seconds = time.perf_counter() - started
    n = cfg.num_images
    return {"out": str(cfg.out_path), "images": n, "image_shape": list(job.shape[1:]), "seconds": seconds,
            "images_per_s": n / seconds, "checkpoint_format": job.record["checkpoint_format"],
            "weights": job.record["weights"], "vae": job.record["vae"], "processes": info.world_size,
            "rank": info.rank, "record": str(record_path(cfg.out_path)), "label_mode": job.record["label_mode"]}


@dataclass
class _Job:
    """What the sampling rounds need, once the checkpoint and codec are loaded."""

    pipeline: SamplingPipeline
    labels: torch.Tensor | None  # (N,) long, None for an unconditional model
    shape: tuple[int, int, int, int]  # (N, H, W, C) of the output images
    record: dict[str, Any]  # the protocol record (sampling/record.py)
    guide: torch.nn.Module | None = None  # autoguidance's guide model

    @property
    def guidance(self) -> Guidance:
        r = self.record
        return Guidance(scale=r["cfg_scale"], channels=r["guidance_channels"], interval=r["guidance_interval"],
                        t_interval=r["guidance_t"], guide=self.guide)


def _prepare(cfg: SampleConfig, info: DistInfo) -> _Job:
    from ditlab.sampling.labels import run_labels
    from ditlab.sampling.record import sample_record

    resolved: list[tuple[torch.Tensor | None, str, list[int] | None]] = []

    def labels_of(names: list[str], source: str) -> None:  # name errors before the VAE loads
        resolved.append(run_labels(cfg, names, source))

    pipeline = SamplingPipeline.from_checkpoint(cfg.ckpt, vae=cfg.vae, weights=cfg.weights, model=cfg.model,
                                                precision=cfg.precision, device=info.device, check_names=labels_of,
                                                objective=cfg.objective)
    sampler, steps = pipeline.sampler_and_steps(cfg.sampler, cfg.steps)
    (labels, label_mode, classes), = resolved
    size = pipeline.image_size
    if cfg.image_size is not None and cfg.image_size != size:
        mc = pipeline.config
        raise UserError(f"--image-size {cfg.image_size}: {pipeline.source} makes {size}x{size} images "
                        f"({mc['input_size']}x{mc['input_size']} latents, --vae {pipeline.vae})")
    guide, guide_entry = None, None
    if cfg.guide_ckpt is not None:
        guide, guide_entry = pipeline.load_guide(cfg.guide_ckpt, weights=cfg.weights)
    settings = {"sampler": sampler, "steps": steps, "cfg_scale": cfg.cfg_scale,
                "guidance_channels": cfg.guidance_channels, "label_mode": label_mode, "classes": classes,
                "seed": cfg.seed, "num_images": cfg.num_images, "batch_size": cfg.batch_size,
                "world_size": info.world_size, "guidance_interval": cfg.guidance_interval,
                "guidance_t": cfg.guidance_t, "guide": guide_entry}
    shape = (cfg.num_images, size, size, pipeline.image_channels)
    return _Job(pipeline, labels, shape, sample_record(pipeline.record_fields, settings), guide)


def sample_rounds(pipeline: SamplingPipeline, labels: torch.Tensor | None, cfg: SampleConfig, info: DistInfo,
                  guidance: Guidance) -> Iterator[tuple[range, torch.Tensor, np.ndarray | None]]:  # fmt: skip
    """The rounds of a run of cfg.num_images images: (this rank's indices, its (b, H, W, C) uint8 images,
    all ranks' images of the round in index order on rank 0, None elsewhere). `ditlab sample` and online
    evaluation (`training.online_eval`) both draw their images here. `labels` (N,) or None."""
    from ditlab.sampling.generate import quantize

    n, size, channels = cfg.num_images, pipeline.image_size, pipeline.image_channels
    sampler, steps = pipeline.sampler_and_steps(cfg.sampler, cfg.steps)  # the process's defaults where None
    for k in range(math.ceil(n / (info.world_size * cfg.batch_size))):
        mine = rank_indices(n, cfg.batch_size, info.rank, info.world_size, k)
        pixels = torch.empty((0, size, size, channels), dtype=torch.uint8, device=info.device)
        if len(mine):
            mine_labels = labels[mine.start:mine.stop] if labels is not None else None
            images = pipeline.images(mine_labels, cfg.seed, mine, guidance=guidance, sampler=sampler, steps=steps)
            pixels = quantize(images)  # (b, H, W, C) uint8
        yield mine, pixels, gather_round(pixels, n, cfg.batch_size, info, k)


def _sample_rounds(cfg: SampleConfig, job: _Job, info: DistInfo) -> None:
    """Every round: this rank's images sampled, decoded and quantized, gathered on rank 0 and written."""
    from tqdm.auto import tqdm

    from ditlab.data.npz import PROTOCOL_KEY, NpzWriter
    from ditlab.runtime.files import atomic_write_text
    from ditlab.sampling.generate import save_grid, save_pngs

    n, out, png_dir = cfg.num_images, cfg.out_path, cfg.png_dir
    if png_dir and info.is_main:
        try:
            Path(png_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--png-dir {png_dir}: cannot make the folder ({e})") from e
    barrier()
    grid: list[np.ndarray] = []
    try:
        npz = NpzWriter(out, job.shape) if info.is_main and out.suffix.lower() == ".npz" else None
    except OSError as e:
        raise UserError(f"--out {out}: cannot write it ({e})") from e
    with npz or contextlib.nullcontext(), torch.inference_mode(), \
            tqdm(total=n, unit="img", desc="sampling", disable=not (cfg.progress and info.is_main)) as bar:
        for mine, pixels, gathered in sample_rounds(job.pipeline, job.labels, cfg, info, job.guidance):
            if png_dir and len(mine):
                try:
                    save_pngs(pixels.cpu().numpy(), mine, png_dir)
                except OSError as e:
                    raise UserError(f"--png-dir {png_dir}: cannot write an image ({e})") from e
            if gathered is not None:
                npz.write(gathered) if npz is not None else grid.append(gathered)
                bar.update(len(gathered))
        if npz:
            npz.close(job.labels.numpy() if job.labels is not None else None,
                      {PROTOCOL_KEY: record_array(job.record)})
    if info.is_main and out.suffix.lower() == ".png":
        names = job.pipeline.class_names
        captions = [names[c] for c in job.labels.tolist()] if cfg.captions and job.labels is not None else None
        save_grid(np.concatenate(grid), out, nrow=cfg.nrow or min(n, 8), captions=captions,
                  text={RECORD_TEXT_KEY: json.dumps(job.record, sort_keys=True)})
    if info.is_main:
        atomic_write_text(record_path(out), record_json(job.record))
    barrier()
