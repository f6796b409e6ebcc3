"""The paper's analysis figures, in miniature or at scale, from a study's rows (matplotlib, PNG).

Every point is the mean over the sample seeds; its error bar spans the seeds' values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ditlab.runtime.files import atomic_write
from ditlab.study.results import block_entries, curves, grid_entries, last_point, main_setting, seed_pairs

FIGURES = {
    "fig5_blocks.png": "Figure 5: the four block designs vs training steps",
    "fig6_configs.png": "Figure 6: every config vs training steps",
    "fig8_gflops.png": "Figure 8: quality vs Gflops at the last evaluation point",
    "fig9_training_compute.png": "Figure 9: quality vs training compute",
    "fig10_sampling_compute.png": "Figure 10: quality vs sampling compute over step counts",
}
DPI = 110


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _values(rows: list[dict[str, Any]], metric: str) -> tuple[list[float], list[list[float]]]:
    """Means (n,) and asymmetric error bars [[below], [above]] spanning the sample seeds."""
    means = [r["metrics"][metric] for r in rows]
    seeds = [[s[metric] for s in r["metrics_by_sample_seed"].values()] for r in rows]
    return means, [[m - min(s) for m, s in zip(means, seeds)], [max(s) - m for m, s in zip(means, seeds)]]


def _line(ax, rows: list[dict[str, Any]], x: str, metric: str, **style: Any) -> None:
    means, err = _values(rows, metric)
    ax.errorbar([r[x] for r in rows], means, yerr=err, marker="o", markersize=4, capsize=2, **style)


def _finish(fig, ax_list, path: Path, title: str, floor: float | None = None, beside: bool = False) -> None:
    """Grid, legend (`beside` the axes, for long names) and title; `floor` (the metric of real data against
    real data) as a dotted line."""
    for ax in ax_list:
        ax.grid(alpha=0.3)
        if floor is not None and ax.get_visible():
            ax.axhline(floor, color="black", linestyle=":", linewidth=1, label="real vs real")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if beside else {}))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    _plt().close(fig)


def fig5(study, rows, metric, label, path: Path, floor: float | None = None) -> bool:
    names = block_entries(study)
    cs = curves(rows, main_setting(study))
    if not any(cs.get(n) for n in names):
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for n in names:
        if cs.get(n):
            _line(ax, cs[n], "train_step", metric, label=study["entries"][n]["block"])
    for a, b in seed_pairs(study):
        if a in names and cs.get(b):
            twin = study["entries"][b]
            _line(ax, cs[b], "train_step", metric, label=f"{twin['block']} (training seed {twin['seed']})",
                  linestyle="--", color="gray")
    e = study["entries"][names[0]]
    ax.set(xlabel="training steps", ylabel=label)
    _finish(fig, [ax], path, f"Block designs, DiT-{e['size']}/{e['patch_size']}", floor)
    return True


def fig6(study, rows, metric, label, path: Path, floor: float | None = None) -> bool:
    names = [n for n in grid_entries(study) if curves(rows, main_setting(study)).get(n)]
    if not names:
        return False
    cs, entries = curves(rows, main_setting(study)), study["entries"]
    sizes = list(dict.fromkeys(entries[n]["size"] for n in names))
    patches = sorted({entries[n]["patch_size"] for n in names})
    plt = _plt()
    cols = max(len(sizes), len(patches))
    fig, axes = plt.subplots(2, cols, figsize=(3.2 * cols, 6), sharey=True, squeeze=False)
    for j, p in enumerate(patches):  # top row: one patch size, every model size
        for n in names:
            if entries[n]["patch_size"] == p:
                _line(axes[0][j], cs[n], "train_step", metric, label=f"DiT-{entries[n]['size']}/{p}")
        axes[0][j].set(title=f"patch size {p}", xlabel="training steps", ylabel=label if j == 0 else None)
    for j, s in enumerate(sizes):  # bottom row: one model size, every patch size
        for n in names:
            if entries[n]["size"] == s:
                _line(axes[1][j], cs[n], "train_step", metric, label=f"DiT-{s}/{entries[n]['patch_size']}")
        axes[1][j].set(title=f"DiT-{s}", xlabel="training steps", ylabel=label if j == 0 else None)
    for row, used in ((0, len(patches)), (1, len(sizes))):
        for j in range(used, cols):
            axes[row][j].set_visible(False)
    _finish(fig, [a for r in axes for a in r], path, "Scaling the model (top) and the number of tokens (bottom)",
            floor)
    return True


def fig8(study, rows, metric, label, path: Path, rho: float | None, floor: float | None = None) -> bool:
    cs = curves(rows, main_setting(study))
    points = [p for n in grid_entries(study) if (p := last_point(cs.get(n, []), study))]
    if not points:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    means, err = _values(points, metric)
    ax.errorbar([p["gflops"] for p in points], means, yerr=err, fmt="o", capsize=2)
    for p, m in zip(points, means):
        ax.annotate(f"{p['size']}/{p['patch_size']}", (p["gflops"], m), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set(xscale="log", xlabel="transformer Gflops (one forward of one image)", ylabel=label)
    corr = f", Spearman rho = {rho:.2f}" if rho is not None else ""
    _finish(fig, [ax], path, f"Quality vs Gflops at step {study['eval_steps'][-1]}{corr}", floor)
    return True


def fig9(study, rows, metric, label, path: Path, floor: float | None = None) -> bool:
    cs = curves(rows, main_setting(study))
    names = [n for n in grid_entries(study) if cs.get(n)]
    if not names:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for n in names:
        e = study["entries"][n]
        _line(ax, cs[n], "training_compute_gflop", metric, label=f"DiT-{e['size']}/{e['patch_size']}")
    ax.set(xscale="log", xlabel="training compute (Gflop = 3 x 2 x Gflops x images seen)", ylabel=label)
    _finish(fig, [ax], path, "Quality vs training compute", floor)
    return True


def fig10(study, rows, metric, label, path: Path, floor: float | None = None) -> bool:
    w = study.get("sweep")
    if not w:
        return False
    last = study["eval_steps"][-1]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    drew = False
    for n in w["entries"]:
        pts = sorted((r for r in rows if r["entry"] == n and r["train_step"] == last and r["sampler"] == w["sampler"]
                      and r["cfg_scale"] == w["cfg_scale"] and r["num_samples"] == w["num_samples"]
                      and r.get("guidance_interval") == (None if w.get("guidance_interval") is None
                                                         else [float(v) for v in w["guidance_interval"]])
                      and r.get("guide_step") == w.get("guide_step")),
                     key=lambda r: r["steps"])  # fmt: skip
        if pts:
            e = study["entries"][n]
            _line(ax, pts, "sampling_compute_gflop", metric, label=f"DiT-{e['size']}/{e['patch_size']}")
            for r in pts:
                ax.annotate(str(r["steps"]), (r["sampling_compute_gflop"], r["metrics"][metric]), fontsize=6,
                            xytext=(2, 2), textcoords="offset points")
            drew = True
    if not drew:
        plt.close(fig)
        return False
    ax.set(xscale="log", xlabel="sampling compute (Gflop = Gflops x steps)", ylabel=label)
    _finish(fig, [ax], path, f"Quality vs sampling compute ({w['sampler']}, steps annotated, step {last})", floor)
    return True


def write_figures(study, rows, metric: str, label: str, out: Path, rho: float | None,
                  floor: float | None = None) -> list[str]:
    """Write every figure that has data; returns the file names written. `floor`: the metric of real
    data against the reference, drawn as a dotted line."""
    made = {"fig5_blocks.png": fig5(study, rows, metric, label, out / "fig5_blocks.png", floor),
            "fig6_configs.png": fig6(study, rows, metric, label, out / "fig6_configs.png", floor),
            "fig8_gflops.png": fig8(study, rows, metric, label, out / "fig8_gflops.png", rho, floor),
            "fig9_training_compute.png": fig9(study, rows, metric, label, out / "fig9_training_compute.png", floor),
            "fig10_sampling_compute.png": fig10(study, rows, metric, label, out / "fig10_sampling_compute.png", floor)}
    return [name for name, ok in made.items() if ok]
