"""A guided sampling step, ours beside diffusers' DiTTransformer2DModel of the same size.

A step is one iteration of ditlab's sampler (`Diffusion.sample`, DDPM by default) with
classifier-free guidance: the conditional and null-label halves of the batch in one model call
of 2N images, the guided combination, p_mean_variance and the ancestral update on N. The peer
is diffusers' model holding the same weights, run through the same sampler loop, in fp32 by
default (TF32 on CUDA); ours runs --precision (auto: bf16 on CUDA) and --compile. Both alternate
in one process after warm-up. Reported per runner: the median step, images/s of a full
--full-steps (250) sampling run, model FLOP utilisation (2 FLOPs x the paper's Gflops x 2N per
step, against the device's bf16 peak) and peak memory, and the speed-up over the peer, as JSON.

    PYTHONPATH=src python benchmarks/sample_step.py --model DiT-S/2 --batch-size 4
    PYTHONPATH=src python benchmarks/sample_step.py --model DiT-XL/2 --batch-size 128 --compile model   # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
from dit_common import (  # noqa: E402
    DTYPE_NAMES,
    FLOPS_PER_MAC,
    LATENT_CHANNELS,
    NUM_CLASSES,
    alternate,
    held_bytes,
    make_peer,
    peak_tflops,
    step_peak_bytes,
    step_setup,
    summarize,
    tf32,
    utilization,
    write_result,
)

from ditlab.diffusion.samplers import SAMPLERS  # noqa: E402
from ditlab.options import PRECISIONS  # noqa: E402
from ditlab.runtime.precision import AMP_DTYPES  # noqa: E402
from ditlab.training.parallel import COMPILE_MODES, compile_model  # noqa: E402

GIB = 2**30
GUIDED_BATCH = 2  # the conditional and the null-label half


def sampler_call(model, diffusion, noise, y, args: argparse.Namespace, steps: int, amp, use_tf32: bool):
    """One call of ditlab's sampler over `steps` respaced steps (timed, then divided by steps), with
    the sampler and guidance of `args`."""
    ctx = torch.autocast(noise.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    g = torch.Generator(noise.device).manual_seed(0)

    def run() -> torch.Tensor:
        with ctx, tf32(use_tf32):
            return diffusion.sample(model, noise, y=y, steps=steps, sampler=args.sampler, cfg_scale=args.cfg_scale,
                                    generator=g)

    return run


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=None, help="images N (the model sees 2N); "
                   "default 64 on CUDA, 4 on CPU")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="ours")
    p.add_argument("--compile", default="none", choices=COMPILE_MODES, help="ours")
    p.add_argument("--peer-precision", default="fp32", choices=[*AMP_DTYPES, "none"])
    p.add_argument("--sampler", default="ddpm", choices=list(SAMPLERS))
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--steps", type=int, default=None, help="sampler steps per timed call (default 10 CUDA, 2 CPU)")
    p.add_argument("--full-steps", type=int, default=250, help="steps of the sampling run images/s refers to")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    setup = step_setup(args, cuda_batch=64, cpu_batch=4)
    device, batch, steps, latent, amp = setup.device, setup.batch, setup.steps, setup.latent, setup.amp
    base, macs, diffusion, g = setup.model.eval(), setup.macs, setup.diffusion, setup.generator
    noise = torch.randn(batch, LATENT_CHANNELS, latent, latent, generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)

    base.requires_grad_(False)  # as the EMA weights one samples from
    ours = compile_model(copy.deepcopy(base).to(device).eval(), args.compile)
    runners = {"ours": sampler_call(ours, diffusion, noise, y, args, steps, amp, False)}
    models = {"ours": ours}
    info = {"ours": {"precision": DTYPE_NAMES[amp], "precision_flag": args.precision, "compile": args.compile}}
    if args.peer_precision != "none":
        peer = make_peer(base).to(device).eval()
        peer_amp = AMP_DTYPES[args.peer_precision]
        use_tf32 = peer_amp is None and device.type == "cuda"
        runners["peer"] = sampler_call(peer, diffusion, noise, y, args, steps, peer_amp, use_tf32)
        models["peer"] = peer
        info["peer"] = {"model": "diffusers.DiTTransformer2DModel", "precision": args.peer_precision, "tf32": use_tf32}

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    times = alternate(runners, device, args.warmup, args.rounds, 1, log)
    peak = peak_tflops(device, args.peak_tflops)
    guided = GUIDED_BATCH if args.cfg_scale != 1.0 else 1
    flops = FLOPS_PER_MAC * macs * guided * batch  # one forward of the (2N-image) model batch per step
    results = {}
    for name, fn in runners.items():
        s = summarize([t / steps for t in times[name]])
        transient = step_peak_bytes(fn, device)
        held = held_bytes([*models[name].parameters(), *models[name].buffers(), noise, y])
        results[name] = {**info[name], **s, "images_per_s": batch / (s["median_s"] * args.full_steps),
                         "tflops": flops / s["median_s"] / 1e12, "mfu": utilization(flops, s["median_s"], peak),
                         "held_gib": held / GIB, "sampling_transient_gib": transient / GIB,
                         "peak_memory_gib": (held + transient) / GIB}  # fmt: skip
    speedups = {"ours": results["peer"]["median_s"] / results["ours"]["median_s"]} if "peer" in results else {}
    write_result({
        "benchmark": "sample_step", "model": args.model, "image_size": args.image_size,
        "latent_shape": [LATENT_CHANNELS, latent, latent], "batch_size": batch, "model_batch": guided * batch,
        "sampler": args.sampler, "cfg_scale": args.cfg_scale, "full_steps": args.full_steps,
        "gflops_per_image": macs / 1e9, "flops_per_step": flops, "peak_bf16_tflops": peak,
        "runners": results, "speedup_vs_peer": speedups,
        "settings": {"warmup": args.warmup, "rounds": args.rounds, "sampler_steps_per_call": steps, "seed": args.seed},
        "conditions": setup.conditions, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
