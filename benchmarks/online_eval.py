"""The overhead of online evaluation (`ditlab train --eval-every`) on a digits run: the same
`ditlab train` command with and without it, each a fresh process (so torch's import and the digits
judge's one-time training are counted where they fall), alternating off / on for --repeats rounds in
one session. Wall time and CPU time (user + system of the child) per run, their medians, the ratios
on / off, and the evaluation's own sampling and scoring seconds as the runs logged them; the CPU
model and the load average before and after are recorded (the machine may be shared: the ratio of
runs side by side holds better than either time alone).

    PYTHONPATH=src python benchmarks/online_eval.py --out benchmarks/results/online_eval_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from data_common import device_name  # noqa: E402

# The demo's model and recipe (ditlab.demo.DEMO_TRAIN), shortened.
TRAIN = ["--data", "digits", "--model", "DiT-S/2", "--depth", "4", "--hidden-size", "128", "--num-heads", "4",
         "--image-size", "8", "--global-batch-size", "128", "--lr", "1e-3", "--ema-decay", "0.995",
         "--sample-every", "0", "--log-every", "100", "--num-workers", "0", "--precision", "fp32",
         "--device", "cpu", "--no-progress"]  # fmt: skip


def run_once(results: Path, steps: int, evaluation: list[str]) -> dict:
    """One `ditlab train` in a child process: wall and CPU seconds, and its logged evaluation rows."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "ditlab", "train", *TRAIN, "--results", str(results), "--max-steps", str(steps),
           "--ckpt-every", str(steps), *evaluation]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rows = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]
    evals = [row["eval"] for row in rows if "eval" in row]
    return {"wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "evaluations": len(evals), "eval_sampling_s": sum(e["sampling_seconds"] for e in evals),
            "eval_scoring_s": sum(e["scoring_seconds"] for e in evals),
            "last": {k: evals[-1][k] for k in ("judge_fd", "judge_accuracy")} if evals else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--eval-steps", type=int, default=25)
    p.add_argument("--eval-batch-size", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    evaluation = ["--eval-every", str(args.eval_every), "--eval-samples", str(args.eval_samples), "--eval-steps",
                  str(args.eval_steps), "--eval-batch-size", str(args.eval_batch_size)]
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, flags in (("off", []), ("on", evaluation)):
                folder = Path(tmp) / f"{name}{r}"
                runs[name].append(run_once(folder, args.steps, flags))
                shutil.rmtree(folder)
    med = {name: {k: statistics.median(run[k] for run in rs) for k in ("wall_s", "cpu_s")} for name, rs in runs.items()}
    import torch

    result = {
        "setup": f"ditlab train on digits, the demo's DiT (depth 4, hidden 128), batch 128, {args.steps} steps, "
                 f"fp32, 1 CPU process; online evaluation every {args.eval_every} steps and at the end: "
                 f"{args.eval_samples} images, DDPM {args.eval_steps} steps, batch {args.eval_batch_size}, "
                 "scored by the digits judge (trained once per run)",
        "command_flags": {"train": TRAIN, "evaluation": evaluation},
        "runs": runs,
        "median": med,
        "ratio_on_over_off": {k: med["on"][k] / med["off"][k] for k in ("wall_s", "cpu_s")},
        "overhead_per_evaluation_cpu_s": (med["on"]["cpu_s"] - med["off"]["cpu_s"]) / runs["on"][0]["evaluations"],
        "cpu": device_name(torch.device("cpu")),
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
