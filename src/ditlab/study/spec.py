"""A study spec: one TOML file naming the data, the training budget, the runs and how each is judged.

TOML because Python reads it with the standard library (`tomllib`, no dependency), it has comments,
and its values are typed without YAML's guesses (`no` is a string, not False). The tables:

- `name`, `[data]` (`data`, `image_size`, ... any run-defining setting of `ditlab train`),
  `[train]` (`eval_steps` and the `ditlab train` settings shared by every run),
- `[sizes]` custom model sizes (`S = {depth = 2, hidden_size = 64, num_heads = 2}`) beside the
  paper's S/B/L/XL,
- `[[grid]]` tables of `sizes` x `patch_sizes` x `blocks` x `seeds`, each combination one entry,
- `[eval]` how each evaluation point is judged (metric, samples, sampler, steps, guidance, seeds),
- `[sweep]` (optional) sampling step counts for some entries at their last evaluation point.
String values may name environment variables (`"${IMAGENET_LATENTS}"`)."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditlab.data.named import NAMED_DATA
from ditlab.errors import UserError, UserFileNotFoundError
from ditlab.models.configs import SIZES
from ditlab.training.config import TrainConfig

METRICS = ("digits", "fashion-mnist", "fid")  # a dataset's judge (Frechet distance, accuracy, ...); ADM's FID suite
LABELS = ("balanced", "random")
# Lower is better for every primary metric: a judge's Frechet distance, ADM's FID.
PRIMARY = {"digits": "frechet_distance", "fashion-mnist": "frechet_distance", "fid": "fid"}
# Settings of an entry that the spec does not set through [train]: they come from the grid.
PER_ENTRY = ("data", "results", "model", "depth", "hidden_size", "num_heads", "patch_size", "block", "seed",
             "max_steps", "epochs", "progress")
EVAL_KEYS = {"metric", "num_samples", "labels", "seeds", "sampler", "steps", "cfg_scales", "batch_size",
             "keep_samples", "ref", "inception", "guidance_channels"}
SWEEP_KEYS = {"entries", "steps", "sampler", "seeds", "num_samples", "cfg_scale"}
GRID_KEYS = {"sizes", "patch_sizes", "blocks", "seeds"}


def _fail(where: str, message: str) -> None:
    raise UserError(f"{where}: {message}")


@dataclass(frozen=True)
class EvalSetting:
    """One way of sampling and judging a checkpoint: a sample file and its metrics."""

    sampler: str
    steps: int
    cfg_scale: float
    num_samples: int
    seed: int
    labels: str

    @property
    def key(self) -> str:
        """File stem of its samples and metrics, e.g. ddpm-100-cfg1-n200-balanced-seed0."""
        return f"{self.sampler}-{self.steps}-cfg{self.cfg_scale:g}-n{self.num_samples}-{self.labels}-seed{self.seed}"


@dataclass(frozen=True)
class Entry:
    """One training run of the study and its place in the grid."""

    name: str
    size: str
    patch_size: int
    block: str
    seed: int
    model: dict[str, int]
    """depth, hidden_size, num_heads of its size."""
    train: dict[str, Any]
    """The shared `ditlab train` settings (everything of TrainConfig but results and max_steps)."""

    def train_config(self, results: Path, max_steps: int, progress: bool) -> TrainConfig:
        return TrainConfig(**self.train, results=str(results), max_steps=max_steps, progress=progress,
                           model="DiT-S/2", patch_size=self.patch_size, block=self.block, seed=self.seed,
                           **self.model)  # fmt: skip


@dataclass(frozen=True)
class EvalSpec:
    metric: str
    num_samples: int
    labels: str
    seeds: tuple[int, ...]
    sampler: str
    steps: int
    cfg_scales: tuple[float, ...]
    batch_size: int
    keep_samples: bool
    ref: str | None
    inception: str | None
    guidance_channels: int | None


@dataclass(frozen=True)
class SweepSpec:
    entries: tuple[str, ...]
    steps: tuple[int, ...]
    sampler: str
    seeds: tuple[int, ...]
    num_samples: int
    cfg_scale: float


@dataclass(frozen=True)
class Study:
    """A parsed and checked spec."""

    name: str
    path: str
    eval_steps: tuple[int, ...]
    entries: dict[str, Entry]
    eval: EvalSpec
    sweep: SweepSpec | None = None
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)

    def settings(self, entry: str, step: int) -> list[EvalSetting]:
        """Every evaluation of `entry` at training step `step` (the sweep's at the last point)."""
        e = self.eval
        out = [EvalSetting(e.sampler, e.steps, c, e.num_samples, s, e.labels) for c in e.cfg_scales for s in e.seeds]
        if self.sweep and entry in self.sweep.entries and step == self.eval_steps[-1]:
            w = self.sweep
            out += [EvalSetting(w.sampler, n, w.cfg_scale, w.num_samples, s, e.labels) for n in w.steps
                    for s in w.seeds]  # fmt: skip
        return list(dict.fromkeys(out))  # a sweep point equal to the main setting is done once

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _expand(value: Any) -> Any:
    """${VAR} in strings replaced by the environment; an unset variable is an error."""
    if not isinstance(value, str):
        return value
    for var in re.findall(r"\$\{(\w+)\}", value):
        if var not in os.environ:
            raise UserError(f"the spec names ${{{var}}}, which is not set in the environment")
        value = value.replace(f"${{{var}}}", os.environ[var])
    return value


def _ints(where: str, value: Any, low: int = 0) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and v >= low for v in value):
        _fail(where, f"{value!r} must be a non-empty list of integers >= {low}")
    return tuple(value)


def _unknown(where: str, table: dict[str, Any], known: set[str]) -> None:
    extra = sorted(set(table) - known)
    if extra:
        _fail(where, f"unknown key {extra[0]!r} (known: {', '.join(sorted(known))})")


def _sizes(where: str, table: dict[str, Any]) -> dict[str, dict[str, int]]:
    sizes = {k: dict(v) for k, v in SIZES.items()}
    for name, d in table.items():
        if not isinstance(d, dict) or set(d) != {"depth", "hidden_size", "num_heads"}:
            _fail(f"{where} [sizes] {name}", "give exactly depth, hidden_size and num_heads")
        if not all(isinstance(v, int) and v > 0 for v in d.values()) or d["hidden_size"] % d["num_heads"]:
            _fail(f"{where} [sizes] {name}", f"{d}: positive integers, hidden_size divisible by num_heads")
        sizes[name] = dict(d)
    return sizes


def _train_settings(where: str, data: dict[str, Any], train: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(TrainConfig)} - set(PER_ENTRY)
    shared = {**{k: _expand(v) for k, v in data.items()}, **train}
    _unknown(f"{where} [data]/[train]", {k: v for k, v in shared.items() if k != "data"}, names)
    if "data" not in data:
        _fail(f"{where} [data]", "give data = 'digits', 'fashion-mnist', an image folder or a latent cache")
    settings = {"ckpt_every": 10**9, "sample_every": 0, **shared}
    try:  # TrainConfig's own checks, on a stand-in entry
        TrainConfig(**settings, results="", max_steps=1).validate()
    except (TypeError, ValueError) as e:
        _fail(f"{where} [train]", str(e))
    return settings


def _entries(where: str, grids: list[Any], sizes: dict[str, dict[str, int]], train: dict[str, Any]) -> dict[str, Entry]:
    from ditlab.models.blocks import BLOCKS

    entries: dict[str, Entry] = {}
    if not isinstance(grids, list) or not grids:
        _fail(where, "give at least one [[grid]] table of runs")
    for i, g in enumerate(grids):
        at = f"{where} [[grid]] #{i + 1}"
        _unknown(at, g, GRID_KEYS)
        names = g.get("sizes", [])
        if not isinstance(names, list) or not names or any(n not in sizes for n in names):
            _fail(at, f"sizes {names!r}: a non-empty list of {', '.join(sizes)}")
        blocks = g.get("blocks", ["adaln-zero"])
        if not isinstance(blocks, list) or any(b not in BLOCKS for b in blocks):
            _fail(at, f"blocks {blocks!r}: a list of {', '.join(BLOCKS)}")
        for size in names:
            for p in _ints(f"{at} patch_sizes", g.get("patch_sizes"), 1):
                for block in blocks:
                    for seed in _ints(f"{at} seeds", g.get("seeds", [0])):
                        name = f"DiT-{size}-{p}" + ("" if block == "adaln-zero" else f"-{block}") + \
                               ("" if seed == 0 else f"-seed{seed}")
                        entries[name] = Entry(name, size, p, block, seed, sizes[size], train)
    return entries


def _sampling(where: str, sampler: Any, steps: Any) -> None:
    from ditlab.options import SAMPLERS

    if sampler not in SAMPLERS:
        _fail(where, f"sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    for n in steps:
        if not isinstance(n, int) or not 1 <= n <= 1000:
            _fail(where, f"steps {n!r} must be between 1 and 1000")


def _eval(where: str, t: dict[str, Any], data: str) -> EvalSpec:
    at = f"{where} [eval]"
    _unknown(at, t, EVAL_KEYS)
    metric = t.get("metric", "fid")
    if metric not in METRICS:
        _fail(at, f"metric {metric!r}: choose one of {', '.join(METRICS)}")
    if metric == "digits" and data != "digits":
        _fail(at, "metric 'digits' judges the bundled digits: set data = 'digits' or metric = 'fid'")
    if metric == "fashion-mnist" and data != "fashion-mnist" and not Path(data).is_dir():
        _fail(at, "metric 'fashion-mnist' judges Fashion-MNIST: set data = 'fashion-mnist' (or a folder of its IDX "
                  "files)")
    ref = _expand(t.get("ref"))
    if metric == "fid" and not ref:
        _fail(at, "metric 'fid' needs ref = a reference batch (e.g. VIRTUAL_imagenet256_labeled.npz)")
    labels = t.get("labels", "random")
    if labels not in LABELS:
        _fail(at, f"labels {labels!r}: choose one of {', '.join(LABELS)}")
    scales = t.get("cfg_scales", [1.0])
    if not isinstance(scales, list) or not scales or not all(isinstance(s, int | float) and s > 0 for s in scales):
        _fail(at, f"cfg_scales {scales!r}: a non-empty list of positive numbers")
    spec = EvalSpec(metric=metric, num_samples=t.get("num_samples", 50_000), labels=labels,
                    seeds=_ints(f"{at} seeds", t.get("seeds", [0, 1])), sampler=t.get("sampler", "ddpm"),
                    steps=t.get("steps", 250), cfg_scales=tuple(float(s) for s in scales),
                    batch_size=t.get("batch_size", 32), keep_samples=bool(t.get("keep_samples", True)), ref=ref,
                    inception=_expand(t.get("inception")), guidance_channels=t.get("guidance_channels"))
    _sampling(at, spec.sampler, [spec.steps])
    for name in ("num_samples", "batch_size"):
        if not isinstance(getattr(spec, name), int) or getattr(spec, name) < 1:
            _fail(at, f"{name} {getattr(spec, name)!r} must be a positive integer")
    return spec


def _sweep(where: str, t: dict[str, Any] | None, entries: dict[str, Entry], ev: EvalSpec) -> SweepSpec | None:
    if t is None:
        return None
    at = f"{where} [sweep]"
    _unknown(at, t, SWEEP_KEYS)
    names = t.get("entries", [])
    missing = [n for n in names if n not in entries] if isinstance(names, list) else [names]
    if not names or missing:
        _fail(at, f"entries: {missing[0] if missing else 'none given'} is not an entry (entries: {', '.join(entries)})")
    spec = SweepSpec(entries=tuple(names), steps=_ints(f"{at} steps", t.get("steps"), 1),
                     sampler=t.get("sampler", ev.sampler), seeds=_ints(f"{at} seeds", t.get("seeds", list(ev.seeds))),
                     num_samples=t.get("num_samples", ev.num_samples), cfg_scale=float(t.get("cfg_scale", 1.0)))
    _sampling(at, spec.sampler, spec.steps)
    return spec


def load_spec(path: str | os.PathLike) -> Study:
    """Read and check a study spec; every mistake is one line naming the file and the table."""
    import tomllib

    where = str(path)
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise UserFileNotFoundError(f"{where}: no such study spec") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: not a TOML file ({e})") from e
    _unknown(where, raw, {"name", "data", "train", "sizes", "grid", "eval", "sweep"})
    train = dict(raw.get("train", {}))
    eval_steps = _ints(f"{where} [train] eval_steps", train.pop("eval_steps", None), 1)
    if list(eval_steps) != sorted(set(eval_steps)):
        _fail(f"{where} [train]", f"eval_steps {list(eval_steps)} must increase")
    data = dict(raw.get("data", {}))
    settings = _train_settings(where, data, train)
    sizes = _sizes(where, raw.get("sizes", {}))
    entries = _entries(where, raw.get("grid", []), sizes, settings)
    named = NAMED_DATA.get(settings["data"])
    image = settings.get("image_size") or (named.image_size if named else 256)  # train's data defaults
    latent = image if named else None  # pixel space; image folders and caches: checked by train
    for e in entries.values():
        if latent is not None and latent % e.patch_size:
            _fail(f"{where} [[grid]]", f"patch size {e.patch_size} does not divide the {latent}x{latent} input")
    ev = _eval(where, raw.get("eval", {}), settings["data"])
    return Study(name=str(raw.get("name", Path(path).stem)), path=where, eval_steps=eval_steps, entries=entries,
                 eval=ev, sweep=_sweep(where, raw.get("sweep"), entries, ev), sizes=sizes)
