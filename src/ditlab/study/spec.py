"""A study spec: one TOML file naming the data, the training budget, the runs and how each is judged.

TOML because Python reads it with the standard library (`tomllib`, no dependency), it has comments,
and its values are typed without YAML's guesses (`no` is a string, not False). The tables:

- `name`, `[data]` (`data`, `image_size`, ... any run-defining setting of `ditlab train`),
  `[train]` (`eval_steps` and the `ditlab train` settings shared by every run),
- `[sizes]` custom model sizes (`S = {depth = 2, hidden_size = 64, num_heads = 2}`) beside the
  paper's S/B/L/XL,
- `[[grid]]` tables of `sizes` x `patch_sizes` x `blocks` x `seeds` x `objectives` ("ddpm", "flow")
  (and the modern block options `norms` x `qk_norms` x `mlps` x `positions`, each the paper's alone by
  default), each combination one entry, named after its non-default choices
  (`DiT-S-2-rmsnorm-swiglu-sincos+rope`); `flow = { time_sampling = "logit-normal", ... }` sets its flow
  entries' settings (`ditlab train`'s flow flags; [train] may set them for every flow entry),
- `[eval]` how each evaluation point is judged (metric, samples, sampler, steps, guidance, seeds;
  `flow_sampler` and `flow_steps` for flow entries: each entry is sampled by its own process; guidance
  may vary over `cfg_scales`, `guidance_intervals` ([lo, hi] in sigma) and `guide_steps`: the entry's own
  checkpoint at an earlier evaluation step as the guide of autoguidance, 0 for the null label),
- `[sweep]` (optional) sampling step counts for some entries at their last evaluation point (with one
  `cfg_scale`, `guidance_interval` and `guide_step`),
- `[ablation]` (optional, `study.ablation`): `baseline` names a grid entry; every entry is renamed from
  what differs from it (`DiT-B-2+flow+logit-normal+repa`), and with `equal_compute` (default true) each
  entry trains to the baseline's training compute (images x training Gflops per image) at every
  evaluation point, so its own steps are the baseline's scaled by the ratio of their costs,
- `[final]` (optional) guidance compared at each listed entry's last point only: `cfg_scales` x
  `guidance_intervals` x `guide_steps` (an earlier point of the entry itself) and `guide_entries`
  (another entry's last checkpoint: autoguidance by a smaller or less-trained model; each guides the
  listed entries of its own process).
A grid table's `repa = { encoder = ..., depth = K, coeff = L, width = W }` trains its entries with REPA.
String values may name environment variables (`"${IMAGENET_LATENTS}"`)."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditlab.data.named import NAMED_DATA
from ditlab.errors import UserError, UserFileNotFoundError, one_line
from ditlab.models.configs import SIZES
from ditlab.study.entry import Entry, setting_tag
from ditlab.training.config import FLOW_SETTINGS, TrainConfig

METRICS = ("digits", "fashion-mnist", "fid")  # a dataset's judge (Frechet distance, accuracy, ...); ADM's FID suite
LABELS = ("balanced", "random")
# Lower is better for every primary metric: a judge's Frechet distance, ADM's FID.
PRIMARY = {"digits": "frechet_distance", "fashion-mnist": "frechet_distance", "fid": "fid"}
# Settings of an entry that the spec does not set through [train]: they come from the grid.
PER_ENTRY = ("data", "results", "model", "depth", "hidden_size", "num_heads", "patch_size", "block", "seed",
             "max_steps", "epochs", "progress", "norm", "qk_norm", "mlp", "pos")
EVAL_KEYS = {"metric", "num_samples", "labels", "seeds", "sampler", "steps", "cfg_scales", "batch_size",
             "keep_samples", "ref", "inception", "guidance_channels", "guidance_intervals", "guide_steps",
             "flow_sampler", "flow_steps", "features", "dinov2"}
SWEEP_KEYS = {"entries", "steps", "sampler", "seeds", "num_samples", "cfg_scale", "guidance_interval", "guide_step",
              "flow_sampler"}
Interval = tuple[float, float] | None
# Grid keys of the modern block options -> the TrainConfig field each sets.
OPTION_GRID_KEYS = {"norms": "norm", "qk_norms": "qk_norm", "mlps": "mlp", "positions": "pos"}
GRID_KEYS = {"sizes", "patch_sizes", "blocks", "seeds", "objectives", "flow", "repa", *OPTION_GRID_KEYS}
REPA_KEYS = {"encoder": "repa_encoder", "depth": "repa_depth", "coeff": "repa_coeff", "width": "repa_width"}
FINAL_KEYS = {"entries", "cfg_scales", "guidance_intervals", "guide_steps", "guide_entries"}


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
    guidance_interval: Interval = None
    """guide only where sigma is in (lo, hi] (None: everywhere)"""
    guide_step: int | None = None
    """autoguidance by the entry's own checkpoint at this training step (None: the null label)"""
    guide_entry: str | None = None
    """autoguidance by this other entry's last checkpoint"""

    @property
    def key(self) -> str:
        """File stem of its samples and metrics, e.g. ddpm-100-cfg1-n200-balanced-seed0 (then -gi0.28-5.42,
        -guide200 where the guidance has an interval or a guide)."""
        key = f"{self.sampler}-{self.steps}-cfg{self.cfg_scale:g}-n{self.num_samples}-{self.labels}-seed{self.seed}"
        if self.guidance_interval is not None:
            key += f"-gi{self.guidance_interval[0]:g}-{self.guidance_interval[1]:g}"
        if self.guide_entry is not None:
            key += f"-guide-{self.guide_entry}"
        return key + ("" if self.guide_step is None else f"-guide{self.guide_step}")


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
    guidance_intervals: tuple[Interval, ...] = (None,)
    guide_steps: tuple[int | None, ...] = (None,)
    flow_sampler: str = "euler"
    """the sampler and steps of flow entries (`sampler` and `steps` are the DDPM entries')"""
    flow_steps: int = 250
    features: tuple[str, ...] = ("inception",)
    """metric "fid": the feature spaces of `ditlab eval --features` (inception, dinov2: FD-DINOv2)"""
    dinov2: str | None = None
    """metric "fid" with dinov2 features: a DINOv2 weights file or released name (default ViT-L/14)"""

    def sampling(self, objective: str) -> tuple[str, int]:
        """(sampler, steps) of an entry of `objective`."""
        return (self.flow_sampler, self.flow_steps) if objective == "flow" else (self.sampler, self.steps)


@dataclass(frozen=True)
class SweepSpec:
    entries: tuple[str, ...]
    steps: tuple[int, ...]
    sampler: str
    seeds: tuple[int, ...]
    num_samples: int
    cfg_scale: float
    guidance_interval: Interval = None
    guide_step: int | None = None
    flow_sampler: str = "euler"
    """the sampler of flow entries (`sampler` is the DDPM entries')"""


@dataclass(frozen=True)
class FinalSpec:
    """Guidance compared on the last checkpoints of `entries` (every combination, each sample seed)."""

    entries: tuple[str, ...]
    cfg_scales: tuple[float, ...]
    guidance_intervals: tuple[Interval, ...] = (None,)
    guide_steps: tuple[int | None, ...] = (None,)
    guide_entries: tuple[str, ...] = ()


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
    ablation: dict[str, Any] | None = None
    """{"baseline": entry name, "equal_compute": bool} where the spec has an [ablation] table."""
    final: FinalSpec | None = None

    def steps_of(self, entry: str) -> tuple[int, ...]:
        """The entry's evaluation points (training steps): its own at equal compute, else the study's."""
        return self.entries[entry].eval_steps or self.eval_steps

    def own_step(self, entry: str, step: int | None) -> int | None:
        """A step named in the spec (one of the study's eval_steps) as the entry's step at the same point."""
        return None if step is None else self.steps_of(entry)[self.eval_steps.index(step)]

    def settings(self, entry: str, step: int) -> list[EvalSetting]:
        """Every evaluation of `entry` at training step `step` (the sweep's and [final]'s at its last point)."""
        e, flow = self.eval, self.entries[entry].objective == "flow"
        sampler, steps = e.sampling(self.entries[entry].objective)
        last = step == self.steps_of(entry)[-1]
        def guided(scales: tuple[float, ...], intervals: tuple[Interval, ...],
                   guides: tuple[int | None, ...]) -> list[EvalSetting | None]:  # fmt: skip
            """Every scale x interval x guide step x sample seed, as it samples at `step`."""
            return [_guided(EvalSetting(sampler, steps, c, e.num_samples, s, e.labels, i, self.own_step(entry, g)),
                            step) for c in scales for i in intervals for g in guides for s in e.seeds]  # fmt: skip

        out = guided(e.cfg_scales, e.guidance_intervals, e.guide_steps)
        if self.final and last and entry in self.final.entries:
            f = self.final
            out += guided(f.cfg_scales, f.guidance_intervals, f.guide_steps)
            out += [EvalSetting(sampler, steps, c, e.num_samples, s, e.labels, i, None, guide)
                    for c in f.cfg_scales if c != 1.0 for i in f.guidance_intervals for guide in f.guide_entries
                    if self.entries[guide].objective == self.entries[entry].objective for s in e.seeds]  # fmt: skip
        if self.sweep and entry in self.sweep.entries and last:
            w = self.sweep
            out += [_guided(EvalSetting(w.flow_sampler if flow else w.sampler, n, w.cfg_scale, w.num_samples, s,
                                        e.labels, w.guidance_interval, self.own_step(entry, w.guide_step)), step)
                    for n in w.steps for s in w.seeds]  # fmt: skip
        return list(dict.fromkeys(o for o in out if o is not None))  # equal settings are done once

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _guided(setting: EvalSetting, step: int) -> EvalSetting | None:
    """The setting as it samples: unguided (scale 1) has no interval or guide; a guide must be an earlier
    checkpoint than the evaluated one (None: the setting does not apply at `step`)."""
    if setting.cfg_scale == 1.0:
        return dataclasses.replace(setting, guidance_interval=None, guide_step=None)
    if setting.guide_step is not None and setting.guide_step >= step:
        return None
    return setting


def _scales(at: str, value: Any) -> tuple[float, ...]:
    """cfg_scales: a non-empty list of positive numbers."""
    if not isinstance(value, list) or not value or not all(isinstance(s, int | float) and s > 0 for s in value):
        _fail(at, f"cfg_scales {value!r}: a non-empty list of positive numbers")
    return tuple(float(s) for s in value)


def _intervals(where: str, value: Any) -> tuple[Interval, ...]:
    """[[lo, hi], ...] in sigma (inf allowed: TOML's inf), 0 <= lo <= hi."""
    if not isinstance(value, list) or not value:
        _fail(where, f"{value!r} must be a non-empty list of [lo, hi] pairs")
    return tuple(_interval(where, v) for v in value)


def _interval(where: str, v: Any) -> Interval:
    ok = isinstance(v, list) and len(v) == 2 and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
    if not ok or not 0 <= v[0] <= v[1]:
        _fail(where, f"{v!r} must be [lo, hi] with 0 <= lo <= hi (sigma; inf for no upper end)")
    return float(v[0]), float(v[1])


def _guide_steps(where: str, value: Any, eval_steps: tuple[int, ...]) -> tuple[int | None, ...]:
    """Training steps of an entry's guide checkpoints: evaluation points (their checkpoints exist); 0: none."""
    steps = _ints(where, value)
    for s in steps:
        if s and s not in eval_steps:
            _fail(where, f"{s}: a guide must be a checkpoint at an evaluation step ({', '.join(map(str, eval_steps))})"
                         f" or 0 (the null label)")
    return tuple(s or None for s in steps)


def _expand(value: Any) -> Any:
    """${VAR} in strings replaced by the environment; an unset variable, or a ${...} that names
    none, is an error."""
    if not isinstance(value, str):
        return value
    for var in re.findall(r"\$\{([^}]*)\}", value):
        if not re.fullmatch(r"[A-Za-z_]\w*", var):
            raise UserError(f"the spec's {value!r} holds ${{{var}}}, which names no environment variable")
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
    flow = {"objective": "flow"} if any(k in FLOW_SETTINGS for k in settings) else {}  # settings of flow entries
    try:  # TrainConfig's own checks, on a stand-in entry
        TrainConfig(**{**settings, **flow}, results="entry", max_steps=1).validate()
    except (TypeError, ValueError) as e:
        _fail(f"{where} [train]", str(e))
    return settings


def _option_choices(at: str, g: dict[str, Any]) -> list[dict[str, str]]:
    """Every combination of the grid's block options, each as {field: value} of its non-default values."""
    from ditlab.options import BLOCK_OPTIONS

    combos: list[dict[str, str]] = [{}]
    for key, name in OPTION_GRID_KEYS.items():
        choices = BLOCK_OPTIONS[name]
        values = g.get(key, [choices[0]])
        if not isinstance(values, list) or not values or any(v not in choices for v in values):
            _fail(at, f"{key} {values!r}: a non-empty list of {', '.join(choices)}")
        combos = [{**c, **({name: v} if v != choices[0] else {})} for c in combos for v in values]
    return combos


def _option_suffix(options: dict[str, str]) -> str:
    """The entry name's part for its non-default options: -rmsnorm, -qk-layernorm, -swiglu, -sincos+rope."""
    return "".join(f"-qk-{v}" if k == "qk_norm" else f"-{v}" for k, v in options.items())


def _entries(where: str, grids: list[Any], sizes: dict[str, dict[str, int]], train: dict[str, Any]) -> dict[str, Entry]:
    from ditlab.models.blocks import BLOCKS

    entries: dict[str, Entry] = {}
    if not isinstance(grids, list) or not grids:
        _fail(where, "give at least one [[grid]] table of runs")
    for i, g in enumerate(grids):
        at = f"{where} [[grid]] #{i + 1}"
        _unknown(at, g, GRID_KEYS)
        variants = _objectives(at, g, train)
        names = g.get("sizes", [])
        if not isinstance(names, list) or not names or any(n not in sizes for n in names):
            _fail(at, f"sizes {names!r}: a non-empty list of {', '.join(sizes)}")
        blocks = g.get("blocks", ["adaln-zero"])
        if not isinstance(blocks, list) or any(b not in BLOCKS for b in blocks):
            _fail(at, f"blocks {blocks!r}: a list of {', '.join(BLOCKS)}")
        combos = _option_choices(at, g)
        repa, repa_suffix = _repa(at, g.get("repa"), train)
        for size in names:
            for p in _ints(f"{at} patch_sizes", g.get("patch_sizes"), 1):
                for block in blocks:
                    for options in combos:
                        for seed in _ints(f"{at} seeds", g.get("seeds", [0])):
                            for suffix, settings in variants:
                                name = f"DiT-{size}-{p}" + ("" if block == "adaln-zero" else f"-{block}") + \
                                       _option_suffix(options) + suffix + repa_suffix + \
                                       ("" if seed == 0 else f"-seed{seed}")
                                entry = Entry(name, size, p, block, seed, sizes[size], {**settings, **repa}, options,
                                              grid_name=name)
                                if entries.get(name, entry) != entry:  # the same entry again is one entry
                                    _fail(at, f"entry {name} is already in an earlier [[grid]] table, with other "
                                              "settings")
                                entries[name] = entry
    return entries


def _repa(at: str, table: Any, train: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(train settings, name suffix) of a grid table's `repa`: ({}, "") where it has none."""
    if table is None:
        return {}, ""
    if not isinstance(table, dict) or "encoder" not in table:
        _fail(f"{at} repa", f"{table!r}: a table with encoder = a REPA encoder name or path (and depth, coeff, width)")
    _unknown(f"{at} repa", table, set(REPA_KEYS))
    settings = {REPA_KEYS[k]: _expand(v) for k, v in table.items()}
    try:
        TrainConfig(**{**train, **settings}, results="entry", max_steps=1).validate()
    except (TypeError, ValueError) as e:
        _fail(f"{at} repa", str(e))
    tags = [setting_tag(k, table[k]) for k in ("depth", "coeff") if k in table]
    return settings, "".join(f"-{t}" for t in ["repa", *tags])


def _objectives(at: str, grid: dict[str, Any], train: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name suffix, the entry's train settings) of each objective of a grid table: "" for ddpm; "-flow" and
    the grid's own flow settings ("-logit-normal", "-time-scale0.5") for flow."""
    from ditlab.options import OBJECTIVES

    base = train.get("objective", "ddpm")
    objectives = grid.get("objectives", [base])
    if not isinstance(objectives, list) or not objectives or any(o not in OBJECTIVES for o in objectives):
        _fail(at, f"objectives {objectives!r}: a non-empty list of {', '.join(OBJECTIVES)}")
    flow = grid.get("flow", {})
    if not isinstance(flow, dict):
        _fail(at, f"flow {flow!r}: a table of flow settings ({', '.join(FLOW_SETTINGS)})")
    _unknown(f"{at} flow", flow, set(FLOW_SETTINGS))
    shared = {k: v for k, v in train.items() if k not in FLOW_SETTINGS and k != "objective"}
    out = []
    for objective in objectives:
        if objective != "flow":
            out.append(("", {**shared, "objective": objective}))
            continue
        settings = {**{k: v for k, v in train.items() if k in FLOW_SETTINGS}, **flow}
        try:
            TrainConfig(**shared, **settings, objective="flow", results="entry", max_steps=1)
        except (TypeError, ValueError) as e:
            _fail(f"{at} flow", str(e))
        tags = [setting_tag(k, v) for k, v in sorted(flow.items())]
        out.append(("".join(f"-{t}" for t in ["flow", *tags]), {**shared, **settings, "objective": "flow"}))
    return out


def _sampling(where: str, sampler: Any, steps: Any, objective: str = "ddpm") -> None:
    from ditlab.options import OBJECTIVE_SAMPLERS

    samplers = OBJECTIVE_SAMPLERS[objective]
    if sampler not in samplers:
        key = "flow_sampler" if objective == "flow" else "sampler"
        _fail(where, f"{key} {sampler!r}: a {objective} sampler, one of {', '.join(samplers)}")
    for n in steps:
        if not isinstance(n, int) or not 1 <= n <= 1000:
            _fail(where, f"steps {n!r} must be between 1 and 1000")


def _eval(where: str, t: dict[str, Any], data: str, eval_steps: tuple[int, ...]) -> EvalSpec:
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
    spec = EvalSpec(metric=metric, num_samples=t.get("num_samples", 50_000), labels=labels,
                    seeds=_ints(f"{at} seeds", t.get("seeds", [0, 1])), sampler=t.get("sampler", "ddpm"),
                    steps=t.get("steps", 250), cfg_scales=_scales(at, t.get("cfg_scales", [1.0])),
                    batch_size=t.get("batch_size", 32), keep_samples=bool(t.get("keep_samples", True)), ref=ref,
                    inception=_expand(t.get("inception")), guidance_channels=t.get("guidance_channels"),
                    guidance_intervals=_intervals(f"{at} guidance_intervals", t["guidance_intervals"])
                    if "guidance_intervals" in t else (None,),
                    guide_steps=_guide_steps(f"{at} guide_steps", t.get("guide_steps", [0]), eval_steps),
                    flow_sampler=t.get("flow_sampler", "euler"), flow_steps=t.get("flow_steps", t.get("steps", 250)),
                    features=_features(at, t.get("features", ["inception"]), metric), dinov2=_expand(t.get("dinov2")))
    _sampling(at, spec.sampler, [spec.steps])
    _sampling(at, spec.flow_sampler, [spec.flow_steps], "flow")
    for name in ("num_samples", "batch_size"):
        if not isinstance(getattr(spec, name), int) or getattr(spec, name) < 1:
            _fail(at, f"{name} {getattr(spec, name)!r} must be a positive integer")
    _balanced(at, labels, spec.num_samples, data)
    return spec


def _features(at: str, value: Any, metric: str) -> tuple[str, ...]:
    from ditlab.options import FEATURE_SETS

    if not isinstance(value, list) or not value or any(v not in FEATURE_SETS for v in value):
        _fail(at, f"features {value!r}: a non-empty list of {', '.join(FEATURE_SETS)}")
    if metric != "fid" and value != ["inception"]:
        _fail(at, f"features {value!r}: only metric 'fid' has feature spaces to choose (a judge has its own)")
    return tuple(value)


def _balanced(where: str, labels: str, num_samples: int, data: str) -> None:
    """`ditlab sample`'s rule for balanced labels, where the data's classes are known before training
    (the digits; otherwise the runner checks it against the checkpoint before sampling)."""
    if labels == "balanced" and data == "digits":
        from ditlab.data.digits import DIGITS_CLASSES
        from ditlab.sampling.config import check_balanced

        try:
            check_balanced(num_samples, DIGITS_CLASSES)
        except ValueError as e:
            _fail(where, f"num_samples {num_samples} with labels 'balanced': {e}")


def _sweep(where: str, t: dict[str, Any] | None, entries: dict[str, Entry], ev: EvalSpec,
           eval_steps: tuple[int, ...]) -> SweepSpec | None:  # fmt: skip
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
                     num_samples=t.get("num_samples", ev.num_samples), cfg_scale=float(t.get("cfg_scale", 1.0)),
                     guidance_interval=_interval(f"{at} guidance_interval", t["guidance_interval"])
                     if "guidance_interval" in t else None,
                     guide_step=_guide_steps(f"{at} guide_step", [t.get("guide_step", 0)], eval_steps)[0],
                     flow_sampler=t.get("flow_sampler", ev.flow_sampler))
    _sampling(at, spec.sampler, spec.steps)
    _sampling(at, spec.flow_sampler, spec.steps, "flow")
    if not isinstance(spec.num_samples, int) or spec.num_samples < 1:
        _fail(at, f"num_samples {spec.num_samples!r} must be a positive integer")
    return spec


def _final(where: str, t: dict[str, Any] | None, entries: dict[str, Entry],
           eval_steps: tuple[int, ...]) -> FinalSpec | None:  # fmt: skip
    if t is None:
        return None
    at = f"{where} [final]"
    _unknown(at, t, FINAL_KEYS)
    names = t.get("entries", list(entries))
    guides = t.get("guide_entries", [])
    for key, value in (("entries", names), ("guide_entries", guides)):
        if not isinstance(value, list) or any(n not in entries for n in value):
            bad = [n for n in value if n not in entries] if isinstance(value, list) else [value]
            _fail(at, f"{key}: {bad[0]!r} is not an entry (entries: {', '.join(entries)})")
    scales = _scales(at, t.get("cfg_scales"))
    for g in guides:  # a guide guides the listed entries of its own process (autoguidance needs one)
        if not any(entries[g].objective == entries[n].objective for n in names):
            _fail(at, f"guide_entries: {g} ({entries[g].objective}) can guide none of the entries "
                      f"({', '.join(names)}): autoguidance needs one process")
    return FinalSpec(entries=tuple(names), cfg_scales=scales,
                     guidance_intervals=_intervals(f"{at} guidance_intervals", t["guidance_intervals"])
                     if "guidance_intervals" in t else (None,),
                     guide_steps=_guide_steps(f"{at} guide_steps", t.get("guide_steps", [0]), eval_steps),
                     guide_entries=tuple(guides))


def load_spec(path: str | os.PathLike) -> Study:
    """Read and check a study spec; every mistake is one line naming the file and the table."""
    import tomllib

    where = str(path)
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise UserFileNotFoundError(f"{where}: no such study spec") from e
    except OSError as e:  # a folder, no permission
        raise UserError(f"{where}: cannot read it as a study spec ({one_line(e)})") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: not a TOML file ({e})") from e
    _unknown(where, raw, {"name", "data", "train", "sizes", "grid", "eval", "sweep", "ablation", "final"})
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
    ablation = None
    if "ablation" in raw:
        from ditlab.study.ablation import ablate

        entries, ablation = ablate(f"{where} [ablation]", raw["ablation"], entries, eval_steps)
    ev = _eval(where, raw.get("eval", {}), settings["data"], eval_steps)
    sweep = _sweep(where, raw.get("sweep"), entries, ev, eval_steps)
    if sweep is not None:
        _balanced(f"{where} [sweep]", ev.labels, sweep.num_samples, settings["data"])
    final = _final(where, raw.get("final"), entries, eval_steps)
    return Study(name=str(raw.get("name", Path(path).stem)), path=where, eval_steps=eval_steps, entries=entries,
                 eval=ev, sweep=sweep, sizes=sizes, ablation=ablation, final=final)
