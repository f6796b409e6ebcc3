"""The objectives of a study side by side (DDPM against flow matching, and flow's variants): each
variant's metric at every evaluation point over its training seeds, and at the last point against
the sampling steps of the sweep, with the fewest steps that come within `NEAR_BEST` of its best."""

from __future__ import annotations

from typing import Any

import numpy as np

from ditlab.study.results import curves, main_setting, objective_of, setting_of

NEAR_BEST = 0.10  # "the steps it needs": the fewest whose metric is within 10% of the variant's best in the sweep


def main_setting_of(study: dict[str, Any], objective: str) -> tuple:
    """`results.main_setting` for an entry of `objective`: a flow entry's sampler and steps are the
    spec's flow_sampler and flow_steps."""
    base = main_setting(study)
    if objective != "flow":
        return base
    e = study["eval"]
    return (e.get("flow_sampler", "euler"), e.get("flow_steps", e["steps"]), *base[2:])


def own_curves(study: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per entry, its rows of its own objective's main setting in training-step order."""
    by_objective = {o: curves(rows, main_setting_of(study, o)) for o in ("ddpm", "flow")}
    return {n: c for n, e in study["entries"].items() if (c := by_objective[objective_of(e)[0]].get(n))}


def variants(study: dict[str, Any]) -> dict[str, list[str]]:
    """{the seed-0 entry's name: the entries of that config and objective variant, one per training seed}."""
    groups: dict[tuple, list[str]] = {}
    for name, e in study["entries"].items():
        key = (e["size"], e["patch_size"], e["block"], objective_of(e))
        groups.setdefault(key, []).append(name)
    return {names[0]: names for names in groups.values()}


def _cell(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{np.mean(values):.3g} ({' / '.join(f'{v:.3g}' for v in values)})"


def objective_tables(study: dict[str, Any], rows: list[dict[str, Any]], metric: str) -> list[str]:
    """Markdown: the variants' metric at each evaluation point and against the sweep's steps (mean over
    training seeds, each seed's value in brackets); empty when the study trains one objective only."""
    groups = variants(study)
    if len({objective_of(study["entries"][n]) for n in groups}) < 2:
        return []
    steps_at = study["eval_steps"]
    sweep = study.get("sweep") or {}
    head = ["variant", "objective", "sampler", *(f"step {s}" for s in steps_at)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    sweep_head = ["variant", "sampler", *(f"{n} steps" for n in sweep.get("steps", [])),
                  f"steps needed (within {NEAR_BEST:.0%} of its best)"]  # fmt: skip
    sweep_lines = ["| " + " | ".join(sweep_head) + " |", "|" + "---|" * len(sweep_head)]
    for label, names in groups.items():
        objective = objective_of(study["entries"][label])
        setting = main_setting_of(study, objective[0])
        by_step = {s: [r["metrics"][metric] for r in rows if r["entry"] in names and r["train_step"] == s
                       and setting_of(r) == setting] for s in steps_at}  # fmt: skip
        kind = " ".join([objective[0], *(v for k, v in objective[1:] if k == "time_sampling")])
        lines.append("| " + " | ".join([label, kind, f"{setting[0]} {setting[1]}",
                                        *(_cell(by_step[s]) for s in steps_at)]) + " |")  # fmt: skip
        if not sweep or label not in sweep.get("entries", []):
            continue
        sampler = sweep.get("flow_sampler", "euler") if objective[0] == "flow" else sweep["sampler"]
        means = {}
        for n in sweep["steps"]:
            values = [r["metrics"][metric] for r in rows if r["entry"] in names and r["train_step"] == steps_at[-1]
                      and r["sampler"] == sampler and r["steps"] == n and r["cfg_scale"] == sweep["cfg_scale"]]
            means[n] = values
        done = {n: float(np.mean(v)) for n, v in means.items() if v}
        best = min(done.values()) if done else None
        needed = next((n for n in sorted(done) if best is not None and done[n] <= best * (1 + NEAR_BEST)), None)
        sweep_lines.append("| " + " | ".join([label, sampler, *(_cell(means[n]) for n in sweep["steps"]),
                                              str(needed or "")]) + " |")  # fmt: skip
    return [*lines, "", *(sweep_lines if len(sweep_lines) > 2 else [])]
