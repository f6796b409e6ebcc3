"""`ditlab demo`: the whole spine on the bundled digits, on CPU, in a few minutes.

Trains a small DiT in pixel space, samples a class-balanced set with guidance from three
samplers (DDPM-250, DDIM-50 and the fast solver at 20 steps), and judges the samples with a
classifier trained on real digits: its accuracy on the requested classes, and the Frechet
distance in its feature space to held-out real digits (beside the real-vs-real value)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ditlab.data.digits import DIGITS_CLASSES, DIGITS_SIZE, load_digits_arrays

# The demo run: a DiT-S-shaped model, smaller, on 8x8 digits (16 tokens of 2x2 patches).
DEMO_TRAIN = dict(
    model="DiT-S/2", depth=4, hidden_size=128, num_heads=4, image_size=8, global_batch_size=128, lr=1e-3,
    max_steps=1500, ema_decay=0.995, ckpt_every=1500, sample_every=0, log_every=100, num_workers=0,
    precision="fp32", seed=0,
)  # fmt: skip
PER_CLASS = 20  # 200 samples, balanced over the 10 classes
CFG_SCALE = 2.0
SAMPLERS = [("ddpm", 250), ("ddim", 50), ("dpm++2m", 20)]


class DigitsJudge:
    """A small MLP classifier trained on the real training digits; its hidden layer is the
    feature space of the Frechet distance."""

    def __init__(self, seed: int = 0):
        from sklearn.neural_network import MLPClassifier

        self.train_images, labels = load_digits_arrays("train")  # (1500, 1, 8, 8), also the real reference
        self.clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=500, random_state=seed)
        self.clf.fit(self._flat(self.train_images), labels.numpy())

    @staticmethod
    def _flat(images: torch.Tensor) -> np.ndarray:
        """(N, 1, S, S) in [-1, 1] -> (N, 64) at the native 8x8 resolution."""
        images = images.float().clamp(-1, 1)
        if images.shape[-1] != DIGITS_SIZE:
            images = F.adaptive_avg_pool2d(images, DIGITS_SIZE)
        return images.reshape(images.shape[0], -1).numpy().astype(np.float64)  # (N, 64)

    def predict(self, images: torch.Tensor) -> np.ndarray:
        return self.clf.predict(self._flat(images))

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.predict(images) == labels.numpy()).mean())

    def features(self, images: torch.Tensor) -> np.ndarray:
        """Hidden-layer activations (N, 128)."""
        x = self._flat(images)
        return np.maximum(x @ self.clf.coefs_[0] + self.clf.intercepts_[0], 0.0)

    def diversity(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Mean over classes of the mean pairwise pixel distance between images of that class."""
        flat = torch.from_numpy(self._flat(images))
        per_class = [torch.pdist(flat[labels == c]).mean().item() for c in labels.unique().tolist()
                     if int((labels == c).sum()) > 1]
        return float(np.mean(per_class))

    def frechet(self, a: torch.Tensor, b: torch.Tensor) -> float:
        from ditlab.evaluation import feature_stats, frechet_distance

        sa, sb = feature_stats(self.features(a)), feature_stats(self.features(b))
        return float(frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma))


def run_demo(out: str | Path, max_steps: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train, sample and judge; writes samples.png, samples.npz and report.json into `out`."""
    from ditlab.checkpoints.formats import build_model, read_checkpoint
    from ditlab.checkpoints.state import list_checkpoints
    from ditlab.diffusion import Diffusion
    from ditlab.evaluation.batches import save_samples
    from ditlab.runtime.files import atomic_write_text
    from ditlab.sampling.generate import generate, save_grid, to_uint8
    from ditlab.training import TrainConfig, train

    out = Path(out)
    cfg = TrainConfig(data="digits", results=str(out / "run"), progress=progress,
                      **{**DEMO_TRAIN,
                         **({"max_steps": max_steps, "ckpt_every": max_steps} if max_steps is not None else {})})
    summary = train(cfg, device="cpu")  # resumes (and returns at once) when `out` holds a finished run
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    train_seconds = metrics[-1]["wall_time"]  # of the run that trained the last steps
    ema = build_model(read_checkpoint(list_checkpoints(out / "run" / "checkpoints")[-1][1]))  # EMA weights
    diffusion = Diffusion()

    judge = DigitsJudge()
    real_test, real_test_labels = load_digits_arrays("test")
    labels = torch.arange(DIGITS_CLASSES).repeat_interleave(PER_CLASS)  # (200,)
    real_diversity = judge.diversity(real_test, real_test_labels)
    results = {}
    grid_images = None
    for sampler, steps in SAMPLERS:
        t1 = time.time()
        images = generate(ema, diffusion, labels, 0, range(len(labels)), latent_shape=(1, 8, 8), steps=steps,
                          sampler=sampler, cfg_scale=CFG_SCALE, clip_denoised=True, progress=progress)
        seconds = time.time() - t1
        results[f"{sampler}-{steps}"] = {
            "class_accuracy": judge.accuracy(images, labels),
            "frechet_distance": judge.frechet(images, real_test),
            "within_class_diversity": judge.diversity(images, labels) / real_diversity,
            "seconds": seconds, "images_per_sec": len(labels) / seconds,
        }  # fmt: skip
        if grid_images is None:
            grid_images = images
    pixels = to_uint8(grid_images)  # (200, 8, 8, 1)
    save_grid(pixels, out / "samples.png", nrow=PER_CLASS)
    save_samples(str(out / "samples.npz"), pixels.repeat(3, axis=-1), labels.numpy())  # ADM's RGB layout
    pick = torch.randperm(len(judge.train_images), generator=torch.Generator().manual_seed(0))[: len(labels)]
    real_ref = judge.train_images[pick]
    report = {
        "samplers": results,
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
