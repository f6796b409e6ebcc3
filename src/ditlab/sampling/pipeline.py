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

PROCESS_IDENTITY = ("objective", "num_timesteps", "schedule", "path", "prediction")
"""What a guide's process must share with the main model's (where the main's record has it)."""
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
                        check_names: NamesCheck | None = None,
                        objective: str | None = None) -> SamplingPipeline:  # fmt: skip
        """Read `ckpt` (a path or a released name) once: its `weights` ("ema" or "model"), `model` the
        named config that gives the authors' state dicts their heads, `vae` the codec (default: the
        one the checkpoint names, else the SD VAE), `precision` the DiT's autocast (the VAE runs as
        `runtime.precision.sampling_vae_dtype` says). `check_names(class_names, source)` runs before
        the codec loads, so that a bad --classes fails before a VAE is fetched. `objective` names the
        process of a file that records none (the authors' state dict): refused where the file says another."""
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
        process = process_from_record({"learn_sigma": mc["learn_sigma"],
                                       **checkpoint_process(checkpoint.extra.get("process"), objective, ckpt)})
        fields["process"] = process.to_record()
        net: torch.nn.Module = build_model(checkpoint, run_device)
        source = checkpoint.source
        del checkpoint  # the weights now live in `net`: hold no second copy
        if amp is not None:
            net = AutocastModel(net, amp).eval()
        return cls(model=net, codec=codec, process=process, class_names=names, config=mc, device=run_device,
                   record_fields=fields, source=source)

    def sampler_and_steps(self, sampler: str | None, steps: int | None) -> tuple[str, int]:
        """The sampler and steps a request gives, defaulting to the process's; a sampler of another
        objective is refused in one line naming both."""
        from ditlab.options import OBJECTIVE_SAMPLERS

        p = self.process
        if sampler is not None and sampler not in p.sampler_names:
            other = next((o for o, names in OBJECTIVE_SAMPLERS.items() if sampler in names), "another")
            raise UserError(f"--sampler {sampler} is a {other} sampler, but {self.source} is a {p.objective} "
                            f"checkpoint: choose one of {', '.join(p.sampler_names)}")
        return sampler or p.sampler_names[0], p.default_steps if steps is None else steps

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
                  "device": run_device.type, "image_size": mc["input_size"] * codec.downsample,
                  "process": process.to_record()}
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

    def load_guide(self, ckpt: str, *, weights: str = "ema", model: str | None = None,
                   flag: str = "--guide-ckpt") -> tuple[torch.nn.Module, dict[str, Any]]:  # fmt: skip
        """The guide model of autoguidance from `ckpt` (a path or a released name), any size, on this
        pipeline's device and under its autocast, and the record's "guide" entry (the file, its weights
        and their digest, its config). It must share the main model's latent shape, classes and process
        (objective, and its noise schedule or path): else one line naming `flag`."""
        from ditlab.checkpoints.formats import build_model, read_checkpoint
        from ditlab.diffusion.protocol import process_from_record
        from ditlab.runtime.autocast import AutocastModel
        from ditlab.sampling.record import weights_sha256

        checkpoint = read_checkpoint(ckpt, weights=weights, model=model)
        gc = dict(checkpoint.config)
        shape = (gc["in_channels"], gc["input_size"], gc["input_size"])
        if shape != self.latent_shape:
            raise UserError(f"{flag} {ckpt}: its model takes {shape[0]}-channel {shape[1]}x{shape[2]} latents, "
                            f"{self.source} {self.latent_shape[0]}-channel {self.latent_shape[1]}x"
                            f"{self.latent_shape[2]}: a guide must share the latent space")
        if gc["num_classes"] != self.config["num_classes"]:
            raise UserError(f"{flag} {ckpt}: {gc['num_classes']} classes, {self.source} {self.config['num_classes']}")
        ours = self.process.to_record()
        theirs = process_from_record({"learn_sigma": gc["learn_sigma"],
                                      **checkpoint.extra.get("process", {})}).to_record()  # fmt: skip
        for key in PROCESS_IDENTITY:
            if key in ours and ours.get(key) != theirs.get(key):
                raise UserError(f"{flag} {ckpt}: its {key} is {theirs.get(key)!r}, {self.source}'s {ours[key]!r}: "
                                f"a guide must be trained on the same process")
        entry = {"checkpoint": str(ckpt), "checkpoint_file": str(Path(checkpoint.source).resolve()),
                 "weights": checkpoint.weights, "weights_sha256": weights_sha256(checkpoint.state_dict),
                 "model_config": gc}
        net: torch.nn.Module = build_model(checkpoint, self.device)
        del checkpoint
        dtype = getattr(self.model, "dtype", None) if isinstance(self.model, AutocastModel) else None
        if dtype is not None:
            net = AutocastModel(net, dtype).eval()
        return net, entry

def checkpoint_process(stored: dict[str, Any] | None, objective: str | None, source: str) -> dict[str, Any]:
    """The process record of a checkpoint: what it stores, or {"objective": objective} for a file that stores
    none; an `objective` that contradicts the stored one is refused in one line."""
    if stored is None:
        return {} if objective is None else {"objective": objective}
    if objective is not None and objective != stored.get("objective", "ddpm"):
        raise UserError(f"--objective {objective}: {source} records objective {stored.get('objective', 'ddpm')!r}")
    return dict(stored)
