"""The paper's claims, each tested on a study's rows: numbers, and one sentence saying what they show.

Every primary metric is lower-is-better (the digits judge's Frechet distance, FID)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ditlab.study.results import block_entries, curves, grid_entries, last_point, main_setting, seed_pairs


def gflops_correlation(study: dict[str, Any], rows: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """Spearman's rank correlation of quality with Gflops over the grid at the last evaluation point
    (figure 8; the paper: higher Gflops, lower FID, i.e. a negative correlation)."""
    from scipy.stats import spearmanr

    cs = curves(rows, main_setting(study))
    points = [p for n in grid_entries(study) if (p := last_point(cs.get(n, []), study))]
    if len(points) < 3:
        return None
    g = np.array([p["gflops"] for p in points])
    m = np.array([p["metrics"][metric] for p in points])
    rho, pvalue = spearmanr(g, m)
    pearson_log = float(np.corrcoef(np.log(g), m)[0, 1])
    text = (f"Across the {len(points)} configs of the grid at step {study['eval_steps'][-1]}, the Spearman rank "
            f"correlation of {metric} with Gflops is {rho:.2f} (p = {pvalue:.2g}; Pearson with log Gflops "
            f"{pearson_log:.2f}): " + ("more Gflops, lower (better) values, as in the paper." if rho < -0.5 else
                                       "not the strong negative correlation the paper reports."))
    return {"entries": len(points), "spearman": float(rho), "pvalue": float(pvalue), "pearson_log_gflops": pearson_log,
            "text": text}


def noise(study: dict[str, Any], rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """Training noise (|difference| between seeds of one config at the last point) and sampling noise
    (|difference| between the two sample seeds, median over every row that has two); each entry at its
    own objective's main setting."""
    from ditlab.study.objectives import own_curves

    cs = own_curves(study, rows)
    train = []
    for a, b in seed_pairs(study):
        pa, pb = last_point(cs.get(a, []), study), last_point(cs.get(b, []), study)
        if pa and pb:
            train.append({"entries": [a, b], "difference": abs(pa["metrics"][metric] - pb["metrics"][metric])})
    by_seed = [list(r["metrics_by_sample_seed"].values()) for r in rows]
    spreads = [abs(v[0][metric] - v[1][metric]) for v in by_seed if len(v) > 1]
    return {"training": train, "sampling_median": float(np.median(spreads)) if spreads else None,
            "sampling_max": float(np.max(spreads)) if spreads else None}


def blocks(study: dict[str, Any], rows: list[dict[str, Any]], metric: str,
           spread: dict[str, Any]) -> dict[str, Any] | None:
    """The four block designs at the last point (figure 5), with adaLN-Zero's margin against the
    training-noise spread."""
    cs = curves(rows, main_setting(study))
    names = block_entries(study)
    last = {study["entries"][n]["block"]: p["metrics"][metric]
            for n in names if (p := last_point(cs.get(n, []), study))}
    if len(last) < 2 or "adaln-zero" not in last:
        return None
    ranked = sorted(last, key=last.get)
    others = [b for b in ranked if b != "adaln-zero"]
    margin = last[others[0]] - last["adaln-zero"]  # > 0: adaLN-Zero better than the best other design
    train_noise = max((t["difference"] for t in spread["training"]), default=None)
    verdict = "best of the designs" if ranked[0] == "adaln-zero" else f"not the best ({ranked[0]} was)"
    text = (f"At step {study['eval_steps'][-1]}, adaLN-Zero was {verdict}: {metric} "
            + ", ".join(f"{b} {last[b]:.3g}" for b in ranked)
            + f"; its margin over the best other design is {margin:.3g}")
    if train_noise is not None:
        text += (f", {abs(margin) / train_noise:.2g}x the training-noise spread ({train_noise:.3g} between two "
                 "training seeds)" if train_noise > 0 else ", with no measurable training-noise spread")
    return {"by_block": last, "ranking": ranked, "margin": margin, "training_noise": train_noise,
            "text": text + "."}


def sweep(study: dict[str, Any], rows: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """Figure 10: whether a smaller model, given more sampling steps, matches a larger one. For each
    pair (smaller, larger) of the swept models: the smaller one's best value over all step counts,
    against the larger one's best at no more sampling compute."""
    if not study.get("sweep"):
        return None
    w, e = study["sweep"], study["eval"]
    setting_rows: dict[str, list[dict[str, Any]]] = {}
    models_of_the_grid = set(grid_entries(study))  # the paper's sizes: not other seeds or objectives
    for r in rows:
        if r["entry"] in w["entries"] and r["entry"] in models_of_the_grid \
                and r["train_step"] == study["eval_steps"][-1] and r["sampler"] == w["sampler"] \
                and r["cfg_scale"] == w["cfg_scale"] and r["num_samples"] == w["num_samples"] \
                and r["labels"] == e["labels"] and r.get("guide_step") == w.get("guide_step") \
                and r.get("guidance_interval") == (None if w.get("guidance_interval") is None
                                                   else [float(v) for v in w["guidance_interval"]]):
            setting_rows.setdefault(r["entry"], []).append(r)
    models = sorted(setting_rows, key=lambda n: setting_rows[n][0]["gflops"])
    pairs, lines = [], []
    for i, small in enumerate(models):
        best = min(setting_rows[small], key=lambda r: r["metrics"][metric])
        for large in models[i + 1:]:
            cheaper = [r for r in setting_rows[large] if r["sampling_compute_gflop"] <= best["sampling_compute_gflop"]]
            at_no_more = bool(cheaper)  # else: the larger model's cheapest point, which costs more
            rival = (min(cheaper, key=lambda r: r["metrics"][metric]) if cheaper
                     else min(setting_rows[large], key=lambda r: r["sampling_compute_gflop"]))
            matched = best["metrics"][metric] <= rival["metrics"][metric]
            pairs.append({"smaller": small, "larger": large, "smaller_best": best["metrics"][metric],
                          "smaller_steps": best["steps"], "larger_value": rival["metrics"][metric],
                          "larger_steps": rival["steps"], "larger_at_no_more_compute": at_no_more, "matched": matched})
            lines.append(f"{small} at its best ({best['steps']} steps, {metric} {best['metrics'][metric]:.3g}) "
                         f"{'matches' if matched else 'does not match'} {large} at {rival['steps']} steps "
                         f"({rival['metrics'][metric]:.3g}, "
                         f"{'no more' if at_no_more else 'its cheapest point, more'} sampling compute)")
    if not pairs:
        return None
    verdict = ("In some pairs more sampling steps let the smaller model match the larger one"
               if any(p["matched"] for p in pairs) else
               "More sampling steps did not let a smaller model match a larger one")
    return {"pairs": pairs, "text": verdict + ": " + "; ".join(lines) + "."}


def findings(study: dict[str, Any], rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    spread = noise(study, rows, metric)
    return {"metric": metric, "gflops_correlation": gflops_correlation(study, rows, metric), "noise": spread,
            "blocks": blocks(study, rows, metric, spread), "sweep": sweep(study, rows, metric)}
