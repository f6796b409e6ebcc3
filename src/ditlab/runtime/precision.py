"""Every precision rule of ditlab: the --precision choices, the autocast dtype of the DiT, the
VAE's compute dtype, and whether bf16 pays on this CPU (for --precision auto). Nothing here runs
at import.

bf16 on a CPU is fast only through Intel AMX: with AVX512-BF16 alone a bf16 matmul measured
slower than fp32 (oneDNN's avx512_core_bf16 kernel, a 4096x384 @ 384x1536 linear on one thread:
58.6 ms against 38.6 ms in fp32). And some virtual machines advertise AMX but fault on it: the
first bf16 matmul kills the process with SIGILL, which cannot be caught. So whether bf16 pays is
asked of a one-time subprocess, never of this process."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import torch

from ditlab.errors import UserError
from ditlab.options import PRECISIONS

# The autocast dtype of each explicit --precision ("fp32": no autocast).
AMP_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# The VAE's compute dtype of each explicit --precision.
VAE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

ONEDNN_ISA_VAR = "ONEDNN_MAX_CPU_ISA"
ONEDNN_SAFE_ISA = "AVX512_CORE_BF16"  # the highest oneDNN ISA below AMX
ONEDNN_UNCAPPED = ("", "ALL", "DEFAULT")
BF16_SPEEDUP_NEEDED = 1.5  # auto picks bf16 on a CPU only if its bf16 matmul is this much faster than fp32
PROBE_SIZE = 1024  # the probe times a PROBE_SIZE^2 matmul in fp32 and in bf16, on one thread
PROBE_TIMEOUT_S = 300.0

_PROBE = f"""
import time, torch
from ditlab.errors import UserError
torch.set_num_threads(1)
a, b = torch.randn({PROBE_SIZE}, {PROBE_SIZE}), torch.randn({PROBE_SIZE}, {PROBE_SIZE})
def best(x, y):
    x @ y
    times = []
    for _ in range(5):
        start = time.perf_counter()
        x @ y
        times.append(time.perf_counter() - start)
    return min(times)
print(best(a, b) / best(a.bfloat16(), b.bfloat16()))
"""


@dataclass(frozen=True)
class CpuBf16:
    """What the probe found: whether a bf16 matmul runs at all, and how fast against fp32."""

    usable: bool  # False: a bf16 matmul kills the process (e.g. SIGILL from AMX on a VM that faults on it)
    speedup: float | None  # fp32 time / bf16 time of the probe matmul; None when not measured
    detail: str

    @property
    def fast(self) -> bool:
        return self.usable and self.speedup is not None and self.speedup >= BF16_SPEEDUP_NEEDED


def amx_advertised() -> bool:
    """The CPU reports AMX tiles (which is not a promise that they work)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


def onednn_capped_below_amx() -> bool:
    """ONEDNN_MAX_CPU_ISA keeps oneDNN off AMX (then bf16 runs, but on AVX512-BF16 at best)."""
    cap = os.environ.get(ONEDNN_ISA_VAR, "").strip().upper()
    return cap not in ONEDNN_UNCAPPED and "AMX" not in cap


def run_bf16_probe(env: dict[str, str] | None = None, timeout: float = PROBE_TIMEOUT_S) -> CpuBf16:
    """Time a bf16 and an fp32 matmul in a fresh Python with this environment (or `env`)."""
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], env=os.environ if env is None else env,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return CpuBf16(True, None, f"the bf16 probe took longer than {timeout:.0f} s")
    if proc.returncode < 0 or proc.returncode == 128 + signal.SIGILL:
        sig = -proc.returncode if proc.returncode < 0 else signal.SIGILL
        return CpuBf16(False, None, f"a bf16 matmul dies with {signal.Signals(sig).name} on this CPU")
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return CpuBf16(True, None, f"the bf16 probe failed: {last}")
    speedup = float(proc.stdout.strip().splitlines()[-1])
    return CpuBf16(True, speedup, f"bf16 matmul {speedup:.2f}x fp32 (AMX)")


@functools.cache
def cpu_bf16() -> CpuBf16:
    """Whether bf16 runs, and pays, on this CPU; asked of a subprocess once per process, and only
    when oneDNN would use AMX (no AMX, or AMX capped off: bf16 runs, slower than fp32)."""
    if not amx_advertised():
        return CpuBf16(True, None, "no AMX: bf16 matmuls run on AVX512-BF16 at best, slower than fp32")
    if onednn_capped_below_amx():
        return CpuBf16(True, None, f"{ONEDNN_ISA_VAR}={os.environ[ONEDNN_ISA_VAR]} keeps oneDNN off AMX")
    return run_bf16_probe()


def check_cpu_bf16(flag: str = "--precision bf16") -> None:
    """Refuse bf16 on a CPU where it would kill the process, with the way out in one line."""
    found = cpu_bf16()
    if not found.usable:
        raise UserError(f"{flag}: {found.detail}; set {ONEDNN_ISA_VAR}={ONEDNN_SAFE_ISA} in the environment "
                         "before starting (bf16 then runs without AMX, slower than fp32)")


def cap_onednn_below_amx() -> None:
    """Keep this process's oneDNN off AMX where a bf16 matmul would die on it (call before the
    first oneDNN call), and forget the cached probe so --precision bf16 is then allowed."""
    if not cpu_bf16().usable:
        os.environ[ONEDNN_ISA_VAR] = ONEDNN_SAFE_ISA
        cpu_bf16.cache_clear()


def check_precision(precision: str, flag: str = "--precision") -> None:
    if precision not in PRECISIONS:
        raise UserError(f"{flag} {precision!r}: choose one of {', '.join(PRECISIONS)}")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the DiT for a --precision choice (None: plain fp32).

    auto is bf16 where the hardware does bf16 well: CUDA devices that support it, and CPUs whose
    bf16 matmuls run through working AMX (asked once of a subprocess, see `cpu_bf16`); fp32
    elsewhere, since without AMX a bf16 matmul on a CPU is slower than an fp32 one."""
    check_precision(precision)
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return torch.bfloat16 if device.type == "cpu" and cpu_bf16().fast else None
    if precision == "bf16" and device.type == "cpu":
        check_cpu_bf16()
    return AMP_DTYPES[precision]


def vae_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The VAE's compute dtype: "auto" is fp16 on CUDA (the SD VAE encoder is safe in it, with three
    more mantissa bits than bf16) and fp32 on CPU (where half-precision convolutions are slow)."""
    check_precision(precision)
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return VAE_DTYPES[precision]


def sampling_vae_dtype(precision: str) -> torch.dtype:
    """The VAE's dtype when sampling: fp32 unless bf16 or fp16 is asked for explicitly (decoding is
    a small part of sampling, and fp32 keeps the pixels of --precision auto exact)."""
    check_precision(precision)
    return VAE_DTYPES[precision] if precision in ("bf16", "fp16") else torch.float32
