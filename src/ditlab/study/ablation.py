"""An ablation study: entries named from what differs from a declared baseline, trained at equal
training compute, and what each one buys against the baseline (spec's `[ablation]` table).

- Names: `DiT-B-2` is the baseline; an entry that differs adds one `+tag` per difference, in a fixed
  order: block design, objective and its flow settings, block options (`+rmsnorm`, `+qk-rmsnorm`,
  `+swiglu`, `+rope` for LightningDiT's sincos+rope, `+rope-only`), REPA (`+repa`, `+repa-depth2`).
  A second training seed keeps its `-seed1` suffix: seeds are noise, not an ablation.
- Equal compute: training compute per image is 3 x (the DiT's forward Gflops + REPA's projector)
  (forward and backward are three forwards) + REPA's encoder forward (frozen: no backward; not
  counted with `count_encoder = false`, for features cached once beside a latent cache). Each
  entry's evaluation points are the baseline's steps x (baseline's cost / entry's cost), rounded,
  so every entry is judged at the same training compute (images x Gflops per image), the axis on
  which REPA reports its speed-up.
- What each entry buys (`ablation_results`): its metric at each point (mean over training seeds),
  the training compute it needs to reach the baseline's final value (linear between points;
  speed-up = the baseline's compute / that), and its final gap to the baseline in units of the
  training noise (the largest difference between two training seeds of one entry at the last point)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ditlab.errors import UserError
from ditlab.study.entry import setting_tag

if TYPE_CHECKING:
    import torch

    from ditlab.study.entry import Entry

POS_TAGS = {"sincos+rope": "rope", "rope": "rope-only", "sincos": "sincos"}
OPTION_ORDER = ("norm", "qk_norm", "mlp", "pos")
ABLATION_KEYS = {"baseline", "equal_compute", "count_encoder"}
BACKWARD_FACTOR = 3  # forward + backward = three forwards
ABLATION_FIGURE = "ablation_compute.png"


def _flow_tags(train: dict[str, Any], base: dict[str, Any]) -> list[str]:
    from ditlab.training.config import FLOW_SETTINGS

    tags = []
    for k in sorted(FLOW_SETTINGS):
        v = train.get(k)
        if v is not None and (base.get("objective") != "flow" or base.get(k) != v):
            tags.append(setting_tag(k, v))
    return tags


def ablation_name(entry: Entry, base: Entry) -> str:
    """`DiT-{size}-{patch}` + one `+tag` per difference from `base` (+ `-seedN`)."""
    tags: list[str] = []
    if entry.block != base.block:
        tags.append(entry.block)
    t, b = entry.train, base.train
    if entry.objective != base.objective:
        tags.append(entry.objective)
    if entry.objective == "flow":
        tags += _flow_tags(t, b)
    for k in OPTION_ORDER:
        v = entry.options.get(k)
        if v != base.options.get(k):
            from ditlab.options import BLOCK_OPTIONS

            v = v or BLOCK_OPTIONS[k][0]
            tags.append(f"qk-{v}" if k == "qk_norm" else POS_TAGS.get(v, v) if k == "pos" else v)
    if t.get("repa_encoder") != b.get("repa_encoder"):
        tags.append("repa" if t.get("repa_encoder") else "no-repa")
    for k in ("repa_depth", "repa_coeff"):
        if t.get("repa_encoder") and b.get("repa_encoder") and t.get(k) != b.get(k):  # REPA's own settings varied
            tags.append(f"repa-{setting_tag(k[5:], t[k])}")
    name = f"DiT-{entry.size}-{entry.patch_size}" + "".join(f"+{tag}" for tag in tags)
    return name + ("" if entry.seed == 0 else f"-seed{entry.seed}")


def train_gflops(entry: Entry, count_encoder: bool = True) -> dict[str, float]:
    """Per training image: the DiT's forward Gflops, REPA's projector and encoder (0 without REPA),
    and the total 3 x (DiT + projector) + encoder (the encoder's forward counted where `count_encoder`;
    its features cached beside a latent cache cost once per image of the data set, not per step)."""
    from ditlab.study.facts import model_facts

    facts = model_facts(entry)
    projector = encoder = 0.0
    spec = entry.train.get("repa_encoder")
    if spec:
        encoder, dz = encoder_gflops(spec, facts["channels"], facts["image_size"])
        width = int(entry.train.get("repa_width", 2048))
        hidden = entry.model["hidden_size"]
        projector = facts["tokens"] * (hidden * width + width * width + width * dz) / 1e9
    total = BACKWARD_FACTOR * (facts["gflops"] + projector) + (encoder if count_encoder else 0.0)
    return {"dit": facts["gflops"], "projector": projector, "encoder": encoder, "total": total}


@functools.cache
def encoder_gflops(spec: str, channels: int, size: int) -> tuple[float, int]:
    """(multiply-accumulates / 1e9 of one forward of REPA's encoder on a (channels, size, size) image,
    its feature width Dz), counted once per process for each encoder and image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    enc = encoder_architecture(spec)
    with FlopCounterMode(display=False) as counter:
        feats = enc(torch.zeros(1, channels, size, size))  # (1, S, Dz)
    return counter.get_total_flops() / 2 / 1e9, int(feats.shape[-1])  # flops -> multiply-accumulates


def encoder_architecture(spec: str) -> torch.nn.Module:
    """A REPA encoder of `spec`'s architecture, for counting its work: a released DINOv2 or a named
    autoencoder is built with random weights (nothing fetched or trained); a weights file is loaded."""
    import re

    from ditlab.models.repa_encoder import RepaEncoder, load_repa_encoder

    released = re.fullmatch(r"dinov2_(vit[sblg]14)(_reg)?(_pretrain\.pth)?", spec)
    if released:
        from ditlab.evaluation.dinov2 import DinoVisionTransformer, hub_config

        return RepaEncoder(DinoVisionTransformer(hub_config(released[1], bool(released[2]))), spec, dinov2=True)
    from ditlab.evaluation.dae_encoder import RECIPES, DaeEncoder

    if spec in RECIPES:
        return RepaEncoder(DaeEncoder(RECIPES[spec].widths, RECIPES[spec].size), spec)
    return load_repa_encoder(spec, "cpu")


def ablate(where: str, table: Any, entries: dict[str, Entry], eval_steps: tuple[int, ...]
           ) -> tuple[dict[str, Entry], dict[str, Any]]:  # fmt: skip
    """The entries renamed from their differences to the baseline, at equal compute where asked; and
    the ablation's record (baseline, equal_compute, each entry's training Gflops per image)."""
    if not isinstance(table, dict):
        raise UserError(f"{where}: a table with baseline = an entry name (and equal_compute = true/false)")
    extra = sorted(set(table) - ABLATION_KEYS)
    if extra:
        raise UserError(f"{where}: unknown key {extra[0]!r} (known: {', '.join(sorted(ABLATION_KEYS))})")
    base_name, equal = table.get("baseline"), table.get("equal_compute", True)
    count_encoder = table.get("count_encoder", True)
    if base_name not in entries:
        raise UserError(f"{where}: baseline {base_name!r} is not an entry of the grid (entries: {', '.join(entries)})")
    for key, value in (("equal_compute", equal), ("count_encoder", count_encoder)):
        if not isinstance(value, bool):
            raise UserError(f"{where}: {key} {value!r} must be true or false")
    base = entries[base_name]
    costs = {n: train_gflops(e, count_encoder) for n, e in entries.items()} if equal else {}
    renamed: dict[str, Entry] = {}
    for n, e in entries.items():
        name = ablation_name(e, base)
        if name in renamed:
            raise UserError(f"{where}: entries {renamed[name].grid_name} and {n} differ from the baseline in the same "
                            f"way ({name})")
        steps: tuple[int, ...] = ()
        if equal:
            ratio = costs[base_name]["total"] / costs[n]["total"]
            steps = tuple(max(1, round(s * ratio)) for s in eval_steps)
            if list(steps) != sorted(set(steps)):
                raise UserError(f"{where}: {name} costs {1 / ratio:.3g}x the baseline per image, so its evaluation "
                                f"points {list(steps)} collide; give the baseline more steps")
        renamed[name] = dataclasses.replace(e, name=name, eval_steps=steps)
    record = {"baseline": ablation_name(base, base), "equal_compute": equal, "count_encoder": count_encoder,
              "train_gflops_per_image": {ablation_name(entries[n], base): c for n, c in costs.items()}}
    return renamed, record


# ---- what each entry buys: from a study folder's rows (results.load_rows) ----


def _mean_curve(curves_by_seed: list[list[dict[str, Any]]], metric: str) -> list[tuple[float, float]]:
    """(training compute, metric mean over the training seeds) at each point all seeds reached."""
    n = min(len(c) for c in curves_by_seed)
    return [(curves_by_seed[0][i]["training_compute_gflop"],
             sum(c[i]["metrics"][metric] for c in curves_by_seed) / len(curves_by_seed)) for i in range(n)]


def compute_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The training compute at which a curve first reaches `target` (linear between points; None: never)."""
    for i, (c, v) in enumerate(curve):
        if v <= target:
            if i == 0:
                return c
            c0, v0 = curve[i - 1]
            return c0 + (c - c0) * (v0 - target) / (v0 - v)
    return None


def ablation_results(study: dict[str, Any], rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """Per ablation (an entry with its other training seeds), its curve, speed-up and gap to the baseline."""
    from ditlab.study.objectives import own_curves

    ab = study["ablation"]
    cs = own_curves(study, rows)
    groups: dict[str, list[str]] = {}
    for name, e in study["entries"].items():
        key = name if e["seed"] == 0 else name.rsplit("-seed", 1)[0]
        groups.setdefault(key, []).append(name)
    finals: dict[str, list[float]] = {}
    curves: dict[str, list[tuple[float, float]]] = {}
    facts: dict[str, dict[str, Any]] = {}
    points = len(study["eval_steps"])
    for key, names in groups.items():
        done = [cs[n] for n in names if len(cs.get(n, [])) == points]
        if done:
            finals[key] = [c[-1]["metrics"][metric] for c in done]
            curves[key] = _mean_curve(done, metric)
            facts[key] = {"params": done[0][-1]["params"], "gflops": done[0][-1]["gflops"],
                          "steps": [r["train_step"] for r in done[0]]}
    spreads = [max(v) - min(v) for v in finals.values() if len(v) > 1]
    noise = max(spreads) if spreads else None
    base = ab["baseline"]
    out: dict[str, Any] = {"baseline": base, "noise": noise, "noise_pairs": {k: v for k, v in finals.items()
                                                                            if len(v) > 1}, "entries": {}}
    if base not in curves:
        return out
    target, base_compute = curves[base][-1][1], curves[base][-1][0]
    for key, curve in curves.items():
        reach = compute_to_reach(curve, target)
        final = sum(finals[key]) / len(finals[key])
        gap = final - target
        out["entries"][key] = {
            "seeds": len(finals[key]), "final": final, "finals": finals[key], "curve": curve,
            "gap": gap, "gap_in_noise": None if not noise else gap / noise,
            "compute_to_baseline": reach, "speedup": None if reach is None else base_compute / reach,
            "gflops_per_image": ab.get("train_gflops_per_image", {}).get(key), **facts[key],
        }  # fmt: skip
    return out


def ablation_findings(found: dict[str, Any], metric: str) -> list[str]:
    """One sentence per entry that the numbers support."""
    lines, noise, base = [], found["noise"], found["baseline"]
    if base not in found["entries"]:
        return [f"The baseline {base} has not finished: nothing to compare yet."]
    b = found["entries"][base]
    lines.append(f"Training noise: the largest difference between two training seeds of one entry at the last point "
                 f"is {noise:.3g} ({metric}); gaps below are in units of it." if noise else
                 "No entry has two finished training seeds: the gaps below have no noise to be measured against.")
    for key, r in found["entries"].items():
        if key == base:
            continue
        inside = noise is not None and abs(r["gap"]) <= noise
        verdict = ("inside the training noise" if inside else
                   "better than the baseline, outside the noise" if r["gap"] < 0 and noise else
                   "worse than the baseline, outside the noise" if noise else "(noise unmeasured)")
        speed = (f"reaches the baseline's final {metric} ({b['final']:.3g}) at {1 / r['speedup']:.2f}x its "
                 f"training compute (a {r['speedup']:.2f}x speed-up)" if r["speedup"] else
                 f"does not reach the baseline's final {metric} ({b['final']:.3g}) within the same compute")
        gap = f"{r['gap']:+.3g}" + (f" = {r['gap_in_noise']:+.2f} noise units" if r["gap_in_noise"] is not None else "")
        lines.append(f"{key}: final {r['final']:.3g}, {gap}: {verdict}; it {speed}.")
    return lines


def ablation_table(found: dict[str, Any], study: dict[str, Any], metric: str) -> list[str]:
    head = ["entry", "params", "Gflops", "train Gflops / image", "steps",
            *(f"point {i + 1}" for i in range(len(study["eval_steps"]))), "final (each seed)", "gap (noise units)",
            "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, r in found["entries"].items():
        g = r["gflops_per_image"]
        cells = [key, f"{r['params'] / 1e6:.3g}M", f"{r['gflops']:.3g}", "" if g is None else f"{g['total']:.3g}",
                 ", ".join(map(str, r["steps"])), *(f"{v:.3g}" for _, v in r["curve"]),
                 f"{r['final']:.3g} ({', '.join(f'{v:.3g}' for v in r['finals'])})",
                 f"{r['gap']:+.3g}" + ("" if r["gap_in_noise"] is None else f" ({r['gap_in_noise']:+.2f})"),
                 "" if key == found["baseline"] else "not reached" if r["speedup"] is None else f"{r['speedup']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def guidance_table(study: dict[str, Any], rows: list[dict[str, Any]], metric: str) -> list[str]:
    """The [final] guidance settings on each entry's last checkpoint (mean over sample seeds)."""
    final = study.get("final")
    if not final:
        return []
    from ditlab.study.objectives import main_setting_of
    from ditlab.study.results import objective_of

    lines = ["| entry | guidance | " + metric + " |", "|---|---|---|"]
    for name in final["entries"]:
        last = max((r["train_step"] for r in rows if r["entry"] == name), default=None)
        sampler, steps = main_setting_of(study, objective_of(study["entries"][name])[0])[:2]  # not the sweep's
        for r in rows:
            if r["entry"] != name or r["train_step"] != last or (r["sampler"], r["steps"]) != (sampler, steps):
                continue
            how = "none" if r["cfg_scale"] == 1.0 else f"scale {r['cfg_scale']:g}"
            if r["cfg_scale"] != 1.0:
                how += (f", interval {r['guidance_interval']}" if r["guidance_interval"] else "") + \
                       (f", guide: its step {r['guide_step']}" if r.get("guide_step") else "") + \
                       (f", guide: {r['guide_entry']}" if r.get("guide_entry") else
                        "" if r.get("guide_step") else ", null label (CFG)")
            lines.append(f"| {name} | {how} | {r['metrics'][metric]:.3g} |")
    return lines


def ablation_figure(found: dict[str, Any], label: str, path: Path, floor: float | None) -> bool:
    """Metric against training compute, every entry (mean over its training seeds); the legend beside
    the axes, where long ablation names do not hide the curves."""
    from ditlab.study.figures import _finish, _plt

    if not found["entries"]:
        return False
    fig, ax = _plt().subplots(figsize=(11, 4.8))
    for key, r in found["entries"].items():
        style = {"color": "black", "linewidth": 2.5} if key == found["baseline"] else {}
        ax.plot([c for c, _ in r["curve"]], [v for _, v in r["curve"]], marker="o", markersize=3, label=key, **style)
    ax.set(xlabel="training compute (Gflop)", ylabel=label)
    _finish(fig, [ax], path, "Each ablation vs training compute (mean over training seeds)", floor, beside=True)
    return True
