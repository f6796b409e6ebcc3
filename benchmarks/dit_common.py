"""Shared by the DiT step benchmarks: the peer (diffusers' DiTTransformer2DModel holding our
weights, so both compute the same function), timing on the device (CUDA events, or the host
clock on CPU), ours and the peer alternated after warm-up, peak memory, model FLOP
utilisation against the device's bf16 peak, a record of the conditions of the run, and the set-up
train_step.py and sample_step.py share (a DiT with live weights, its inputs' generator).

Run the benchmarks from the repository root with PYTHONPATH=src (and benchmarks/ on sys.path,
as the scripts put it there)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from data_common import device_name
from torch import nn

import ditlab
from ditlab.models import count_macs
from ditlab.runtime import precision as runtime
from ditlab.runtime.precision import AMP_DTYPES, resolve_precision

LATENT_CHANNELS = 4  # the SD VAE's latents
VAE_DOWNSAMPLE = 8
NUM_CLASSES = 1000
DTYPE_NAMES = {dtype: name for name, dtype in AMP_DTYPES.items()}  # autocast dtype (None: fp32) -> precision

# Dense bf16 tensor-core peaks in TFLOP/s (the data sheets' figures without sparsity), matched as
# substrings of torch.cuda.get_device_name(); the first match wins, so specific names come first.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.5),
    ("H200 NVL", 835.5),
    ("GH200", 989.4),
    ("H100", 989.4),  # SXM, "NVIDIA H100 80GB HBM3"
    ("H200", 989.4),
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("A10", 125.0),
]
TRAIN_PASSES = 3  # forward + backward (two matmuls per forward one): a training step costs 3 forwards
FLOPS_PER_MAC = 2


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The device's dense bf16 peak (TFLOP/s): `override` if given, else the table's entry for a
    CUDA device's name, else None (CPUs have no entry: pass --peak-tflops to get a utilisation)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def utilization(flops_per_step: float, seconds_per_step: float, peak: float | None) -> float | None:
    """Achieved FLOP/s over the peak (a fraction), or None without a peak."""
    if peak is None:
        return None
    return flops_per_step / seconds_per_step / (peak * 1e12)


class DiffusersDiT(nn.Module):
    """diffusers' DiTTransformer2DModel behind our call: model(x (N, C, H, W), t (N,), y (N,)) ->
    (N, C_out, H, W), with the null label ditlab's guidance looks for."""

    def __init__(self, peer: nn.Module, num_classes: int):
        super().__init__()
        self.peer = peer
        self.num_classes = num_classes
        self.null_class = num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.peer(x, timestep=t, class_labels=y).sample


def make_peer(model: nn.Module) -> DiffusersDiT:
    """diffusers' DiTTransformer2DModel of the same size as our adaLN-Zero `model`, holding its
    weights and set to the reference's timestep frequencies (the same function, on the CPU)."""
    from diffusers import DiTTransformer2DModel

    from ditlab.models.convert import diffusers_config, make_diffusers_exact, to_diffusers

    peer = make_diffusers_exact(DiTTransformer2DModel(**diffusers_config(model.config)))
    peer.load_state_dict(to_diffusers({k: v.cpu() for k, v in model.state_dict().items()}), strict=True)
    return DiffusersDiT(peer, model.num_classes)


def live_weights(model: nn.Module, seed: int) -> nn.Module:
    """Replace the zero initialisation of the adaLN-Zero gates and the final layer by small random
    weights, so that every path carries signal as in a model mid-training (and both models agree)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


@dataclass
class StepSetup:
    """What train_step.py and sample_step.py start from."""

    device: torch.device
    conditions: dict[str, Any]  # taken once the device is set up, before the model is built
    batch: int
    steps: int  # timed steps per call
    latent: int  # the latent's side
    amp: torch.dtype | None  # ours' autocast dtype (None: fp32)
    model: nn.Module  # with live weights, on the CPU
    macs: int  # per image and forward
    diffusion: ditlab.Diffusion
    generator: torch.Generator  # seeded with --seed + 1, for drawing the inputs


def step_setup(args: argparse.Namespace, cuda_batch: int, cpu_batch: int) -> StepSetup:
    """The set-up from the flags both step benchmarks take: the device (the oneDNN cap on CPU,
    --threads), the defaults of --batch-size (cuda_batch on CUDA, cpu_batch elsewhere) and --steps
    (10 on CUDA, 2 elsewhere), the precision, and --model built with live weights under --seed."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":  # before the first oneDNN call of this process
        runtime.cap_onednn_below_amx()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = conditions(device, args.threads)
    cuda = device.type == "cuda"
    latent = args.image_size // VAE_DOWNSAMPLE
    amp = resolve_precision(args.precision, device)

    torch.manual_seed(args.seed)
    model = live_weights(ditlab.create_model(args.model, input_size=latent, in_channels=LATENT_CHANNELS,
                                             num_classes=NUM_CLASSES), args.seed)  # fmt: skip
    return StepSetup(
        device=device, conditions=started, batch=args.batch_size or (cuda_batch if cuda else cpu_batch),
        steps=args.steps or (10 if cuda else 2), latent=latent, amp=amp, model=model, macs=count_macs(model),
        diffusion=ditlab.Diffusion(), generator=torch.Generator().manual_seed(args.seed + 1),
    )  # fmt: skip


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 matmuls and convolutions on CUDA inside the block (as the reference DiT trains), restored after."""
    if not (enabled and torch.cuda.is_available()):
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        saved = matmul.fp32_precision, cudnn.conv.fp32_precision
        matmul.fp32_precision, cudnn.conv.fp32_precision = "tf32", "tf32"
    else:
        saved = matmul.allow_tf32, cudnn.allow_tf32
        matmul.allow_tf32, cudnn.allow_tf32 = True, True
    try:
        yield
    finally:
        if hasattr(matmul, "fp32_precision"):
            matmul.fp32_precision, cudnn.conv.fp32_precision = saved
        else:
            matmul.allow_tf32, cudnn.allow_tf32 = saved


def time_steps(fn: Callable[[], Any], device: torch.device, n: int) -> list[float]:
    """Seconds of each of n back-to-back calls: CUDA events on the GPU (no sync between calls),
    the host clock on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def alternate(runners: dict[str, Callable[[], Any]], device: torch.device, warmup: int, rounds: int,
              steps: int, log: Callable[[str], None] = print) -> dict[str, list[float]]:  # fmt: skip
    """Warm each runner up, then `rounds` rounds of `steps` timed calls each, the order of the runners
    reversed every other round (ABBA) so that drifts in the machine's load hit all alike."""
    for name, fn in runners.items():
        start = time.perf_counter()
        for _ in range(warmup):
            fn()
        sync(device)
        log(f"{name}: warm-up {time.perf_counter() - start:.1f} s")
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name] += time_steps(runners[name], device, steps)
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {statistics.median(v) * 1e3:.1f} ms" for k, v in
                                                      times.items()))
    return times


def summarize(times: list[float]) -> dict[str, float]:
    """Median and quartiles of per-step seconds."""
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_s": statistics.median(times), "p25_s": q[0], "p75_s": q[2], "n": len(times)}


def held_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (shared storages counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def step_peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """The most memory one call of fn holds at once beyond what was allocated when it started:
    torch.cuda's peak statistics on CUDA; on CPU the allocator's events in the profiler, summed in
    time order (the CPU has no peak counter)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


# Operators that do the model's multiply-accumulates (matmuls, attention, the patch convolution).
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product",
              "aten::_flash_attention", "aten::_efficient_attention", "aten::_cudnn_attention",
              "aten::convolution_backward", "aten::mkldnn_convolution", "aten::cudnn_convolution")  # fmt: skip


def matmul_fraction(fn: Callable[[], Any], device: torch.device) -> float:
    """The share of one call's operator self time (device time on CUDA) spent in MATMUL_OPS: 1 / it
    bounds what making everything else free could gain without faster matmuls."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = [(e.key, getattr(e, attr)) for e in prof.key_averages()]
    total = sum(t for _, t in rows)
    return sum(t for k, t in rows if k.startswith(MATMUL_OPS)) / total if total else float("nan")


def conditions(device: torch.device, threads: int | None) -> dict[str, Any]:
    """The machine, the software and the load the figures were taken under."""
    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "diffusers": diffusers_version,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
    }


def write_result(result: dict[str, Any], out: str | None) -> None:
    """Print the JSON; also write it to `out` (atomically) when given."""
    if hasattr(os, "getloadavg"):
        result.setdefault("conditions", {})["load_average_at_end"] = list(os.getloadavg())
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        from pathlib import Path

        from ditlab.runtime.files import atomic_write_text

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text + "\n")
