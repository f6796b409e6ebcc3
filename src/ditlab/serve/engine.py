"""The model side of `ditlab serve`: one checkpoint loaded once, and a batch of requests sampled
in one call of `ditlab.sampling.generate`, each image with its own (seed, index) generator, so
that an image is what the same request gives alone (bitwise where the kernels give a row the same
bits in any batch size; see README, "Sampling and checkpoints")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ditlab.errors import UserError
from ditlab.serve.requests import SampleRequest


class BatchCancelled(Exception):
    """Raised from the step callback to stop a batch whose every request has gone."""


class StepCounter(torch.nn.Module):
    """The sampling model with a callback after every forward (one per sampling step: the guided
    sampler evaluates both halves in one call); the callback may raise to stop the batch."""

    def __init__(self, model: torch.nn.Module, on_step: Callable[[], None]):
        super().__init__()
        self.model, self.on_step = model, on_step
        self.num_classes, self.null_class = model.num_classes, model.null_class
        self.eval()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model(x, t, y)  # (N, 2C or C, H, W)
        self.on_step()
        return out


def _train_config(path: str) -> dict[str, Any] | None:
    """The `ditlab train` config stored in a ditlab checkpoint (memory-mapped: nothing else is read)."""
    from pathlib import Path

    from ditlab.checkpoints.state import torch_load

    obj = torch_load(Path(path).expanduser())
    config = obj.get("config") if isinstance(obj, dict) else None
    return config if isinstance(config, dict) else None


class Engine:
    """A checkpoint (any format `ditlab sample` reads) ready to sample on `device`."""

    def __init__(self, ckpt: str, *, vae: str | None = None, weights: str = "ema", model: str | None = None,
                 precision: str = "auto", device: str | None = None):
        from ditlab.checkpoints.formats import build_model, read_checkpoint
        from ditlab.data.codecs import DEFAULT_VAE, PIXEL, load_codec
        from ditlab.diffusion import Diffusion
        from ditlab.options import PRECISIONS
        from ditlab.runtime.precision import resolve_precision
        from ditlab.sampling.run import AutocastModel
        from ditlab.serve.classes import class_names

        if precision not in PRECISIONS:
            raise UserError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        checkpoint = read_checkpoint(ckpt, weights=weights, model=model)
        cfg = checkpoint.config
        amp = resolve_precision(precision, self.device)
        self.vae = vae or checkpoint.vae or DEFAULT_VAE
        self.codec = load_codec(self.vae, device=self.device, pixel_channels=cfg["in_channels"],
                                dtype=amp if precision in ("bf16", "fp16") else torch.float32)
        if self.codec.latent_channels != cfg["in_channels"]:
            raise UserError(f"--vae {self.vae} makes {self.codec.latent_channels}-channel latents, but "
                             f"{checkpoint.source} takes {cfg['in_channels']} channels")
        self.pixel = self.vae == PIXEL  # x_0 predictions clipped to [-1, 1], as `ditlab sample` does
        self.config = dict(cfg)
        self.latent_shape = (cfg["in_channels"], cfg["input_size"], cfg["input_size"])
        self.image_size = cfg["input_size"] * self.codec.downsample
        train_config = _train_config(ckpt) if checkpoint.format == "ditlab" else None
        self.class_names = class_names(cfg["num_classes"], train_config, checkpoint.extra.get("class_names"))
        net: torch.nn.Module = build_model(checkpoint, self.device)
        self.net = AutocastModel(net, amp).eval() if amp is not None else net
        self.diffusion = Diffusion(learn_sigma=cfg["learn_sigma"])
        from pathlib import Path

        from ditlab.sampling.record import weights_sha256
        from ditlab.sampling.run import AUTOCAST_NAMES

        self.meta = {"checkpoint": str(ckpt), "checkpoint_format": checkpoint.format, "weights": checkpoint.weights,
                     "config": self.config, "vae": self.vae, "precision": precision, "image_size": self.image_size,
                     "class_names": self.class_names, "device": str(self.device),
                     "checkpoint_file": str(Path(checkpoint.source).resolve()),
                     "weights_sha256": weights_sha256(checkpoint.state_dict), "autocast": AUTOCAST_NAMES[amp]}

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
            labels = torch.tensor([c for r in requests for c in r.labels], dtype=torch.long)  # (N,)
        from ditlab.sampling.generate import generate, quantize

        with torch.inference_mode():
            images = generate(StepCounter(self.net, on_step), self.diffusion, labels, seeds, indices,
                              latent_shape=self.latent_shape, codec=self.codec, device=self.device,
                              steps=first.steps, sampler=first.sampler, cfg_scale=first.cfg_scale,
                              guidance_channels=first.guidance_channels, clip_denoised=self.pixel)
            pixels = quantize(images).cpu().numpy()  # (N, H, W, C) uint8
        bounds = np.cumsum([0] + [r.num_images for r in requests])
        return [pixels[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def info(self) -> dict[str, Any]:
        """What GET /api/info tells about the model (limits and defaults are added by the app)."""
        from ditlab.options import SAMPLERS

        return {"name": self.name, "checkpoint": self.meta["checkpoint"],
                "checkpoint_format": self.meta["checkpoint_format"],
                "weights": self.meta["weights"], "config": self.config, "vae": self.vae,
                "image_size": self.image_size, "device": str(self.device), "precision": self.meta["precision"],
                "conditional": bool(self.class_names), "latent_channels": self.latent_channels,
                "classes": [{"id": i, "name": n} for i, n in enumerate(self.class_names)],
                "samplers": list(SAMPLERS)}

    @property
    def name(self) -> str:
        """E.g. "DiT depth 4, width 128, patch 2, 8x8 pixel"."""
        c = self.config
        return (f"DiT depth {c['depth']}, width {c['hidden_size']}, patch {c['patch_size']}, "
                f"{self.image_size}x{self.image_size} {'pixel' if self.pixel else 'latent'}")
