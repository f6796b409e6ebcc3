"""The model side of `ditlab serve`: one checkpoint loaded once (`sampling.pipeline`), and a batch
of requests sampled in one call of its `images`, each image with its own (seed, index) generator, so
that an image is what the same request gives alone (bitwise where the kernels give a row the same
bits in any batch size; see README, "Sampling and checkpoints")."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ditlab.diffusion.guidance import Guidance
from ditlab.errors import UserError
from ditlab.sampling.pipeline import SamplingPipeline, default_device
from ditlab.sampling.pipeline import StepCounter as StepCounter  # its old home
from ditlab.serve.requests import Defaults, SampleRequest


class BatchCancelled(Exception):
    """Raised from the step callback to stop a batch whose every request has gone."""


class Engine:
    """A checkpoint (any format `ditlab sample` reads) ready to sample on `device`."""

    def __init__(self, ckpt: str, *, vae: str | None = None, weights: str = "ema", model: str | None = None,
                 precision: str = "auto", device: str | None = None, guide_ckpt: str | None = None):
        from ditlab.options import PRECISIONS

        if precision not in PRECISIONS:
            raise UserError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
        self.pipeline = SamplingPipeline.from_checkpoint(ckpt, vae=vae, weights=weights, model=model,
                                                         precision=precision, device=default_device(device))
        p = self.pipeline
        self.device, self.vae, self.codec, self.net, self.diffusion = p.device, p.vae, p.codec, p.model, p.process
        self.pixel = p.pixel  # x_0 predictions clipped to [-1, 1], as `ditlab sample` does
        self.config, self.latent_shape, self.image_size, self.class_names = (p.config, p.latent_shape,
                                                                             p.image_size, p.class_names)
        fields = p.record_fields
        self.meta = {"checkpoint": str(ckpt), "checkpoint_format": fields["checkpoint_format"],
                     "weights": fields["weights"], "config": self.config, "vae": self.vae, "precision": precision,
                     "image_size": self.image_size, "class_names": self.class_names, "device": str(self.device),
                     "checkpoint_file": fields["checkpoint_file"], "weights_sha256": fields["weights_sha256"],
                     "autocast": fields["autocast"], "process": fields["process"], "guide": None}
        self.samplers: tuple[str, ...] = tuple(p.process.sampler_names)
        """the samplers of the checkpoint's process, the first its default"""
        self.guide: torch.nn.Module | None = None  # autoguidance's guide model (--guide-ckpt)
        if guide_ckpt is not None:
            self.guide, self.meta["guide"] = p.load_guide(guide_ckpt, weights=weights)

    def defaults_for(self, defaults: Defaults) -> Defaults:
        """`defaults` with the sampler the process's default where none is given; a sampler of another
        objective is refused in one line naming both (as `ditlab sample` does)."""
        sampler, _ = self.pipeline.sampler_and_steps(defaults.sampler, defaults.steps)
        return dataclasses.replace(defaults, sampler=sampler)

    @property
    def latent_channels(self) -> int:
        return self.latent_shape[0]

    def run(self, requests: list[SampleRequest], on_step: Callable[[], None] = lambda: None) -> list[np.ndarray]:
        """Sample every request of `requests` (equal `batch_key`s) in one batch; returns one
        (n_r, H, W, C) uint8 array per request. `on_step` is called after each sampling step."""
        keys = {r.batch_key for r in requests}
        if len(keys) != 1:
            raise ValueError(f"requests of one batch must share sampler, steps and guidance, got {sorted(keys)}")
        first = requests[0]
        seeds = [r.seed for r in requests for _ in range(r.num_images)]
        indices = [i for r in requests for i in range(r.num_images)]
        labels = None
        if self.class_names:
            labels = torch.tensor([c for r in requests for c in r.labels or ()], dtype=torch.long)  # (N,)
        from ditlab.sampling.generate import quantize

        guidance = Guidance(scale=first.cfg_scale, channels=first.guidance_channels, interval=first.guidance_interval,
                            t_interval=first.guidance_t, guide=self.guide if first.guide else None)
        with torch.inference_mode():
            images = self.pipeline.images(labels, seeds, indices, guidance=guidance, sampler=first.sampler,
                                          steps=first.steps, on_step=on_step)
            pixels = quantize(images).cpu().numpy()  # (N, H, W, C) uint8
        bounds = np.cumsum([0] + [r.num_images for r in requests])
        return [pixels[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def info(self) -> dict[str, Any]:
        """What GET /api/info tells about the model (limits and defaults are added by the app)."""
        return {"name": self.name, "checkpoint": self.meta["checkpoint"],
                "checkpoint_format": self.meta["checkpoint_format"],
                "weights": self.meta["weights"], "config": self.config, "vae": self.vae,
                "image_size": self.image_size, "device": str(self.device), "precision": self.meta["precision"],
                "conditional": bool(self.class_names), "latent_channels": self.latent_channels,
                "classes": [{"id": i, "name": n} for i, n in enumerate(self.class_names)],
                "objective": self.diffusion.objective, "samplers": list(self.samplers),
                "guide": None if self.meta["guide"] is None else self.meta["guide"]["checkpoint"]}

    @property
    def name(self) -> str:
        """E.g. "DiT depth 4, width 128, patch 2, 8x8 pixel"."""
        c = self.config
        return (f"DiT depth {c['depth']}, width {c['hidden_size']}, patch {c['patch_size']}, "
                f"{self.image_size}x{self.image_size} {'pixel' if self.pixel else 'latent'}")
