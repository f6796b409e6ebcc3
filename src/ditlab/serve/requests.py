"""What a client may ask `ditlab serve` for: the limits, and a request body parsed into a
`SampleRequest` or refused with a one-line message naming the field. Nothing a client sends
reaches the file system: a request is numbers, a sampler name and class ids."""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any

from ditlab.options import MAX_CFG_SCALE

MAX_SEED = 2**63 - 1
FORMATS = ("png", "json", "stream")  # image/png; JSON with a base64 PNG; NDJSON progress lines, then that JSON
FIELDS = ("classes", "per_class", "cfg_scale", "sampler", "steps", "seed", "guidance_channels", "guidance_interval",
          "guidance_t", "guide", "format")


@dataclass(kw_only=True)
class Limits:
    """Bounds on what one request, and the queue, may hold (the `ditlab serve` flags)."""

    max_steps: int = 250
    """Most sampling steps a request may ask for (the paper's DDPM count)."""
    max_images: int = 64
    """Most images in one request (classes x per_class); also the most images of one model batch."""
    max_queue: int = 32
    """Most requests waiting to run; beyond it a request gets 503 with Retry-After."""
    max_body_bytes: int = 16384
    """Largest request body accepted (413 beyond it)."""
    max_cfg_scale: float = field(default=20.0, metadata={"min": 1.0, "max": MAX_CFG_SCALE})
    """Largest classifier-free guidance scale."""


@dataclass(kw_only=True)
class Defaults:
    """What the page starts with and what a request leaves out gets."""

    per_class: int = 4
    cfg_scale: float = 4.0
    sampler: str | None = None  # None: the first of the checkpoint's process's (ddpm; flow: euler)
    steps: int = 250


@dataclass(kw_only=True)
class SampleRequest:
    """One validated request: images are (label classes[k], index i) for i in 0..n-1, class
    k = i // per_class, all from `seed` (unconditional: `per_class` images, classes empty)."""

    classes: list[int]
    per_class: int
    cfg_scale: float
    sampler: str
    steps: int
    seed: int
    guidance_channels: int | None = None
    guidance_interval: list[float] | None = None
    """guide where the EDM noise level sigma lies in (lo, hi]"""
    guidance_t: list[float] | None = None
    """guide where the process's t lies in [lo, hi]"""
    guide: bool = False
    """autoguidance with the server's guide model (--guide-ckpt) instead of the null label"""
    format: str = "png"
    labels: list[int] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.labels = [c for c in self.classes for _ in range(self.per_class)] if self.classes else None

    @property
    def num_images(self) -> int:
        return len(self.classes) * self.per_class if self.classes else self.per_class

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share a model batch (see `batcher.py`)."""
        interval = None if self.guidance_interval is None else tuple(self.guidance_interval)
        t_interval = None if self.guidance_t is None else tuple(self.guidance_t)
        return (self.sampler, self.steps, self.cfg_scale, self.guidance_channels, interval, t_interval, self.guide)

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("format", "labels")}


class BadRequest(ValueError):
    """A request the server refuses: HTTP `status` with a one-line message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _int(body: dict[str, Any], name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name}: {json.dumps(value)} is not an integer")
    if not low <= value <= high:
        raise BadRequest(f"{name}: {value} is out of range [{low}, {high}]")
    return value


def _class_id(value: Any, names: list[str]) -> int:
    """A class given as its id (an int, or a string of digits) or its name (case-insensitive;
    the full name or one of its comma-separated parts, as long as that picks one class)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(names):
            return value
        raise BadRequest(f"classes: {value} is not a class id (0 to {len(names) - 1})")
    if not isinstance(value, str):
        raise BadRequest(f"classes: {json.dumps(value)} is neither a class id nor a name")
    if value.strip().isascii() and value.strip().isdigit():  # "²" is a digit to str.isdigit, not to int()
        return _class_id(int(value), names)
    key = value.strip().lower()
    hits = [i for i, n in enumerate(names) if n.lower() == key]
    hits = hits or [i for i, n in enumerate(names) if key in (p.strip().lower() for p in n.split(","))]
    if len(hits) == 1:
        return hits[0]
    shown = json.dumps(value[:60])
    if hits:
        raise BadRequest(f"classes: {shown} names classes {', '.join(map(str, hits))}; give the id")
    raise BadRequest(f"classes: unknown class {shown}")


def _interval(obj: dict[str, Any], name: str) -> list[float] | None:
    """[lo, hi] of two numbers (hi null: no upper end), checked as `Guidance` checks it."""
    from ditlab.diffusion.guidance import Guidance
    from ditlab.errors import UserError

    value = obj.get(name)
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 2 or isinstance(value[0], bool) or isinstance(value[1], bool)
            or not isinstance(value[0], int | float) or not (value[1] is None or isinstance(value[1], int | float))):
        raise BadRequest(f"{name}: {json.dumps(value)[:60]} is not [lo, hi], two numbers")
    pair = [float(value[0]), math.inf if value[1] is None else float(value[1])]
    try:
        Guidance(**{"interval" if name == "guidance_interval" else "t_interval": pair})
    except UserError as e:
        raise BadRequest(f"{name}: {e}") from e
    return pair


def parse_request(body: bytes, names: list[str], limits: Limits, defaults: Defaults, samplers: tuple[str, ...],
                  latent_channels: int, has_guide: bool = False) -> SampleRequest:
    """The request in `body` (JSON) for a model with class `names` (empty: unconditional), served with a
    guide model for autoguidance or not."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"body: not valid JSON ({e})") from e
    except RecursionError as e:  # thousands of nested brackets: no request needs more than two levels
        raise BadRequest("body: JSON nested too deeply") from e
    if not isinstance(obj, dict):
        raise BadRequest("body: expected a JSON object")
    unknown = [k for k in obj if k not in FIELDS]
    if unknown:
        raise BadRequest(f"{str(unknown[0])[:40]}: unknown field (known: {', '.join(FIELDS)})")
    classes = obj.get("classes", [])
    if not isinstance(classes, list):
        raise BadRequest("classes: expected a list of class ids or names")
    if names and not classes:
        raise BadRequest("classes: give at least one class")
    if not names and classes:
        raise BadRequest("classes: this model is unconditional; leave classes out")
    if len(classes) > limits.max_images:
        raise BadRequest(f"classes: {len(classes)} classes, more than the {limits.max_images} images of a request")
    ids = [_class_id(c, names) for c in classes]
    per_class = _int(obj, "per_class", defaults.per_class, 1, limits.max_images)
    if len(ids) * per_class > limits.max_images:
        raise BadRequest(f"per_class: {len(ids)} classes x {per_class} = {len(ids) * per_class} images, "
                         f"more than {limits.max_images}")
    sampler = obj.get("sampler", defaults.sampler or samplers[0])  # the process's first by default
    if sampler not in samplers:
        raise BadRequest(f"sampler: {json.dumps(sampler)[:40]} is not one of {', '.join(samplers)}")
    steps = _int(obj, "steps", defaults.steps, 1, limits.max_steps)
    cfg = obj.get("cfg_scale", defaults.cfg_scale if names else 1.0)
    if isinstance(cfg, bool) or not isinstance(cfg, int | float) or not math.isfinite(cfg):
        raise BadRequest(f"cfg_scale: {json.dumps(cfg)[:40]} is not a number")
    if not 0.0 <= cfg <= limits.max_cfg_scale:
        raise BadRequest(f"cfg_scale: {cfg} is out of range [0, {limits.max_cfg_scale}]")
    if not names and cfg != 1.0:
        raise BadRequest(f"cfg_scale: {cfg}; an unconditional model has no guidance (use 1)")
    seed = obj.get("seed", "random")
    seed = secrets.randbelow(2**31) if seed in ("random", None) else _int(obj, "seed", None, 0, MAX_SEED)
    channels = _int(obj, "guidance_channels", None, 1, latent_channels)
    interval, t_interval = _interval(obj, "guidance_interval"), _interval(obj, "guidance_t")
    if interval is not None and t_interval is not None:
        raise BadRequest("guidance_t: give guidance_interval (in sigma) or guidance_t (in t), not both")
    guide = obj.get("guide", False)
    if not isinstance(guide, bool):
        raise BadRequest(f"guide: {json.dumps(guide)[:40]} is not true or false")
    if guide and not has_guide:
        raise BadRequest("guide: this server has no guide model (start it with --guide-ckpt)")
    fmt = obj.get("format", "png")
    if fmt not in FORMATS:
        raise BadRequest(f"format: {json.dumps(fmt)[:40]} is not one of {', '.join(FORMATS)}")
    return SampleRequest(classes=ids, per_class=per_class, cfg_scale=float(cfg), sampler=sampler, steps=steps,
                         seed=seed, guidance_channels=channels, guidance_interval=interval, guidance_t=t_interval,
                         guide=guide, format=fmt)
