"""The modern block options and REPA on the bundled digits, on a CPU (docs/models.md, issue 24 part 4).

At one config (the cpu-mini study's S/2: depth 2, width 64, 2 heads, patch 2, 16 tokens) and equal
training steps and images, for each training seed: the paper's block, each option alone (rmsnorm,
qk-norm rmsnorm, swiglu, sincos+rope), all four together, and the paper's block with REPA; each
judged at every evaluation point by the digits judge's Frechet distance (evaluation/digits_judge.py)
to the held-out digits, from 250 class-balanced samples (32 DDPM steps, sample seed 0). The sizes
fit well under 20 CPU-minutes for the 14 runs on a shared, loaded 2-core machine.

REPA's encoder must be frozen and must not be the judge (aligning to the judge's own features would
teach to the test). It is ditlab's named `digits-dae` (evaluation/dae_encoder.py): a small denoising
convolutional autoencoder trained on the training digits without labels (self-supervised: reconstruct
the clean digit from a noisy one), cached in $DITLAB_HOME; its encoder's 4 x 4 x 64 feature map is the
target grid, the DiT's own 4 x 4 tokens. (The table in docs/models.md was measured at commit e70f66b
with the same network trained inside this script: 200 random batches instead of 16 shuffled epochs.)
The judge is an MLP classifier trained with labels on flattened pixels: another network, objective
and input.

    PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/repa_digits_study.py --out DIR --seeds 0
    PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/repa_digits_study.py --out DIR --seeds 1   # in parallel
    (--entries baseline rmsnorm ... splits one seed's entries between processes)
    PYTHONPATH=src python scripts/repa_digits_study.py --out DIR --table   # the markdown table of both

Each (entry, seed) writes DIR/<entry>-seed<k>.json (its distances, wall and CPU seconds); a finished
one is skipped when the command runs again."""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch

MODEL = dict(model="DiT-S/2", depth=2, hidden_size=64, num_heads=2, patch_size=2)  # cpu-mini's S/2
TRAIN = dict(data="digits", image_size=8, global_batch_size=64, lr=1e-3, ema_decay=0.995, precision="fp32",
             num_workers=0, log_every=100, sample_every=0, progress=False)  # cpu-mini's settings
EVAL_STEPS = (400, 800)
NUM_SAMPLES, SAMPLE_STEPS, SAMPLE_SEED = 250, 32, 0
REPA = dict(repa_coeff=0.5, repa_width=128)  # REPA's lambda; projector width 2 x the DiT's (REPA: 2048 at 1152)
ENTRIES: dict[str, dict] = {
    "baseline": {},
    "rmsnorm": {"norm": "rmsnorm"},
    "qk-norm": {"qk_norm": "rmsnorm"},
    "swiglu": {"mlp": "swiglu"},
    "rope": {"pos": "sincos+rope"},
    "all-four": {"norm": "rmsnorm", "qk_norm": "rmsnorm", "mlp": "swiglu", "pos": "sincos+rope"},
    "repa": {"repa": True},
}
ENCODER = "digits-dae"  # evaluation/dae_encoder.py


def frechet_at(ckpt: Path, judge, real: torch.Tensor, work: Path) -> float:
    from ditlab.data.npz import read_samples
    from ditlab.sampling.run import sample_to_files

    npz = work / "samples.npz"
    sample_to_files(str(ckpt), str(npz), num_samples=NUM_SAMPLES, classes=list(range(10)), steps=SAMPLE_STEPS,
                    sampler="ddpm", seed=SAMPLE_SEED, batch_size=NUM_SAMPLES, device="cpu", precision="fp32",
                    progress=False)  # fmt: skip
    pixels, _ = read_samples(npz)
    npz.unlink()
    images = (torch.from_numpy(pixels[..., :1]).permute(0, 3, 1, 2).float() - 127.5) / 127.5  # (N, 1, 8, 8)
    return judge.frechet(images, real)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(out: Path, seed: int, judge, real: torch.Tensor, entries: list[str]) -> None:
    from ditlab.checkpoints.state import checkpoint_path
    from ditlab.training import TrainConfig, train

    for name in entries:
        options = ENTRIES[name]
        record = out / f"{name}-seed{seed}.json"
        if record.is_file():
            continue
        results, wall, cpu = out / "runs" / f"{name}-seed{seed}", time.time(), cpu_seconds()
        repa = options.get("repa", False)
        block = {k: v for k, v in options.items() if k != "repa"}
        distances = {}
        for step in EVAL_STEPS:
            cfg = TrainConfig(results=str(results), seed=seed, max_steps=step, ckpt_every=step, **MODEL, **TRAIN,
                              **block, **(dict(REPA, repa_encoder=ENCODER) if repa else {}))  # fmt: skip
            train(cfg, device="cpu")
            distances[step] = frechet_at(checkpoint_path(results / "checkpoints", step), judge, real, results)
        row = {"entry": name, "seed": seed, "options": options, "frechet": distances,
               "wall_seconds": time.time() - wall, "cpu_seconds": cpu_seconds() - cpu, "load": os.getloadavg()}
        record.write_text(json.dumps(row, indent=1) + "\n")
        print(json.dumps(row), flush=True)


def table(out: Path) -> str:
    """The markdown table: each entry's distance per seed and their mean and half-difference at each point."""
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*-seed*.json"))]
    head = "| block | " + " | ".join(f"FD @ {s} (seeds)" for s in EVAL_STEPS) + " | mean @ last ± half-gap |"
    lines = [head, "|---" * (len(EVAL_STEPS) + 2) + "|"]
    for name in ENTRIES:
        mine = sorted((r for r in rows if r["entry"] == name), key=lambda r: r["seed"])
        if not mine:
            continue
        cells = [" / ".join(f"{r['frechet'][str(s)]:.2f}" for r in mine) for s in EVAL_STEPS]
        last = [r["frechet"][str(EVAL_STEPS[-1])] for r in mine]
        spread = (max(last) - min(last)) / 2
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {sum(last) / len(last):.2f} ± {spread:.2f} |")
    cpu = sum(r["cpu_seconds"] for r in rows)
    wall = sum(r["wall_seconds"] for r in rows)
    lines.append(f"\n{len(rows)} runs: {cpu / 60:.1f} CPU-minutes, {wall / 60:.1f} wall-minutes summed over runs")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--entries", nargs="+", choices=list(ENTRIES), default=list(ENTRIES),
                    help="run only these entries (several processes can share the work)")
    ap.add_argument("--table", action="store_true", help="print the table of the finished runs in --out")
    args = ap.parse_args()
    if args.table:
        print(table(args.out))
        return
    from ditlab.data.digits import load_digits_arrays
    from ditlab.evaluation.digits_judge import DigitsJudge

    args.out.mkdir(parents=True, exist_ok=True)
    started, cpu = time.time(), cpu_seconds()
    from ditlab.evaluation.dae_encoder import RECIPES, load_dae_encoder

    load_dae_encoder(RECIPES[ENCODER], progress=True)  # trained once (cached), before the runs are timed
    judge, real = DigitsJudge(), load_digits_arrays("test")[0]
    floor = judge.frechet(judge.train_images[:NUM_SAMPLES], real)
    print(json.dumps({"encoder": ENCODER, "encoder_seconds": time.time() - started,
                      "encoder_cpu_seconds": cpu_seconds() - cpu, "real_train_vs_test_frechet": floor}), flush=True)
    for seed in args.seeds:
        run(args.out, seed, judge, real, args.entries)


if __name__ == "__main__":
    main()
