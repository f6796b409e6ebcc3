"""A study folder's measurements as rows, and what they say (the paper's four claims, tested).

One row per entry, training step and sampling setting (sampler, steps, guidance, sample count,
labels): the entry's config, parameters, Gflops, training compute (3 x 2 x Gflops x images seen:
forward and backward are three forwards, a multiply-accumulate two flops; an ablation entry's own
training Gflops per image instead of 3 x Gflops, REPA's projector and encoder included), sampling compute
(Gflops x steps, x 2 with guidance) and the metrics of every sample seed with their mean. Works on
a partly finished study: only what has been measured is read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ditlab.errors import UserFileNotFoundError
from ditlab.training.config import FLOW_SETTINGS


def load_rows(out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(study.json, rows) of a study folder, rows sorted by entry, step, sampler and steps."""
    study_path = out / "study.json"
    if not study_path.is_file():
        raise UserFileNotFoundError(f"{out}: no study.json; run `ditlab study run SPEC --out {out}` first")
    study = json.loads(study_path.read_text())
    groups: dict[tuple, dict[str, Any]] = {}
    for name in study["entries"]:
        entry_path = out / name / "entry.json"
        if not entry_path.is_file():
            continue
        entry = json.loads(entry_path.read_text())
        for path in sorted((out / name / "evals").glob("step-*/*.json")):
            ev = json.loads(path.read_text())
            setting = setting_of(ev)
            key = (name, ev["step"], *setting)
            if key not in groups:
                images = ev["step"] * entry["global_batch_size"]
                guided = ev.get("guided_steps")  # runs before the interval: every step when guided
                passes = ev["steps"] * (2 if ev["cfg_scale"] != 1.0 else 1) if guided is None else ev["steps"] + guided
                groups[key] = {
                    "entry": name, "size": entry["size"], "patch_size": entry["patch_size"], "block": entry["block"],
                    "seed": entry["seed"], "objective": entry.get("objective", "ddpm"), "depth": entry["depth"],
                    "hidden_size": entry["hidden_size"],
                    "num_heads": entry["num_heads"], "tokens": entry["tokens"], "params": entry["params"],
                    "gflops": entry["gflops"], "train_step": ev["step"], "images_seen": images,
                    "training_compute_gflop": 2 * entry.get("train_gflops_per_image", 3 * entry["gflops"]) * images,
                    "sampler": ev["sampler"], "steps": ev["steps"], "cfg_scale": ev["cfg_scale"],
                    "num_samples": ev["num_samples"], "labels": ev["labels"],
                    "guidance_interval": _interval(ev), "guide_step": ev.get("guide_step"),
                    "guide_entry": ev.get("guide_entry"),
                    "sampling_compute_gflop": entry["gflops"] * passes,
                    "metrics_by_sample_seed": {},
                }  # fmt: skip
            groups[key]["metrics_by_sample_seed"][str(ev["seed"])] = ev["metrics"]
    order = list(study["entries"])
    rows = [groups[k] for k in sorted(groups, key=lambda k: (order.index(k[0]), *map(_sortable, k[1:])))]
    for row in rows:
        by_seed = list(row["metrics_by_sample_seed"].values())
        row["metrics"] = {m: float(np.mean([s[m] for s in by_seed])) for m in by_seed[0]}
    return study, rows


def _sortable(value: Any) -> tuple:
    """A key part that sorts beside its kind: None (no guidance interval, no guide) first."""
    return (0,) if value is None else (1, value)


def _interval(row: dict[str, Any]) -> list[float] | None:
    value = row.get("guidance_interval")
    return None if value is None else [float(v) for v in value]


def main_setting(study: dict[str, Any]) -> tuple:
    """(sampler, steps, cfg_scale, num_samples, labels, guidance interval, guide step) of the evaluation
    points' first setting."""
    e = study["eval"]
    scale = e["cfg_scales"][0]
    interval = (e.get("guidance_intervals") or [None])[0] if scale != 1.0 else None
    guide = (e.get("guide_steps") or [None])[0] if scale != 1.0 else None
    return (e["sampler"], e["steps"], scale, e["num_samples"], e["labels"],
            None if interval is None else tuple(float(v) for v in interval), guide)


def setting_of(row: dict[str, Any]) -> tuple:
    interval = _interval(row)
    setting = (row["sampler"], row["steps"], row["cfg_scale"], row["num_samples"], row["labels"],
               None if interval is None else tuple(interval), row.get("guide_step"))
    return setting if row.get("guide_entry") is None else (*setting, row["guide_entry"])


def curves(rows: list[dict[str, Any]], setting: tuple) -> dict[str, list[dict[str, Any]]]:
    """Per entry, its rows of one setting in training-step order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if setting_of(row) == setting:
            out.setdefault(row["entry"], []).append(row)
    return out


BLOCK_OPTION_NAMES = ("norm", "qk_norm", "mlp", "pos")  # an entry record holds the non-default ones
PAPER_OPTIONS = ("layernorm", "none", "gelu", "sincos")  # the paper's choice of each


def objective_of(entry: dict[str, Any]) -> tuple:
    """An entry's objective, its settings and its modern block options (non-default ones), as a
    comparable key: the paper's DDPM with the paper's block is ("ddpm",); the objective comes first."""
    train = entry.get("train", {})
    options = tuple((k, str(entry[k])) for k in BLOCK_OPTION_NAMES if entry.get(k) not in (None, *PAPER_OPTIONS))
    if train.get("objective", "ddpm") == "ddpm":
        return ("ddpm", *options)
    return ("flow", *sorted((k, str(v)) for k, v in train.items() if k in FLOW_SETTINGS), *options)


def grid_entries(study: dict[str, Any]) -> list[str]:
    """The adaLN-Zero, seed-0 DDPM entries: the model-size x patch-size grid of figures 6, 8 and 9."""
    return [n for n, e in study["entries"].items() if e["block"] == "adaln-zero" and e["seed"] == 0
            and objective_of(e) == ("ddpm",)]


def block_entries(study: dict[str, Any]) -> list[str]:
    """Seed-0 entries of the one (size, patch) that was trained with more than one block design."""
    by_config: dict[tuple, list[str]] = {}
    for n, e in study["entries"].items():
        if e["seed"] == 0 and objective_of(e) == ("ddpm",):
            by_config.setdefault((e["size"], e["patch_size"]), []).append(n)
    many = [names for names in by_config.values() if len(names) > 1]
    return many[0] if many else []


def seed_pairs(study: dict[str, Any]) -> list[tuple[str, str]]:
    """(seed-0 entry, other-seed entry) pairs of the same config: training noise."""
    entries = study["entries"]
    pairs = []
    for n, e in entries.items():
        if e["seed"] != 0:
            twin = [m for m, f in entries.items() if f["seed"] == 0 and (f["size"], f["patch_size"], f["block"],
                    objective_of(f)) == (e["size"], e["patch_size"], e["block"], objective_of(e))]
            pairs += [(twin[0], n)] if twin else []
    return pairs


def last_point(curve: list[dict[str, Any]], study: dict[str, Any]) -> dict[str, Any] | None:
    row = curve[-1] if curve else None
    if row is None:
        return None
    own = study["entries"].get(row["entry"], {}).get("eval_steps") or study["eval_steps"]
    return row if row["train_step"] == own[-1] else None
