"""A full DiT training step, ours beside diffusers' DiTTransformer2DModel of the same size.

A step is what `ditlab train` runs per batch (ditlab.training.step.TrainStep): the loss (MSE + VLB)
under the precision's autocast, backward, the gradient norm, AdamW and the EMA update. Ours runs
each variant asked for (eager, compiled per block or whole, with activation checkpointing); the
peer is diffusers' model holding the same weights, through the same loss and step, in fp32 by
default (TF32 on CUDA, as the reference DiT trains), with the same fused AdamW and foreach EMA
(--peer-optimizer same) or the reference trainer's (torch's default AdamW, a per-tensor EMA loop).
All runners alternate in one process after warm-up; medians, images/s, model FLOP utilisation
(3 passes x 2 FLOPs x the paper's Gflops per image, against the device's bf16 peak), peak memory
and the speed-ups over the peer come out as JSON.

    PYTHONPATH=src python benchmarks/train_step.py --model DiT-S/2 --batch-size 8 --variants eager,block
    PYTHONPATH=src python benchmarks/train_step.py --model DiT-XL/2 --batch-size 32      # on a GPU
"""

from __future__ import annotations

import argparse
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
    TRAIN_PASSES,
    alternate,
    held_bytes,
    live_weights,  # noqa: F401  (tests import it from here)
    make_peer,
    matmul_fraction,
    peak_tflops,
    step_peak_bytes,
    step_setup,
    summarize,
    tf32,
    time_steps,
    utilization,
    write_result,
)
from torch import nn  # noqa: E402

import ditlab  # noqa: E402
from ditlab.options import PRECISIONS  # noqa: E402
from ditlab.runtime.precision import (
    AMP_DTYPES,  # noqa: E402
    resolve_precision,  # noqa: E402
)
from ditlab.training.ema import make_ema, update_ema  # noqa: E402
from ditlab.training.parallel import compile_model, make_optimizer  # noqa: E402
from ditlab.training.step import TrainStep  # noqa: E402

LR = 1e-4
EMA_DECAY = 0.9999
GIB = 2**30
VARIANT_OPTIONS = {"eager": {}, "block": {"compile": "block"}, "model": {"compile": "model"},
                   "ckpt": {"grad_checkpointing": True},
                   **{name: {"precision": name} for name in AMP_DTYPES}}  # fmt: skip


def parse_variant(spec: str) -> dict:
    """"eager", "block", "model", "ckpt", a precision overriding --precision ("fp32", "bf16",
    "fp16"), or options joined by "+" (e.g. "block+ckpt", "eager+fp32")."""
    out = {"compile": "none", "grad_checkpointing": False}
    for part in spec.split("+"):
        if part not in VARIANT_OPTIONS:
            raise ValueError(f"--variants: unknown option {part!r} in {spec!r}; use {', '.join(VARIANT_OPTIONS)}")
        out.update(VARIANT_OPTIONS[part])
    return out


def reference_ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """The reference trainer's EMA: one mul_ and one add_ per parameter."""
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.mul_(decay).add_(p.detach(), alpha=1 - decay)


def state_of(model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor a runner keeps between steps: weights, gradients, AdamW moments, EMA."""
    tensors = [*model.parameters(), *model.buffers(), *ema.parameters(), *ema.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return tensors


def parse_args() -> tuple[argparse.Namespace, dict[str, dict]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--image-size", type=int, default=256, help="pixels; the latent is image-size / 8")
    p.add_argument("--batch-size", type=int, default=None, help="per device (default 32 on CUDA, 8 on CPU)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="ours")
    p.add_argument("--variants", default="eager", help="ours, comma-separated: eager, block, model, ckpt, "
                   "fp32, bf16, fp16 (override --precision), or options joined by + (block = compile per block, "
                   "model = whole model, ckpt = grad checkpointing)")
    p.add_argument("--peer-precision", default="fp32", choices=[*AMP_DTYPES, "none"],
                   help="fp32 (TF32 on CUDA, as the reference), or none to skip the peer")
    p.add_argument("--peer-optimizer", default="same", choices=["same", "reference"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=None, help="timed steps per runner per round (default 10 CUDA, 2 CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak of the device, for the utilisation")
    p.add_argument("--profile", action="store_true", help="also profile one step per runner: the share of "
                   "time in matmuls and attention")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    try:
        variants = {spec: parse_variant(spec) for spec in args.variants.split(",")}
    except ValueError as e:
        p.error(str(e))
    return args, variants


def our_runners(args: argparse.Namespace, variants: dict[str, dict], setup, inputs: tuple) -> dict[str, tuple]:
    """{name: (run one step, the tensors it keeps, what it is)} for each of our variants."""
    device, base, diffusion = setup.device, setup.model, setup.diffusion
    out = {}
    for spec, opts in variants.items():
        model = copy.deepcopy(base).to(device).train()
        model.grad_checkpointing = opts["grad_checkpointing"]
        ema = make_ema(model)
        compile_model(model, opts["compile"])
        opt = make_optimizer(model, LR, device)
        flag = opts.pop("precision", args.precision)
        variant_amp = setup.amp if flag == args.precision else resolve_precision(flag, device)
        step = TrainStep(model, ema, opt, diffusion, variant_amp, device, EMA_DECAY)
        out[f"ours[{spec}]"] = (lambda step=step: step(*inputs),
                                lambda model=model, ema=ema, opt=opt: state_of(model, ema, opt),
                                {"precision": DTYPE_NAMES[variant_amp], "precision_flag": flag, **opts})
    return out


def peer_runner(args: argparse.Namespace, setup, inputs: tuple) -> tuple:
    """(run one step, the tensors it keeps, what it is) of diffusers' DiT with the same weights."""
    device = setup.device
    peer = make_peer(setup.model).to(device).train()
    peer_amp = AMP_DTYPES[args.peer_precision]
    peer_ema = make_ema(peer)
    if args.peer_optimizer == "same":
        peer_opt, ema_update = make_optimizer(peer, LR, device), update_ema
    else:
        peer_opt, ema_update = torch.optim.AdamW(peer.parameters(), lr=LR, weight_decay=0.0), reference_ema_update
    peer_step = TrainStep(peer, peer_ema, peer_opt, setup.diffusion, peer_amp, device, EMA_DECAY,
                          ema_update=ema_update, skip_bad=False)
    use_tf32 = peer_amp is None and device.type == "cuda"

    def run_peer() -> None:
        with tf32(use_tf32):
            peer_step(*inputs)

    return (run_peer, lambda: state_of(peer, peer_ema, peer_opt),
            {"model": "diffusers.DiTTransformer2DModel", "precision": args.peer_precision, "tf32": use_tf32,
             "optimizer": args.peer_optimizer})


def main() -> None:
    args, variants = parse_args()
    setup = step_setup(args, cuda_batch=32, cpu_batch=8)
    device, batch, steps, latent, macs, g = setup.device, setup.batch, setup.steps, setup.latent, setup.macs, \
        setup.generator
    x0 = torch.randn(batch, LATENT_CHANNELS, latent, latent, generator=g).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    t = torch.randint(0, setup.diffusion.num_timesteps, (batch,), generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
    inputs = (x0, t, y, noise)
    runners = our_runners(args, variants, setup, inputs)
    if args.peer_precision != "none":
        runners["peer"] = peer_runner(args, setup, inputs)

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    times = alternate({name: r[0] for name, r in runners.items()}, device, args.warmup, args.rounds, steps, log)
    peak = peak_tflops(device, args.peak_tflops)
    flops = TRAIN_PASSES * FLOPS_PER_MAC * macs * batch
    results = {}
    for name, (fn, state, info) in runners.items():
        s = summarize(times[name])
        transient = step_peak_bytes(fn, device)
        held = held_bytes([*state(), *inputs])
        results[name] = {**info, **s, "images_per_s": batch / s["median_s"],
                         "tflops": flops / s["median_s"] / 1e12, "mfu": utilization(flops, s["median_s"], peak),
                         "held_gib": held / GIB, "step_transient_gib": transient / GIB,
                         "peak_memory_gib": (held + transient) / GIB}  # fmt: skip
        if args.profile:
            results[name]["matmul_time_fraction"] = matmul_fraction(fn, device)
    speedups = {name: results["peer"]["median_s"] / r["median_s"] for name, r in results.items()
                if name != "peer" and "peer" in results}
    write_result({
        "benchmark": "train_step", "model": args.model, "image_size": args.image_size,
        "latent_shape": [LATENT_CHANNELS, latent, latent], "batch_size": batch,
        "gflops_per_image": macs / 1e9, "train_flops_per_step": flops, "peak_bf16_tflops": peak,
        "runners": results, "speedup_vs_peer": speedups, "inputs_ms_per_step": inputs_ms(device, batch, latent),
        "settings": {"warmup": args.warmup, "rounds": args.rounds, "steps_per_round": steps,
                     "seed": args.seed},
        "conditions": setup.conditions,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }, args.out)  # fmt: skip


def inputs_ms(device: torch.device, batch: int, latent: int, reps: int = 20) -> float:
    """Median milliseconds of the trainer's per-step draws from a latent-cache batch (seeding, the
    step's generator, host-to-device copy, flip and posterior sample, timesteps, noise, label dropout)."""
    from ditlab.data.codecs import DEFAULT_VAE
    from ditlab.training.data import TrainingData
    from ditlab.training.step import draw_step_inputs

    data = TrainingData(dataset=None, kind="latents", num_classes=NUM_CLASSES, channels=LATENT_CHANNELS,
                        size=latent, flip=True, codec_spec=DEFAULT_VAE)  # fmt: skip
    shape = (batch, 2, LATENT_CHANNELS, latent, latent)
    cache_batch = [torch.randn(shape).half(), torch.full(shape, 0.01).half(), torch.zeros(batch, dtype=torch.long)]
    if device.type == "cuda":
        cache_batch = [b.pin_memory() for b in cache_batch]
    diffusion = ditlab.Diffusion()
    counter = iter(range(10**9))
    times = time_steps(lambda: draw_step_inputs(data, cache_batch, diffusion, device, next(counter), 0.1), device, reps)
    return sorted(times)[len(times) // 2] * 1e3


if __name__ == "__main__":
    main()
