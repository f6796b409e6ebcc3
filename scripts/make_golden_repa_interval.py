"""Write tests/data/golden_repa_interval.npz: which model evaluations REPA's own samplers guide
(github.com/sihyun-yu/REPA, samplers.py: `euler_sampler` with and without Heun, and
`euler_maruyama_sampler`) for a few (num_steps, guidance_low, guidance_high), for
tests/test_guidance.py to compare ditlab's `--guidance-t` with, without the reference installed.

    python scripts/make_golden_repa_interval.py --repa-repo PATH/TO/sihyun-yu/REPA [--out FILE]

REPA's samplers import only torch and numpy. The model is a stand-in that records, for every call, the
time it is given and whether the batch is doubled (REPA guides by calling the model on 2N inputs, the
null label in the second half); its velocity is -x. REPA counts time the other way from SiT and ditlab
(t = 1 noise, 0 data) and guides where guidance_low <= t <= guidance_high, decided once per step at the
step's first time. This script does not import ditlab.

Stored per case "{sampler}_{steps}_{low}_{high}": "t" (calls,) float64 the time of each call in REPA's
convention, "guided" (calls,) bool; and "cases", the JSON list of (sampler, steps, low, high, heun)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_golden import reference_commit  # noqa: E402

CASES = [  # (sampler, num_steps, guidance_low, guidance_high); REPA's ImageNet setting is 0.0, 0.7
    ("euler", 10, 0.0, 0.7),
    ("euler", 10, 0.25, 0.75),
    ("euler", 50, 0.0, 0.7),
    ("heun", 10, 0.0, 0.7),
    ("heun", 7, 0.3, 1.0),
    ("sde", 10, 0.0, 0.7),
    ("sde", 9, 0.2, 0.65),
]
N = 2  # images
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "golden_repa_interval.npz"


class Recorder:
    """REPA's model interface: model(x, t, y=...) -> a tuple whose first item is the output."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.guided: list[bool] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor]:
        self.times.append(float(t[0]))
        self.guided.append(x.shape[0] == 2 * N)
        return (-x,)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repa-repo", required=True, help="a checkout of sihyun-yu/REPA")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--ref-commit", default=None, help="the reference's commit (default: read from its .git)")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("repa_samplers", Path(args.repa_repo) / "samplers.py")
    repa = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(repa)
    arrays: dict[str, np.ndarray] = {}
    latents = torch.randn(N, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.zeros(N, dtype=torch.long)
    for sampler, steps, low, high in CASES:
        rec = Recorder()
        if sampler == "sde":
            torch.manual_seed(0)  # REPA's SDE draws from the global generator
            repa.euler_maruyama_sampler(rec, latents, y, num_steps=steps, cfg_scale=1.8, guidance_low=low,
                                        guidance_high=high)
        else:
            repa.euler_sampler(rec, latents, y, num_steps=steps, heun=sampler == "heun", cfg_scale=1.8,
                               guidance_low=low, guidance_high=high)
        key = f"{sampler}_{steps}_{low}_{high}"
        arrays[f"{key}/t"] = np.array(rec.times, dtype=np.float64)
        arrays[f"{key}/guided"] = np.array(rec.guided, dtype=bool)
    arrays["cases"] = np.array(json.dumps(CASES))
    arrays["reference_commit"] = np.array(args.ref_commit or reference_commit(args.repa_repo))
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: {len(CASES)} cases")


if __name__ == "__main__":
    main()
