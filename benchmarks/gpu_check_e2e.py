"""What gpu_check's end-to-end steps start from and judge: synthetic images, a random VAE and
random Inception weights in the real layouts, a reference batch, and the comparison of two
training runs' final weights. Everything runs on the CPU of the calling process (the CLI
commands under test run in child processes)."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from data_common import SD_VAE_CONFIG, make_jpeg_folder
from gpu_check_runner import last_line

# A 2-stage AutoencoderKL (downsamples by 2) standing in for the SD VAE in the smoke run.
TINY_VAE_CONFIG = {**SD_VAE_CONFIG, "down_block_types": ["DownEncoderBlock2D"] * 2,
                   "up_block_types": ["UpDecoderBlock2D"] * 2, "block_out_channels": [8, 16],
                   "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 32}  # fmt: skip
# The resumed run may differ from the uninterrupted one by at most this share of how far the
# uninterrupted run's weights moved in its second half (non-deterministic kernels are allowed).
RESUME_TOLERANCE = 1e-2


def make_vae_folder(path: Path, config: dict[str, Any], seed: int = 0) -> str:
    """A randomly initialised diffusers AutoencoderKL with `config`, saved as save_pretrained does."""
    from diffusers import AutoencoderKL

    if not (path / "config.json").is_file():
        torch.manual_seed(seed)
        AutoencoderKL(**config).save_pretrained(path)
    return str(path)


def make_images(path: Path, n: int) -> str:
    """n synthetic ImageNet-sized JPEGs in 4 class folders."""
    return make_jpeg_folder(str(path), n)


def random_inception_weights(path: Path, seed: int = 0) -> str:
    """Random weights in the layout of torch-fidelity's converted TF InceptionV3 file (no BN step
    counters), He-scaled so activations stay finite through the network; saved under the real name."""
    from ditlab.evaluation.inception import WEIGHTS_FILENAME, random_state_dict

    out = path / WEIGHTS_FILENAME
    if out.is_file():
        return str(out)
    weights = random_state_dict(seed)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(weights, out)
    return str(out)


def reference_batch(path: Path, n: int, size: int, seed: int = 0) -> str:
    """ADM's reference layout without precomputed statistics: arr_0 uint8 (n, size, size, 3)."""
    from ditlab.evaluation import save_samples

    rng = np.random.default_rng(seed)
    save_samples(str(path), rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    return str(path)


def final_checkpoint(results: Path) -> dict[str, Any]:
    """The newest checkpoint of a training run's folder, loaded on the CPU."""
    from ditlab.checkpoints.state import list_checkpoints, load_checkpoint

    found = list_checkpoints(results / "checkpoints")
    if not found:
        raise RuntimeError(f"{results}: no checkpoint written")
    return load_checkpoint(found[-1][1])


@dataclass
class RunComparison:
    """Two runs' final weights (model and EMA): bitwise equal, or how far apart."""

    step: int
    bitwise: bool
    max_abs_diff: float
    moved: float  # max |w(end) - w(middle)| of the reference run: the scale the tolerance refers to
    within_tolerance: bool

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "tolerance": RESUME_TOLERANCE,
                "rule": "bitwise, or max |a - b| <= tolerance x the reference run's movement over its second half"}


def compare_runs(reference: dict[str, Any], middle: dict[str, Any], other: dict[str, Any]) -> RunComparison:
    """`other`'s final weights against `reference`'s (both at the same step); `middle` is the
    reference run's checkpoint halfway, to scale the tolerance by what training changes."""
    if reference["step"] != other["step"]:
        raise RuntimeError(f"runs stopped at steps {reference['step']} and {other['step']}")
    bitwise, diff, moved = True, 0.0, 0.0
    for part in ("model", "ema"):
        for key, a in reference[part].items():
            b = other[part][key]
            bitwise &= torch.equal(a, b)
            diff = max(diff, (a.double() - b.double()).abs().max().item() if a.numel() else 0.0)
            if part == "model" and a.numel():
                moved = max(moved, (a.double() - middle[part][key].double()).abs().max().item())
    ok = bitwise or (moved > 0 and diff <= RESUME_TOLERANCE * moved)
    return RunComparison(int(reference["step"]), bitwise, diff, moved, ok)


def count_images(folder: str) -> int:
    """JPEGs under an image folder."""
    return sum(name.endswith(".jpg") for _, _, names in os.walk(folder) for name in names)


# The end-to-end steps of gpu_check, in the order they run: each uses what the one before left in
# c.context, and runs the real CLI (`python -m ditlab ...`) in child processes.

def e2e_extract(c) -> dict[str, Any]:
    """`ditlab extract-latents` on synthetic JPEGs with the SD VAE architecture (random weights;
    fp16 on CUDA by --precision auto): the latent cache the training steps read."""
    from gpu_check_runner import StepFailed

    s, work = c.sizes, c.work
    images = make_images(work / "images", s["e2e_images"])
    vae = make_vae_folder(work / ("vae-tiny" if c.smoke else "sd-vae-random"), TINY_VAE_CONFIG if c.smoke
                          else SD_VAE_CONFIG)  # fmt: skip
    cache = work / "latents"
    start = time.monotonic()
    proc = c.run([sys.executable, "-m", "ditlab", "extract-latents", "--data", images, "--out", str(cache), "--vae",
                  vae, "--image-size", str(s["e2e_image"]), "--batch-size", "32", "--shard-size", "128"])  # fmt: skip
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise StepFailed(f"extract-latents exited {proc.returncode}: {last_line(proc.stderr)}")
    index = json.loads((cache / "index.json").read_text())
    n = count_images(images)
    c.context.update(cache=str(cache), vae=vae)
    return {"images": n, "seconds_with_startup": seconds, "images_per_s_with_startup": n / seconds,
            "index": {k: v for k, v in index.items() if k not in ("shards", "files", "skipped")}}


def _train(c, results: Path, steps: int, torchrun: bool) -> None:
    from gpu_check_runner import StepFailed

    s = c.sizes
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if torchrun \
        else [sys.executable]  # fmt: skip
    argv = [*launcher, "-m", "ditlab", "train", "--data", c.context["cache"], "--results", str(results),
            "--model", "DiT-S/2", *s["e2e_model"], "--image-size", str(s["e2e_image"]),
            "--global-batch-size", str(s["e2e_batch"]), "--max-steps", str(steps), "--ckpt-every",
            str(s["e2e_steps"] // 2), "--log-every", "1", "--sample-every", "0", "--num-workers", "2",
            "--precision", s["precision"], "--device", s["device"], "--no-progress", *(["--fsdp"] if torchrun else [])]
    proc = c.run(argv)
    if proc.returncode != 0:
        raise StepFailed(f"train{' (torchrun --fsdp)' if torchrun else ''} exited {proc.returncode}: "
                         f"{last_line(proc.stderr)}")


def e2e_train(c) -> dict[str, Any]:
    """`ditlab train` for e2e_steps from the latent cache, uninterrupted; stopped halfway and
    resumed by the same command; and under `torchrun --nproc_per_node=1 --fsdp`, stopped and
    resumed likewise. Both resumed runs are compared with the uninterrupted one."""
    from gpu_check_runner import StepFailed

    n, half, work = c.sizes["e2e_steps"], c.sizes["e2e_steps"] // 2, c.work
    start = time.monotonic()
    _train(c, work / "run-straight", n, torchrun=False)
    straight_s = time.monotonic() - start
    for steps in (half, n):
        _train(c, work / "run-resumed", steps, torchrun=False)
    for steps in (half, n):
        _train(c, work / "run-fsdp-resumed", steps, torchrun=True)
    from ditlab.checkpoints.state import list_checkpoints, load_checkpoint

    ref = final_checkpoint(work / "run-straight")
    middle = load_checkpoint(dict(list_checkpoints(work / "run-straight" / "checkpoints"))[half])
    single = compare_runs(ref, middle, final_checkpoint(work / "run-resumed"))
    fsdp = compare_runs(ref, middle, final_checkpoint(work / "run-fsdp-resumed"))
    metrics = [json.loads(line) for line in (work / "run-straight" / "metrics.jsonl").read_text().splitlines()]
    c.context["ckpt"] = str(dict(list_checkpoints(work / "run-straight" / "checkpoints"))[n])
    result = {"steps": n, "resumed_at": half, "straight_run_seconds_with_startup": straight_s,
              "deterministic_algorithms": False, "single_resumed_vs_straight": single.as_dict(),
              "fsdp_resumed_vs_straight": fsdp.as_dict(), "loss_first_last": [metrics[0]["loss"], metrics[-1]["loss"]],
              "images_per_s_last_log": metrics[-1].get("images_per_sec")}  # fmt: skip
    if not (single.within_tolerance and fsdp.within_tolerance):
        raise StepFailed(f"resumed runs differ from the uninterrupted one: {json.dumps(result)}")
    return result


def e2e_sample(c) -> dict[str, Any]:
    """`ditlab sample` of the trained checkpoint to ADM's .npz, guided, through the random VAE."""
    from gpu_check_runner import StepFailed

    s = c.sizes
    npz = c.work / "samples.npz"
    start = time.monotonic()
    proc = c.run([sys.executable, "-m", "ditlab", "sample", "--ckpt", c.context["ckpt"], "--vae", c.context["vae"],
                  "--num-samples", str(s["samples"]), "--steps", str(s["sample_steps"]), "--cfg-scale", "1.5",
                  "--batch-size", "32", "--out", str(npz), "--device", s["device"], "--no-progress"])  # fmt: skip
    if proc.returncode != 0:
        raise StepFailed(f"sample exited {proc.returncode}: {last_line(proc.stderr)}")
    with np.load(npz) as f:
        images, labels = f["arr_0"], f["arr_1"]
    want = (s["samples"], s["e2e_image"], s["e2e_image"], 3)
    if images.shape != want or images.dtype != np.uint8 or labels.shape != (s["samples"],):
        raise StepFailed(f"samples.npz holds arr_0 {images.shape} {images.dtype}, arr_1 {labels.shape}; want {want}")
    c.context["samples"] = str(npz)
    return {"images": int(images.shape[0]), "shape": list(images.shape), "seconds_with_startup":
            time.monotonic() - start, "stdout": last_line(proc.stdout)}  # fmt: skip


def e2e_eval(c) -> dict[str, Any]:
    """`ditlab eval` of the samples against a random reference batch, with random Inception
    weights in the real layout: the path runs and every metric is finite (the values mean nothing)."""
    from gpu_check_runner import StepFailed

    weights = random_inception_weights(c.work / "inception")
    ref = reference_batch(c.work / "ref.npz", c.sizes["samples"], c.sizes["e2e_image"])
    out = c.work / "metrics.json"
    proc = c.run([sys.executable, "-m", "ditlab", "eval", c.context["samples"], ref, "--inception", weights,
                  "--batch-size", "32", "--out", str(out)])  # fmt: skip
    if proc.returncode != 0:
        raise StepFailed(f"eval exited {proc.returncode}: {last_line(proc.stderr)}")
    metrics = json.loads(out.read_text())
    values = {k: metrics.get(k) for k in ("fid", "sfid", "is", "precision", "recall")}
    if not all(isinstance(v, (int, float)) and np.isfinite(v) for v in values.values()):
        raise StepFailed(f"eval gave non-finite or missing metrics: {values}")
    return {"metrics": values, "num_samples": metrics.get("num_samples")}
