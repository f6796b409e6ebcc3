"""How far FSDP2 and DDP drift apart: the same tiny run (digits, 2 CPU processes, gloo) under DDP and
under --fsdp, in fp32 and bf16, checkpointed every step; prints and writes the largest weight
difference after each step as JSON. Usage: python benchmarks/fsdp_vs_ddp.py [--steps 40] [--out FILE]"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run(results: Path, steps: int, precision: str, fsdp: bool) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1",
           "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ditlab",
           "train", "--data", "digits", "--results", str(results), "--model", "DiT-S/2", "--depth", "2",
           "--hidden-size", "32", "--num-heads", "2", "--image-size", "8", "--global-batch-size", "16",
           "--num-workers", "0", "--sample-every", "0", "--max-steps", str(steps), "--ckpt-every", "1",
           "--log-every", "1", "--device", "cpu", "--no-progress", "--precision", precision, "--lr", "1e-4",
           *(["--fsdp"] if fsdp else [])]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, capture_output=True)


def max_difference(a: Path, b: Path, step: int) -> float:
    name = f"checkpoints/step-{step:07d}.pt"
    x, y = (torch.load(p / name, weights_only=True)["model"] for p in (a, b))
    return max((x[k] - y[k]).abs().max().item() for k in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    report = {"setup": "DiT depth 2 hidden 32 on 8x8 digits, batch 16 over 2 CPU processes (gloo), AdamW lr 1e-4",
              "max_abs_weight_difference": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            ddp, fsdp = Path(tmp) / f"ddp-{precision}", Path(tmp) / f"fsdp-{precision}"
            run(ddp, args.steps, precision, fsdp=False)
            run(fsdp, args.steps, precision, fsdp=True)
            diffs = [max_difference(ddp, fsdp, s) for s in range(1, args.steps + 1)]
            report["max_abs_weight_difference"][precision] = diffs
            print(precision, "after step 1:", diffs[0], f"after {args.steps}:", diffs[-1], "max:", max(diffs))
    if args.out:
        from ditlab.runtime.files import atomic_write_text

        atomic_write_text(Path(args.out), json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
