"""The cost of guidance with an interval and of autoguidance, side by side with constant classifier-free
guidance and with unguided sampling: model calls (rows of the model's batches per image) counted, and the
wall time of whole sampling runs, alternated ABBA after a warm-up so that the machine's load hits all alike.

Outside the interval a step calls the model once on N rows instead of once on 2N (CFG) or twice on N
(autoguidance: the main model and the guide), so the saving is the share of unguided steps. The model is
the digits demo's DiT (depth 4, width 128, 8x8 pixels, 1 channel; random weights: the cost does not
depend on them), the guide a second one of the same size. JSON out (CPU model and load average in it).

    PYTHONPATH=src python benchmarks/guidance.py [--batch-size 64 --steps 50 --rounds 4 --out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from data_common import device_name  # noqa: E402
from dit_common import alternate, summarize, write_result  # noqa: E402

import ditlab  # noqa: E402
from ditlab.diffusion.guidance import Guidance  # noqa: E402
from ditlab.diffusion.samplers import step_plan  # noqa: E402
from ditlab.sampling.generate import generate  # noqa: E402

DEMO_MODEL = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=128, depth=4, num_heads=4, num_classes=10)
SCALE = 2.0
INTERVAL = (0.28, 5.42)  # the interval paper's EDM2-S interval in sigma


class Rows(torch.nn.Module):
    """The model, counting the rows it is called on."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.num_classes, self.null_class, self.rows = model, model.num_classes, model.null_class, 0
        self.eval()

    def forward(self, x, t, y=None):
        self.rows += x.shape[0]
        return self.model(x, t, y)


def random_model(seed: int) -> torch.nn.Module:
    model = ditlab.DiT(**DEMO_MODEL).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return Rows(model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddpm")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    load_before = os.getloadavg()
    main_model, guide = random_model(0), random_model(1)
    process, device = ditlab.Diffusion(), torch.device("cpu")
    labels = torch.arange(args.batch_size) % DEMO_MODEL["num_classes"]
    settings = {
        "unguided": Guidance(),
        "cfg": Guidance(scale=SCALE),
        "cfg_interval": Guidance(scale=SCALE, interval=INTERVAL),
        "autoguidance": Guidance(scale=SCALE, guide=guide),
        "autoguidance_interval": Guidance(scale=SCALE, guide=guide, interval=INTERVAL),
    }

    def runner(guidance: Guidance):
        return lambda: generate(main_model, process, labels, 0, range(args.batch_size), latent_shape=(1, 8, 8),
                                steps=args.steps, sampler=args.sampler, guidance=guidance)

    rows: dict[str, float] = {}
    for name, guidance in settings.items():  # model rows per image, counted on one run
        main_model.rows = guide.rows = 0
        runner(guidance)()
        rows[name] = (main_model.rows + guide.rows) / args.batch_size
    started = time.time()
    times = alternate({k: runner(g) for k, g in settings.items()}, device, warmup=1, rounds=args.rounds, steps=1,
                      log=lambda s: print(s, file=sys.stderr))
    cfg_s = summarize(times["cfg"])["median_s"]
    auto_s = summarize(times["autoguidance"])["median_s"]
    result = {
        "benchmark": "guidance", "device": device_name(device), "platform": platform.platform(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "seconds_measuring": time.time() - started,
        "model": DEMO_MODEL, "batch_size": args.batch_size, "sampler": args.sampler, "steps": args.steps,
        "cfg_scale": SCALE, "interval_sigma": list(INTERVAL),
        "guided_steps_in_interval": sum(step_plan(process.respace(args.steps), settings["cfg_interval"])),
        "model_rows_per_image": rows,
        "seconds_per_run": {k: summarize(v) for k, v in times.items()},
        "ratio_to_cfg": {k: summarize(v)["median_s"] / cfg_s for k, v in times.items()},
        "autoguidance_interval_to_autoguidance": summarize(times["autoguidance_interval"])["median_s"] / auto_s,
        "note": "the machine is shared: ratios side by side hold, absolute seconds move with its load",
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
