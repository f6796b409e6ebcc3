"""`ditlab sample`: a DiT checkpoint (any format `checkpoints.py` reads) to a PNG grid, ADM's .npz
and/or a folder of PNGs, on one process or split over the ranks of torchrun.

The work goes in rounds of W * B images (W ranks, B = batch size per rank): in round k rank r
samples images k*W*B + r*B ... + B - 1. Rank 0 gathers each round's uint8 images, which are then
in index order, and streams them into the .npz; so rank 0 holds W * B images at a time whatever
N is (FID-50K at 256x256 is 9.8 GB), no per-rank partial files exist, and the only file in
progress is rank 0's temporary .npz, renamed at the end and removed on failure. Every image
depends on (seed, index) alone, so neither the split nor the batch size changes the result."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ditlab.errors import UserError
from ditlab.runtime.distributed import DistInfo, barrier, distributed_session, launched_by_torchrun

MAX_GRID_IMAGES = 1024  # a .png grid beyond this is a mistake: use .npz or --png-dir
OUT_KINDS = (".png", ".npz")


class AutocastModel(torch.nn.Module):
    """A DiT whose forward runs under autocast(dtype); the diffusion maths around it stay float32
    (the guided output is promoted to float32 by the sampler)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype, self.num_classes = model, dtype, model.num_classes

    @property
    def null_class(self) -> int | None:
        return self.model.null_class

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x, t, y)


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
    parts = [torch.empty_like(padded) for _ in range(info.world_size)] if info.is_main else None
    dist.gather(padded, parts, dst=0)
    if not info.is_main:
        return None
    counts = [len(rank_indices(n, batch_size, r, info.world_size, round_)) for r in range(info.world_size)]
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu().numpy()  # (sum of counts, H, W, C)


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """Under torchrun a failed rank makes the agent SIGTERM the others: turn that into SystemExit so
    that temporary files are removed on the way out."""
    if not launched_by_torchrun() or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_request(out: Path, classes: list[int] | None, num_samples: int | None, steps: int, sampler: str,
                   seed: int, batch_size: int, precision: str) -> int:
    """Cheap checks before anything is loaded; returns the number of images."""
    from ditlab.diffusion import SAMPLERS
    from ditlab.options import PRECISIONS

    if out.suffix.lower() not in OUT_KINDS:
        raise UserError(f"--out {out}: give a .png (one grid) or a .npz (ADM's sample format) file")
    if not classes and num_samples is None:
        raise UserError("give --classes C ... (a grid of those classes) or --num-samples N")
    n = len(classes) if num_samples is None else num_samples
    checks = [(n >= 1, f"--num-samples {n} must be positive"), (batch_size >= 1, f"--batch-size {batch_size} must "
              "be positive"), (seed >= 0, f"--seed {seed} must be non-negative"),
              (1 <= steps <= 1000, f"--steps {steps} must be between 1 and 1000"),
              (sampler in SAMPLERS, f"--sampler {sampler}: choose one of {', '.join(SAMPLERS)}"),
              (precision in PRECISIONS, f"--precision {precision}: choose one of {', '.join(PRECISIONS)}"),
              (out.suffix.lower() != ".png" or n <= MAX_GRID_IMAGES,
               f"--out {out}: a grid of {n} images; above {MAX_GRID_IMAGES} write a .npz or use --png-dir")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    return n


def sample_to_files(ckpt: str, out: str, *, classes: list[int] | None = None, num_samples: int | None = None,
                    model: str | None = None, image_size: int | None = None, vae: str | None = None,
                    steps: int = 250, sampler: str = "ddpm", cfg_scale: float = 1.0,
                    guidance_channels: int | None = None, seed: int = 0, batch_size: int = 32,
                    precision: str = "auto", weights: str = "ema", png_dir: str | None = None,
                    nrow: int | None = None, device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Sample `num_samples` images (classes uniformly random, or cycling through `classes`), or
    one image per entry of `classes`, from the checkpoint `ckpt` into `out` (.png grid or .npz);
    also one PNG per image in `png_dir` if given. Runs alone or as one rank of torchrun.

    Returns a summary dict (on every rank; "seconds" and "images_per_s" cover sampling, decoding
    and writing, not loading)."""
    out_path = Path(out).expanduser()
    n = _check_request(out_path, classes, num_samples, steps, sampler, seed, batch_size, precision)
    if nrow is not None and nrow < 1:
        raise UserError(f"--nrow {nrow} must be positive")
    with distributed_session(device) as info, sigterm_exits():
        return _sample(ckpt, out_path, n, classes, model, image_size, vae, steps, sampler, cfg_scale,
                       guidance_channels, seed, batch_size, precision, weights, png_dir, nrow, progress, info)


def _sample(ckpt_path: str, out: Path, n: int, classes: list[int] | None, model_name: str | None,
            image_size: int | None, vae: str | None, steps: int, sampler: str, cfg_scale: float,
            guidance_channels: int | None, seed: int, batch_size: int, precision: str, weights: str,
            png_dir: str | None, nrow: int | None, progress: bool, info: DistInfo) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from ditlab.checkpoints.formats import build_model, read_checkpoint
    from ditlab.data.codecs import DEFAULT_VAE, PIXEL, load_codec
    from ditlab.diffusion import Diffusion
    from ditlab.runtime.precision import resolve_precision, sampling_vae_dtype
    from ditlab.sampling.generate import NpzWriter, generate, quantize, random_labels, save_grid, save_pngs

    ckpt = read_checkpoint(ckpt_path, weights=weights, model=model_name)
    cfg = ckpt.config
    amp = resolve_precision(precision, info.device)
    codec_spec = vae or ckpt.vae or DEFAULT_VAE
    codec = load_codec(codec_spec, device=info.device, dtype=sampling_vae_dtype(precision),
                       pixel_channels=cfg["in_channels"])
    pixel = codec_spec == PIXEL  # x_0 predictions are clipped to the [-1, 1] of images
    if codec.latent_channels != cfg["in_channels"]:
        raise UserError(f"--vae {codec_spec} makes {codec.latent_channels}-channel latents, but {ckpt.source} "
                         f"takes {cfg['in_channels']} channels")
    size = cfg["input_size"] * codec.downsample
    if image_size is not None and image_size != size:
        raise UserError(f"--image-size {image_size}: {ckpt.source} makes {size}x{size} images "
                         f"({cfg['input_size']}x{cfg['input_size']} latents, --vae {codec_spec})")
    num_classes = cfg["num_classes"]
    if classes and not num_classes:
        raise UserError(f"--classes: {ckpt.source} holds an unconditional DiT")
    bad = [c for c in classes or [] if not 0 <= c < num_classes]
    if bad:
        raise UserError(f"--classes {bad[0]}: {ckpt.source} has classes 0 to {num_classes - 1}")

    net: torch.nn.Module = build_model(ckpt, info.device)
    fmt, held = ckpt.format, ckpt.weights
    del ckpt  # the weights now live in `net`: do not hold a second copy for the whole run
    if amp is not None:
        net = AutocastModel(net, amp).eval()
    diffusion = Diffusion(learn_sigma=cfg["learn_sigma"])
    shape = (n, size, size, codec.image_channels)  # (N, H, W, C)
    labels = None
    if num_classes:
        labels = (torch.tensor([classes[i % len(classes)] for i in range(n)]) if classes
                  else random_labels(seed, range(n), num_classes))  # (N,)
    if png_dir and info.is_main:
        try:
            Path(png_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--png-dir {png_dir}: cannot make the folder ({e})") from e
    barrier()

    per_round = info.world_size * batch_size
    grid: list[np.ndarray] = []
    try:
        npz = NpzWriter(out, shape) if info.is_main and out.suffix.lower() == ".npz" else None
    except OSError as e:
        raise UserError(f"--out {out}: cannot write it ({e})") from e
    started = time.perf_counter()
    with npz or contextlib.nullcontext(), torch.inference_mode(), \
            tqdm(total=n, unit="img", desc="sampling", disable=not (progress and info.is_main)) as bar:
        for k in range(math.ceil(n / per_round)):
            mine = rank_indices(n, batch_size, info.rank, info.world_size, k)
            pixels = torch.empty((0, *shape[1:]), dtype=torch.uint8, device=info.device)
            if len(mine):
                images = generate(net, diffusion, labels[mine.start:mine.stop] if labels is not None else None, seed,
                                  mine, latent_shape=(cfg["in_channels"], cfg["input_size"], cfg["input_size"]),
                                  codec=codec, device=info.device, steps=steps, sampler=sampler,
                                  cfg_scale=cfg_scale, guidance_channels=guidance_channels, clip_denoised=pixel)
                pixels = quantize(images)  # (b, H, W, C) uint8
                if png_dir:
                    try:
                        save_pngs(pixels.cpu().numpy(), mine, png_dir)
                    except OSError as e:
                        raise UserError(f"--png-dir {png_dir}: cannot write an image ({e})") from e
            gathered = gather_round(pixels, n, batch_size, info, k)
            if gathered is not None and npz is not None:
                npz.write(gathered)
            elif gathered is not None:
                grid.append(gathered)
            bar.update(len(gathered) if gathered is not None else 0)
        if npz:
            npz.close(labels.numpy() if labels is not None else None)
    if info.is_main and out.suffix.lower() == ".png":
        save_grid(np.concatenate(grid), out, nrow=nrow or min(n, 8))
    barrier()
    seconds = time.perf_counter() - started
    return {"out": str(out), "images": n, "image_shape": list(shape[1:]), "seconds": seconds,
            "images_per_s": n / seconds, "checkpoint_format": fmt, "weights": held,
            "vae": codec_spec, "processes": info.world_size, "rank": info.rank}
