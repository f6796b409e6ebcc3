"""`ditlab demo`: the whole spine on the bundled digits, on CPU, in a few minutes.

Trains a small DiT in pixel space (the paper's DDPM, or flow matching with `objective="flow"`),
samples a class-balanced set with guidance from three samplers of the checkpoint's process (DDPM-250,
DDIM-50 and the fast solver at 20 steps; a flow: Euler-100, Heun-25 and Euler-Maruyama-100), and
judges the samples with a classifier trained on real digits (`evaluation.digits_judge`): its accuracy
on the requested classes, and the Frechet distance in its feature space to held-out real digits
(beside the real-vs-real value)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ditlab.data.digits import DIGITS_CLASSES, load_digits_arrays
from ditlab.evaluation.digits_judge import DigitsJudge as DigitsJudge  # its old home

# The demo run: a DiT-S-shaped model, smaller, on 8x8 digits (16 tokens of 2x2 patches).
DEMO_TRAIN = dict(
    model="DiT-S/2", depth=4, hidden_size=128, num_heads=4, image_size=8, global_batch_size=128, lr=1e-3,
    max_steps=1500, ema_decay=0.995, ckpt_every=1500, sample_every=0, log_every=100, num_workers=0,
    precision="fp32", seed=0,
)  # fmt: skip
PER_CLASS = 20  # 200 samples, balanced over the 10 classes
CFG_SCALE = 2.0
SAMPLERS = {"ddpm": [("ddpm", 250), ("ddim", 50), ("dpm++2m", 20)],
            "flow": [("euler", 100), ("heun", 25), ("sde-euler", 100)]}  # the checkpoint's objective -> its samplers


def run_demo(out: str | Path, max_steps: int | None = None, progress: bool = True,
             objective: str = "ddpm") -> dict[str, Any]:  # fmt: skip
    """Train (`objective` "ddpm" or "flow"), sample with the checkpoint's samplers and judge; writes
    samples.png, samples.npz and report.json into `out`."""
    from ditlab.checkpoints.state import list_checkpoints
    from ditlab.diffusion.guidance import Guidance
    from ditlab.evaluation.batches import save_samples
    from ditlab.runtime.files import atomic_write_text
    from ditlab.sampling.generate import save_grid, to_uint8
    from ditlab.sampling.pipeline import SamplingPipeline
    from ditlab.training import TrainConfig, train

    out = Path(out)
    cfg = TrainConfig(data="digits", results=str(out / "run"), progress=progress, objective=objective,
                      **{**DEMO_TRAIN,
                         **({"max_steps": max_steps, "ckpt_every": max_steps} if max_steps is not None else {})})
    summary = train(cfg, device="cpu")  # resumes (and returns at once) when `out` holds a finished run
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    train_seconds = metrics[-1]["wall_time"]  # of the run that trained the last steps
    newest = list_checkpoints(out / "run" / "checkpoints")[-1][1]
    pipeline = SamplingPipeline.from_checkpoint(str(newest), weights="ema", precision="fp32", device="cpu")

    judge = DigitsJudge()
    real_test, real_test_labels = load_digits_arrays("test")
    labels = torch.arange(DIGITS_CLASSES).repeat_interleave(PER_CLASS)  # (200,)
    real_diversity = judge.diversity(real_test, real_test_labels)
    results = {}
    grid_images = None
    for sampler, steps in SAMPLERS[pipeline.process.objective]:
        t1 = time.time()
        images = pipeline.images(labels, 0, range(len(labels)), guidance=Guidance(scale=CFG_SCALE), sampler=sampler,
                                 steps=steps, progress=progress)  # pixel space: x_0 predictions clipped
        seconds = time.time() - t1
        results[f"{sampler}-{steps}"] = {
            "class_accuracy": judge.accuracy(images, labels),
            "frechet_distance": judge.frechet(images, real_test),
            "within_class_diversity": judge.diversity(images, labels) / real_diversity,
            "seconds": seconds, "images_per_sec": len(labels) / seconds,
        }  # fmt: skip
        if grid_images is None:
            grid_images = images
    assert grid_images is not None  # the first sampler's (SAMPLERS is not empty)
    pixels = to_uint8(grid_images)  # (200, 8, 8, 1)
    save_grid(pixels, out / "samples.png", nrow=PER_CLASS)
    save_samples(str(out / "samples.npz"), pixels.repeat(3, axis=-1), labels.numpy())  # ADM's RGB layout
    pick = torch.randperm(len(judge.train_images), generator=torch.Generator().manual_seed(0))[: len(labels)]
    real_ref = judge.train_images[pick]
    report = {
        "samplers": results,
        "objective": pipeline.process.objective,
        "cfg_scale": CFG_SCALE,
        "real_vs_real_frechet_distance": judge.frechet(real_ref, real_test),
        "classifier_accuracy_on_held_out_real": judge.accuracy(real_test, real_test_labels),
        "train": {"steps": summary["step"], "seconds": train_seconds, "final_loss": metrics[-1]["loss"],
                  "images_per_sec": summary["step"] * cfg.global_batch_size / train_seconds,
                  "config": {k: v for k, v in cfg.to_dict().items() if k in DEMO_TRAIN}},
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def summary_lines(report: dict[str, Any], out: str | Path) -> list[str]:
    """A short human summary of report.json."""
    t = report["train"]
    lines = [f"trained {t['steps']} steps in {t['seconds']:.0f}s ({t['images_per_sec'] or 0:.0f} images/s)",
             f"classifier accuracy on held-out real digits {report['classifier_accuracy_on_held_out_real']:.3f}; "
             f"real-vs-real Frechet distance {report['real_vs_real_frechet_distance']:.2f}"]
    for name, r in report["samplers"].items():
        lines.append(f"{name:>12}: class accuracy {r['class_accuracy']:.3f}, Frechet distance "
                     f"{r['frechet_distance']:.2f}, diversity {r['within_class_diversity']:.2f} of real, "
                     f"{r['images_per_sec']:.1f} images/s")
    lines.append(f"wrote {Path(out) / 'samples.png'}, samples.npz, report.json")
    return lines
