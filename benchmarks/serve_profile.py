"""Where a shared batch of `ditlab serve` spends its time, per image, at 1, 4 and 16 images a
batch: the model's forward, the sampler's per-step Python work around it, and the PNG and record of
each response; and which operators the forward spends its time in at one image and at sixteen.
The ceiling of what batching can gain is the per-image time alone over the per-image time in a
full batch. Times are the CPU time of the one thread doing the work (torch on --threads threads,
default 1), which other processes' load moves little; the operator shares come from torch's
profiler (wall time). The model and request are those of benchmarks/serve.py (the demo's shape,
50 guided DDPM steps). JSON to stdout and --out.

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 PYTHONPATH=src \\
        python benchmarks/serve_profile.py --out benchmarks/results/serve_profile_cpu_avx2.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")  # as benchmarks/serve.py
import torch  # noqa: E402
from dit_common import write_result  # noqa: E402
from serve_helpers import save_digits_checkpoint  # noqa: E402

import ditlab  # noqa: E402
from ditlab.runtime.cpu_facts import cpu_model  # noqa: E402
from ditlab.serve.engine import Engine  # noqa: E402
from ditlab.serve.record import grid_png, sample_record  # noqa: E402
from ditlab.serve.requests import SampleRequest  # noqa: E402

ISA_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")


class TimedModel(torch.nn.Module):
    """The engine's model, adding up the thread CPU time of its forwards."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.cpu_s = net, 0.0
        self.num_classes, self.null_class = net.num_classes, net.null_class

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        start = time.thread_time()
        out = self.net(x, t, y)
        self.cpu_s += time.thread_time() - start
        return out


def requests(n: int, steps: int, cfg_scale: float) -> list[SampleRequest]:
    return [SampleRequest(classes=[i % 10], per_class=1, cfg_scale=cfg_scale, sampler="ddpm", steps=steps, seed=i)
            for i in range(n)]  # fmt: skip


def batch_row(engine: Engine, timed: TimedModel, n: int, steps: int, cfg_scale: float, repeats: int) -> dict:
    """Median CPU seconds per image of one batch of n one-image requests, split into its parts."""
    parts = {"model": [], "sampler": [], "png": []}
    for _ in range(repeats):
        reqs = requests(n, steps, cfg_scale)
        timed.cpu_s = 0.0
        start = time.thread_time()
        images = engine.run(reqs)
        total = time.thread_time() - start
        start = time.thread_time()
        for req, image in zip(reqs, images, strict=True):
            grid_png(image, 1, sample_record(engine.meta, req.settings()))
        parts["png"].append((time.thread_time() - start) / n)
        parts["model"].append(timed.cpu_s / n)
        parts["sampler"].append((total - timed.cpu_s) / n)
    row = {f"{k}_cpu_s_per_image": round(statistics.median(v), 5) for k, v in parts.items()}
    row["total_cpu_s_per_image"] = round(sum(row.values()), 5)
    return {"images": n, "model_rows": n * (2 if cfg_scale > 1 else 1), **row}


def operator_shares(net: torch.nn.Module, rows: int, latent: tuple[int, int, int], top: int = 8) -> dict:
    """The forward's operators by share of self time (torch's profiler), at `rows` model rows."""
    x, t = torch.randn(rows, *latent), torch.randint(0, 1000, (rows,))
    y = torch.randint(0, 10, (rows,))
    with torch.inference_mode():
        for _ in range(3):
            net(x, t, y)
        start = time.thread_time()
        for _ in range(20):
            net(x, t, y)
        forward_ms = (time.thread_time() - start) / 20 * 1e3
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                net(x, t, y)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return {"rows": rows, "forward_cpu_ms": round(forward_ms, 3),
            "self_time_share": {e.key: round(e.self_cpu_time_total / total, 3) for e in events[:top]}}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg-scale", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    model = ditlab.DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=128, depth=4, num_heads=4,
                       num_classes=10).eval()  # fmt: skip
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"ditlab-serve-profile-{os.getpid()}.pt"
    try:
        engine = Engine(save_digits_checkpoint(tmp, model), device="cpu", precision=args.precision)
    finally:
        tmp.unlink(missing_ok=True)
    timed = TimedModel(engine.net)
    engine.net = timed
    batch_row(engine, timed, 1, args.steps, args.cfg_scale, 1)  # warm-up
    rows = [batch_row(engine, timed, n, args.steps, args.cfg_scale, args.repeats) for n in args.sizes]
    alone, full = rows[0]["total_cpu_s_per_image"], rows[-1]["total_cpu_s_per_image"]
    per_row = 2 if args.cfg_scale > 1 else 1
    ops = [operator_shares(timed.net, n * per_row, engine.latent_shape) for n in (args.sizes[0], args.sizes[-1])]
    result = {"benchmark": "serve_profile", "model": "DiT depth 4, width 128, patch 2, 8x8x1 pixels (the demo's shape)",
              "request": {"per_class": 1, "steps": args.steps, "sampler": "ddpm", "cfg_scale": args.cfg_scale},
              "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_model(),
              "capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
              "precision": args.precision, "autocast": engine.meta["autocast"],
              "isa_caps": {k: os.environ[k] for k in ISA_VARS if k in os.environ},
              "load_average_before": load_before, "load_average_after": os.getloadavg()[0], "batches": rows,
              f"batching_ceiling_{args.sizes[-1]}": round(alone / full, 2), "operators": ops}  # fmt: skip
    write_result(result, args.out)


if __name__ == "__main__":
    main()
