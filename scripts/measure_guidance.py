"""Constant classifier-free guidance, CFG in a limited interval and autoguidance, measured on the bundled
digits: the digits judge's Frechet distance (to the held-out digits, in its classifier's features) and
class accuracy against the guidance scale, with the sampling compute of each, over several sample seeds.

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/measure_guidance.py --run RUN --guide-step 250 \
        --out docs/guidance-digits

RUN is a `ditlab train --data digits` results folder: its newest checkpoint is the main model, the
checkpoint at --guide-step (an earlier one of the same run) the guide of autoguidance (Karras et al.
2024 guide with a smaller, less trained model; here the same size, less trained). The interval is in
the EDM noise level sigma, (lo, hi] (default the interval paper's EDM2-S setting, (0.28, 5.42]). Every
image is balanced over the classes and drawn from (seed, index) as `ditlab sample` draws it, quantized
to uint8 before judging as the study's judge does. Writes OUT/results.json, OUT/guidance.png and
OUT/table.md."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from ditlab.checkpoints.state import checkpoint_path, list_checkpoints
from ditlab.data.digits import load_digits_arrays
from ditlab.demo import DigitsJudge
from ditlab.diffusion.guidance import Guidance
from ditlab.models import count_gflops
from ditlab.runtime.files import atomic_write, atomic_write_text
from ditlab.sampling.generate import balanced_labels, quantize
from ditlab.sampling.pipeline import SamplingPipeline

METHODS = ("cfg", "cfg-interval", "autoguidance")
LABELS = {"cfg": "constant CFG", "cfg-interval": "CFG in (lo, hi]", "autoguidance": "autoguidance"}


class Rows(torch.nn.Module):
    """A model that counts the image rows it is called on."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.num_classes, self.null_class, self.rows = model, model.num_classes, model.null_class, 0
        self.eval()

    def forward(self, x, t, y=None):
        self.rows += x.shape[0]
        return self.model(x, t, y)


def tree_state() -> dict[str, object]:
    """The commit this script runs at, and whether the tree had changes (a measurement for the docs runs on
    a clean one)."""
    repo = Path(__file__).resolve().parents[1]
    run = lambda *cmd: subprocess.run(["git", "-C", str(repo), *cmd], capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {"commit": run("rev-parse", "HEAD"), "clean": run("status", "--porcelain", "--untracked-files=no") == ""}


def guidance_of(method: str, scale: float, interval: tuple[float, float], guide: torch.nn.Module) -> Guidance:
    if scale == 1.0:
        return Guidance()
    if method == "cfg":
        return Guidance(scale=scale)
    if method == "cfg-interval":
        return Guidance(scale=scale, interval=interval)
    return Guidance(scale=scale, guide=guide)


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, standard deviation over the seeds)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a `ditlab train --data digits` results folder")
    p.add_argument("--guide-step", type=int, required=True, help="the training step of the guide's checkpoint")
    p.add_argument("--main-step", type=int, default=None, help="the main model's step (default: the newest)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.5, 2.5, 4.0])
    p.add_argument("--interval", type=float, nargs=2, default=[0.28, 5.42], metavar=("LO", "HI"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--sampler", default="ddpm")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="which guidance to measure (unguided sampling always is)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    started, load_before = time.time(), os.getloadavg()
    ckpts = Path(args.run) / "checkpoints"
    main_step = args.main_step or list_checkpoints(ckpts)[-1][0]
    pipe = SamplingPipeline.from_checkpoint(str(checkpoint_path(ckpts, main_step)), precision="fp32", device="cpu")
    guide_net, guide_entry = pipe.load_guide(str(checkpoint_path(ckpts, args.guide_step)))
    main_model, guide = Rows(pipe.model), Rows(guide_net)
    pipe.model = main_model
    gflops = {"main": count_gflops(main_model.model), "guide": count_gflops(guide.model)}
    judge, real = DigitsJudge(), load_digits_arrays("test")[0]
    n = args.per_class * 10
    labels = balanced_labels(0, n, list(range(10)))
    interval = (args.interval[0], args.interval[1])
    rows = []
    settings = [("unguided", 1.0)] + [(m, s) for s in args.scales for m in args.methods]
    for method, scale in settings:
        for seed in args.seeds:
            main_model.rows = guide.rows = 0
            t0 = time.time()
            with torch.inference_mode():
                images = pipe.images(labels, seed, range(n), guidance=guidance_of(method, scale, interval, guide),
                                     sampler=args.sampler, steps=args.steps)
            seconds = time.time() - t0
            pixels = (quantize(images).permute(0, 3, 1, 2).float() - 127.5) / 127.5  # (N, 1, 8, 8) as judged
            row = {"method": method, "scale": scale, "seed": seed, "frechet_distance": judge.frechet(pixels, real),
                   "class_accuracy": judge.accuracy(pixels, labels), "seconds": seconds,
                   "main_rows_per_image": main_model.rows / n, "guide_rows_per_image": guide.rows / n,
                   "gflop_per_image": (gflops["main"] * main_model.rows + gflops["guide"] * guide.rows) / n}
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = summarize(rows, settings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parent = Path(args.run).resolve().parent  # paths relative to the run's folder: no machine's layout
    guide_entry = {**guide_entry, **{k: os.path.relpath(Path(guide_entry[k]).resolve(), parent)
                                     for k in ("checkpoint", "checkpoint_file")}}
    result = {"run": Path(args.run).resolve().name, "main_step": main_step, "guide_step": args.guide_step,
              "guide": guide_entry,
              "sampler": args.sampler, "steps": args.steps, "interval_sigma": list(interval), "images": n,
              "seeds": args.seeds, "gflops_per_forward": gflops, **tree_state(), "summary": summary, "rows": rows,
              "seconds": time.time() - started, "load_average_before": load_before,
              "load_average_after": os.getloadavg()}
    atomic_write_text(out / "results.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(out / "table.md", table(summary) + "\n")
    figure(summary, out / "guidance.png", args)
    print(table(summary))


def summarize(rows: list[dict], settings: list[tuple[str, float]]) -> list[dict]:
    out = []
    for method, scale in settings:
        mine = [r for r in rows if r["method"] == method and r["scale"] == scale]
        fd, acc = spread([r["frechet_distance"] for r in mine]), spread([r["class_accuracy"] for r in mine])
        out.append({"method": method, "scale": scale, "frechet_distance": fd[0], "frechet_distance_sd": fd[1],
                    "class_accuracy": acc[0], "class_accuracy_sd": acc[1],
                    "gflop_per_image": mine[0]["gflop_per_image"],
                    "forwards_per_image": mine[0]["main_rows_per_image"] + mine[0]["guide_rows_per_image"]})
    return out


def table(summary: list[dict]) -> str:
    lines = ["| guidance | scale | Frechet distance | class accuracy | forwards / image | Gflop / image |",
             "|---|---|---|---|---|---|"]
    for s in summary:
        name = "none" if s["method"] == "unguided" else LABELS[s["method"]]
        lines.append(f"| {name} | {s['scale']:g} | {s['frechet_distance']:.2f} ± {s['frechet_distance_sd']:.2f} | "
                     f"{s['class_accuracy']:.3f} ± {s['class_accuracy_sd']:.3f} | {s['forwards_per_image']:.0f} | "
                     f"{s['gflop_per_image']:.2f} |")
    return "\n".join(lines)


def figure(summary: list[dict], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    base = next(s for s in summary if s["method"] == "unguided")
    for ax, metric, name in ((axes[0], "frechet_distance", "Frechet distance (lower is better)"),
                             (axes[1], "class_accuracy", "class accuracy")):  # fmt: skip
        ax.axhline(base[metric], color="gray", ls=":", label="unguided")
        for method in args.methods:
            pts = [s for s in summary if s["method"] == method]
            ax.errorbar([s["scale"] for s in pts], [s[metric] for s in pts], yerr=[s[metric + "_sd"] for s in pts],
                        marker="o", capsize=3, label=LABELS[method])
        ax.set_xlabel("guidance scale")
        ax.set_title(name, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"digits, DDPM-{args.steps}, mean and sd over {len(args.seeds)} sample seeds", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


if __name__ == "__main__":
    main()
