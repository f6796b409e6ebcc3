"""`ditlab study report DIR`: results.json, the figures and report.md of a (partly) finished study.

Nothing is rewritten when the measurements have not changed since the last report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ditlab.errors import UserError
from ditlab.runtime.files import atomic_write_text
from ditlab.study.figures import FIGURES, write_figures
from ditlab.study.findings import findings
from ditlab.study.objectives import objective_tables, own_curves
from ditlab.study.results import last_point, load_rows, objective_of
from ditlab.study.spec import PRIMARY

LABELS = {"digits": "Frechet distance (digits features)", "fashion-mnist": "Frechet distance (Fashion judge features)",
          "fid": "FID"}  # by the spec's metric


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.2e}"


def table(study: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table: every entry at its latest evaluation point of its objective's main setting."""
    cs = own_curves(study, rows)
    metrics = list(next(iter(rows))["metrics"]) if rows else []
    head = ["entry", "params", "Gflops", "tokens", "step", "train Gflop", *metrics, "by sample seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, curve in cs.items():
        r = curve[-1]
        primary = PRIMARY[study["eval"]["metric"]]
        seeds = "; ".join(f"{s}: {_fmt(v[primary])}" for s, v in r["metrics_by_sample_seed"].items())
        cells = [name, f"{r['params'] / 1e6:.3g}M", _fmt(r["gflops"]), str(r["tokens"]), str(r["train_step"]),
                 _fmt(r["training_compute_gflop"]), *(_fmt(r["metrics"][m]) for m in metrics), seeds]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(study: dict[str, Any], rows: list[dict[str, Any]], found: dict[str, Any], figures: list[str],
             reference: dict[str, Any] | None) -> str:
    e = study["eval"]
    done = sum(1 for c in own_curves(study, rows).values() if last_point(c, study))
    flows = any(objective_of(x)[0] == "flow" for x in study["entries"].values())
    flow = f" (flow entries: {e.get('flow_sampler', 'euler')} {e.get('flow_steps', e['steps'])})" if flows else ""
    lines = [f"# Study {study['name']}", "",
             f"{len(study['entries'])} entries, {done} finished to step {study['eval_steps'][-1]}; evaluation points "
             f"{', '.join(map(str, study['eval_steps']))}; {e['num_samples']} samples ({e['labels']} labels) per "
             f"sample seed {', '.join(map(str, e['seeds']))}, {e['sampler']} {e['steps']} steps{flow}, guidance "
             f"{', '.join(f'{s:g}' for s in e['cfg_scales'])}; metric {found['metric']} (lower is better).", ""]
    if reference:
        data = reference.get("data", "digits")
        lines += [f"Real training images ({data}) against the held-out ones: Frechet distance "
                  f"{reference['frechet_distance']:.3g} (a reference, as many real images as samples: models land "
                  "near it, not strictly above).", ""]
    if study.get("ablation"):
        return "\n".join(lines + ablation_markdown(study, rows, found, figures))
    lines += ["## What the measurements say", ""]
    for key in ("gflops_correlation", "blocks", "sweep"):
        if found.get(key):
            lines.append(f"- {found[key]['text']}")
    n = found["noise"]
    if n["sampling_median"] is not None:
        lines.append(f"- Sampling noise: the two sample seeds differ by {n['sampling_median']:.3g} (median over "
                     f"all points; at most {n['sampling_max']:.3g}).")
    for t in n["training"]:
        lines.append(f"- Training noise: {t['entries'][0]} and {t['entries'][1]} (two training seeds) differ by "
                     f"{t['difference']:.3g} at the last point.")
    lines += ["", "## Latest point of every entry", "", *table(study, rows), ""]
    compared = objective_tables(study, rows, PRIMARY[e["metric"]])
    if compared:
        lines += ["## Objectives", "", "Each variant's metric, the mean over its training seeds (each seed's in "
                  "brackets), sampled by its own process.", "", *compared, ""]
    for name in figures:
        lines += [f"## {FIGURES[name]}", "", f"![{FIGURES[name]}]({name})", ""]
    return "\n".join(lines)


def ablation_markdown(study: dict[str, Any], rows: list[dict[str, Any]], found: dict[str, Any],
                      figures: list[str]) -> list[str]:
    """The report of an ablation study: what each entry buys against the baseline."""
    from ditlab.study.ablation import ABLATION_FIGURE, ablation_findings, ablation_table, guidance_table

    ab, metric = found["ablation"], found["metric"]
    equal = study["ablation"]["equal_compute"]
    how = ("at equal training compute (images x training Gflops per image: each entry has its own steps at the "
           "same compute points)" if equal else "for the same steps")
    lines = [f"Baseline {ab['baseline']}; every entry trained {how}. Speed-up: the baseline's final training compute "
             "over the compute at which the entry first reaches the baseline's final value (linear between evaluation "
             "points).", "", "## What the measurements say", ""]
    lines += [f"- {t}" for t in ablation_findings(ab, metric)]
    lines += ["", "## Every entry", "", *ablation_table(ab, study, metric), ""]
    guided = guidance_table(study, rows, metric)
    if guided:
        lines += ["## Guidance on the last checkpoints", "", *guided, ""]
    if ABLATION_FIGURE in figures:
        lines += ["## Quality vs training compute", "", f"![Quality vs training compute]({ABLATION_FIGURE})", ""]
    return lines


def write_report(out: str | Path) -> dict[str, Any]:
    """Write results.json, the figures and report.md into the study folder `out`; returns a summary
    ("written": False when everything was already up to date)."""
    out = Path(out)
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise UserError("the figures need matplotlib: pip install 'ditlab[study]'") from e
    study, rows = load_rows(out)
    metric = PRIMARY[study["eval"]["metric"]]
    found: dict[str, Any]
    if study.get("ablation"):
        from ditlab.study.ablation import ablation_results

        found = {"metric": metric, "ablation": ablation_results(study, rows, metric)}
    else:
        found = findings(study, rows, metric)
    ref_path = out / "reference.json"
    reference = json.loads(ref_path.read_text()) if ref_path.is_file() else None
    results = {"study": study["name"], "metric": metric, "reference": reference, "findings": found, "rows": rows}
    text = json.dumps(results, indent=2) + "\n"
    results_path = out / "results.json"
    stored = results_path.read_text() if results_path.is_file() else None
    if stored == text and (out / "report.md").is_file():
        return {"rows": len(rows), "written": False, "figures": [], "out": str(out)}
    floor = (reference or {}).get(metric)
    if study.get("ablation"):
        from ditlab.study.ablation import ABLATION_FIGURE, ablation_figure

        drawn = ablation_figure(found["ablation"], LABELS[study["eval"]["metric"]], out / ABLATION_FIGURE, floor)
        figures = [ABLATION_FIGURE] if drawn else []
    else:
        rho = (found["gflops_correlation"] or {}).get("spearman")
        figures = write_figures(study, rows, metric, LABELS[study["eval"]["metric"]], out, rho, floor)
    atomic_write_text(out / "report.md", markdown(study, rows, found, figures, reference) + "\n")
    atomic_write_text(results_path, text)  # last: a report interrupted before it is redone next time
    return {"rows": len(rows), "written": True, "figures": figures, "out": str(out)}
