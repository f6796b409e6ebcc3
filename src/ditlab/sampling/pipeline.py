"""One checkpoint made ready to sample: the model (under autocast where the precision asks), the
codec, the process, the class names and what the protocol record says about them, all read once.
`ditlab sample`, `ditlab serve`, `ditlab demo` and `ditlab study` build their model here, and
turn labels, seeds and guidance into images with `SamplingPipeline.images`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ditlab.data.codecs import Codec
from ditlab.diffusion.guidance import Guidance
from ditlab.diffusion.protocol import Process
from ditlab.errors import UserError

NamesCheck = Callable[[list[str], str], None]  # (class names, checkpoint source) -> raises on a bad request


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


def default_device(device: torch.device | str | None) -> torch.device:
    """`device`, or cuda when available, else cpu."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@dataclass(kw_only=True)
class SamplingPipeline:
    """A DiT checkpoint (any format `checkpoints.formats` reads) ready to sample on `device`."""

    model: torch.nn.Module
    """the DiT in eval mode, behind `runtime.autocast.AutocastModel` when the precision autocasts"""
    codec: Codec
    process: Process
    class_names: list[str]
    """index = label; empty for an unconditional model"""
    config: dict[str, Any]
    """the DiT's constructor arguments"""
    device: torch.device
    record_fields: dict[str, Any] = field(default_factory=dict)
    """the protocol record's model part (`sampling.record.MODEL_KEYS`): what was loaded and how it runs"""
    source: str = ""
    """the file or folder read"""

    @classmethod
    def from_checkpoint(cls, ckpt: str, *, vae: str | None = None, weights: str = "ema", model: str | None = None,
                        precision: str = "auto", device: torch.device | str | None = None,
                        check_names: NamesCheck | None = None) -> SamplingPipeline:  # fmt: skip
        """Read `ckpt` (a path or a released name) once: its `weights` ("ema" or "model"), `model` the
        named config that gives the authors' state dicts their heads, `vae` the codec (default: the
        one the checkpoint names, else the SD VAE), `precision` the DiT's autocast (the VAE runs as
        `runtime.precision.sampling_vae_dtype` says). `check_names(class_names, source)` runs before
        the codec loads, so that a bad --classes fails before a VAE is fetched."""
        from ditlab.checkpoints.formats import build_model, read_checkpoint
        from ditlab.data.classes import class_names
        from ditlab.data.codecs import DEFAULT_VAE, load_codec
        from ditlab.diffusion.protocol import process_from_record
        from ditlab.runtime.autocast import AUTOCAST_NAMES, AutocastModel
        from ditlab.runtime.precision import resolve_precision, sampling_vae_dtype
        from ditlab.sampling.record import weights_sha256

        run_device = default_device(device)
        checkpoint = read_checkpoint(ckpt, weights=weights, model=model)
        mc = dict(checkpoint.config)
        amp = resolve_precision(precision, run_device)
        names = class_names(mc["num_classes"], stored=checkpoint.extra.get("class_names"))
        if check_names is not None:
            check_names(names, checkpoint.source)
        spec = vae or checkpoint.vae or DEFAULT_VAE
        codec = load_codec(spec, device=run_device, dtype=sampling_vae_dtype(precision),
                           pixel_channels=mc["in_channels"])
        if codec.latent_channels != mc["in_channels"]:
            raise UserError(f"--vae {spec} makes {codec.latent_channels}-channel latents, but {checkpoint.source} "
                            f"takes {mc['in_channels']} channels")
        fields = {"checkpoint": str(ckpt), "checkpoint_file": str(Path(checkpoint.source).resolve()),
                  "checkpoint_format": checkpoint.format, "weights": checkpoint.weights,
                  "weights_sha256": weights_sha256(checkpoint.state_dict), "model_config": mc, "vae": spec,
                  "precision": precision, "autocast": AUTOCAST_NAMES[amp], "device": run_device.type,
                  "image_size": mc["input_size"] * codec.downsample}
        process = process_from_record({"learn_sigma": mc["learn_sigma"], **checkpoint.extra.get("process", {})})
        net: torch.nn.Module = build_model(checkpoint, run_device)
        source = checkpoint.source
        del checkpoint  # the weights now live in `net`: hold no second copy
        if amp is not None:
            net = AutocastModel(net, amp).eval()
        return cls(model=net, codec=codec, process=process, class_names=names, config=mc, device=run_device,
                   record_fields=fields, source=source)

    @classmethod
    def from_model(cls, model: torch.nn.Module, process: Process, *, vae: str, class_names: list[str],
                   precision: str = "auto", device: torch.device | str | None = None,
                   codec: Codec | None = None) -> SamplingPipeline:  # fmt: skip
        """A DiT held in memory (a training run's EMA, in eval mode) made ready to sample as
        `from_checkpoint` makes the same weights read from a file: autocast as `precision` says, the
        codec `vae` loaded as there (or `codec`, one so loaded before)."""
        from ditlab.data.codecs import load_codec
        from ditlab.runtime.autocast import AUTOCAST_NAMES, AutocastModel
        from ditlab.runtime.precision import resolve_precision, sampling_vae_dtype

        run_device = default_device(device)
        mc: dict[str, Any] = dict(getattr(model, "config"))  # noqa: B009  (a DiT's constructor arguments)
        amp = resolve_precision(precision, run_device)
        if codec is None:
            codec = load_codec(vae, device=run_device, dtype=sampling_vae_dtype(precision),
                               pixel_channels=mc["in_channels"])
        net = AutocastModel(model, amp).eval() if amp is not None else model
        fields = {"model_config": mc, "vae": vae, "precision": precision, "autocast": AUTOCAST_NAMES[amp],
                  "device": run_device.type, "image_size": mc["input_size"] * codec.downsample}
        return cls(model=net, codec=codec, process=process, class_names=class_names, config=mc, device=run_device,
                   record_fields=fields, source="the training run's EMA")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the model's input."""
        c = self.config
        return (c["in_channels"], c["input_size"], c["input_size"])

    @property
    def image_size(self) -> int:
        return self.config["input_size"] * self.codec.downsample

    @property
    def image_channels(self) -> int:
        return self.codec.image_channels

    @property
    def pixel(self) -> bool:
        """Pixel space: x_0 predictions are clipped to the [-1, 1] of images."""
        from ditlab.data.codecs import PIXEL

        return self.codec.spec == PIXEL

    @property
    def vae(self) -> str:
        """The codec's spec ("pixel", a hub id or a folder)."""
        return str(self.record_fields["vae"])

    def images(self, labels: torch.Tensor | None, seed: int | list[int], indices: list[int] | range, *,
               guidance: Guidance = Guidance(), sampler: str | None = None, steps: int | None = None,
               on_step: Callable[[], None] | None = None, progress: bool = False) -> torch.Tensor:  # fmt: skip
        """Images (N, C, H, W) in about [-1, 1]: image j is image indices[j] of the run seeded `seed`
        (or seed[j]), of class labels[j] (labels None: unconditional). `sampler` and `steps` default
        to the process's; `on_step` is called after every model evaluation (it may raise to stop)."""
        from ditlab.sampling.generate import generate

        model = self.model if on_step is None else StepCounter(self.model, on_step)
        return generate(model, self.process, labels, seed, indices, latent_shape=self.latent_shape,
                        codec=self.codec, device=self.device, steps=steps, sampler=sampler, guidance=guidance,
                        clip_denoised=self.pixel, progress=progress)
