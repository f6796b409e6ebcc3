"""ditlab on a GPU, proved and measured by one command: one JSON and its log under --out.

Steps, by priority, each a child process with its own time box under one overall budget (a step
that would start past the budget is recorded as skipped, never run): the machine's measured bf16
peak and copy bandwidth; the GPU-only tests; training steps of DiT-XL/2 (256x256) in bf16, eager
and compiled, with and without activation checkpointing, at batch 256, 64 and 128, beside
diffusers' DiTTransformer2DModel with the same weights in TF32 and in bf16, and DiT-B/4; guided
DDPM sampling steps of XL/2 at batch 64 and 256, eager and compiled; and end to end, `ditlab
extract-latents` (the SD VAE architecture, random weights, fp16), `ditlab train` for 30 steps
from that latent cache, single process and `torchrun --fsdp`, each stopped halfway and resumed
and compared with the uninterrupted run, `ditlab sample` to .npz and `ditlab eval` with random
Inception weights. --smoke runs the same steps at tiny sizes on the CPU (no compile), in seconds.

    PYTHONPATH=src python benchmarks/gpu_check.py --out gpu-check            # on the GPU machine
    PYTHONPATH=src python benchmarks/gpu_check.py --out /tmp/smoke --smoke   # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from gpu_check_runner import Check, StepFailed, run_steps  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
DEFAULT_BUDGET_S = 480.0  # 8 minutes of wall time in all


def sizes(smoke: bool) -> dict:
    """The models, batches and step counts of a run (the real ones, or the smoke run's tiny ones)."""
    if smoke:
        return dict(xl="DiT-S/8", b4="DiT-S/8", image=64, batches=(2, 1, 2), sample_batches=(1, 2), device="cpu",
                    timing=["--warmup", "1", "--rounds", "1", "--steps", "1", "--threads", "1", "--precision",
                            "fp32"], compile=False, e2e_images=8, e2e_image=16, e2e_batch=4, e2e_steps=4,
                    e2e_model=["--depth", "1", "--hidden-size", "32", "--num-heads", "2"], samples=4,
                    sample_steps=2, precision="fp32")  # fmt: skip
    return dict(xl="DiT-XL/2", b4="DiT-B/4", image=256, batches=(256, 64, 128), sample_batches=(64, 256),
                device="cuda", timing=["--warmup", "2", "--rounds", "3", "--steps", "3"], compile=True,
                e2e_images=256, e2e_image=256, e2e_batch=64, e2e_steps=30, e2e_model=[], samples=64,
                sample_steps=50, precision="auto")  # fmt: skip


def variants(s: dict, *names: str) -> str:
    """The train_step variants asked for, less the compiled ones where the run does not compile."""
    kept = [n for n in names if s["compile"] or "block" not in n]
    return ",".join(kept)


def train_bench(model: str, batch: int, spec: str, peer: str, profile: bool = False):
    """A step running benchmarks/train_step.py (ours in bf16 by --precision auto on CUDA)."""

    def step(c: Check) -> dict:
        s = c.sizes
        args = ["--model", s[model], "--image-size", str(s["image"]), "--batch-size", str(s["batches"][batch]),
                "--peer-precision", peer, "--device", s["device"], *s["timing"], *(["--profile"] if profile else [])]
        try:
            return c.bench("train_step.py", [*args, "--variants", variants(s, *spec.split(","))])
        except StepFailed as e:  # what does not fit without checkpointing may fit with it: measure that
            checkpointed = [v for v in spec.split(",") if "ckpt" in v]
            if "out of memory" not in str(e).lower() or not checkpointed or checkpointed == spec.split(","):
                raise
            result = c.bench("train_step.py", [*args, "--variants", variants(s, *checkpointed)])
            return {**result, "out_of_memory": {"variants": spec, "error": str(e)}}

    return step


def sample_bench(batch: int, compile_mode: str, peer: str):
    """A step running benchmarks/sample_step.py: guided DDPM (scale 4.0), images/s for 250 steps."""

    def step(c: Check) -> dict:
        s = c.sizes
        mode = compile_mode if s["compile"] else "none"
        args = ["--model", s["xl"], "--image-size", str(s["image"]), "--batch-size", str(s["sample_batches"][batch]),
                "--compile", mode, "--peer-precision", peer, "--device", s["device"], *s["timing"]]  # fmt: skip
        return c.bench("sample_step.py", args)

    return step


def environment(c: Check) -> dict:
    s = c.sizes
    args = ["--device", s["device"]] + (["--size", "256", "--copy-mib", "8", "--reps", "3"] if c.smoke else [])
    result = c.bench("gpu_env.py", args)
    c.peak = result["matmul_bf16"]["best_tflops"]
    c.datasheet = result["datasheet_bf16_tflops"]
    return result


def gpu_tests(c: Check) -> dict:
    files = sorted(str(p) for p in (REPO / "tests").glob("test_*.py") if "pytest.mark.gpu" in p.read_text())
    out = c.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files])
    summary = (out.stdout.strip().splitlines() or [""])[-1]
    if out.returncode != 0:
        raise StepFailed(f"pytest -m gpu exited {out.returncode}: {summary}")
    return {"files": [os.path.relpath(f, REPO) for f in files], "summary": summary}


def build_steps() -> list[tuple[str, float, object, bool]]:
    """(name, time box in seconds, function, runs in the smoke run), in the order they run."""
    from gpu_check_e2e import e2e_eval, e2e_extract, e2e_sample, e2e_train

    return [
        ("environment", 45, environment, True),
        ("gpu_tests", 120, gpu_tests, True),
        ("train_xl_b256", 150, train_bench("xl", 0, "eager,block,ckpt,block+ckpt", "none", profile=True), True),
        ("train_xl_b64_vs_diffusers_tf32", 100, train_bench("xl", 1, "eager,block", "fp32"), False),
        ("sample_xl_b64_vs_diffusers", 70, sample_bench(0, "none", "fp32"), True),
        ("sample_xl_b256_compiled", 90, sample_bench(1, "model", "none"), False),
        ("e2e_extract_latents", 75, e2e_extract, True),
        ("e2e_train_resume", 150, e2e_train, True),
        ("e2e_sample_npz", 60, e2e_sample, True),
        ("e2e_eval", 60, e2e_eval, True),
        ("train_b4_b256_vs_diffusers_tf32", 70, train_bench("b4", 0, "eager,block", "fp32"), False),
        ("train_xl_b64_vs_diffusers_bf16", 70, train_bench("xl", 1, "eager", "bf16"), False),
        ("train_xl_b128", 70, train_bench("xl", 2, "eager,block,ckpt", "none"), False),
        ("sample_xl_b64_compiled", 70, sample_bench(0, "model", "none"), False),
        ("sample_xl_b256_eager", 50, sample_bench(1, "none", "none"), False),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.log and the work files")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, no compile: checks the script")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="wall-time budget of the whole run")
    p.add_argument("--only", default=None, help="comma-separated step names to run (default: all)")
    args = p.parse_args(argv)
    steps = build_steps()
    names = [name for name, *_ in steps]
    only = args.only.split(",") if args.only else names
    unknown = [n for n in only if n not in names]
    if unknown:
        p.error(f"--only: unknown step {unknown[0]!r}; steps are {', '.join(names)}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {out}: exists and is not a folder")
    c = Check(out=out, smoke=args.smoke, sizes=sizes(args.smoke), deadline=time.monotonic() + args.budget_s)
    chosen = [(n, box, fn, smoke_ok) for n, box, fn, smoke_ok in steps if n in only]
    report = run_steps(c, chosen, {"argv": sys.argv[1:] if argv is None else argv, "budget_s": args.budget_s})
    print(json.dumps({k: report[k] for k in ("passed", "failed", "skipped", "seconds", "json")}, indent=1))
    return 0 if not report["failed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
