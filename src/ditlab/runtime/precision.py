"""Every precision rule of ditlab: the --precision choices, the autocast dtype of the DiT, the
VAE's compute dtype, and whether bf16 pays on this CPU (for --precision auto). Nothing here runs
at import.

Whether a bf16 matmul beats fp32 on a CPU is a measurement, not a flag: through Intel AMX it
measured 7.7x fp32 (a 4096x384 @ 384x1536 matmul on one thread, Xeon with AMX), through AMD Zen 4's
AVX512-BF16 2.6x, but through oneDNN's avx512_core_bf16 kernel on an Intel Xeon 0.54-0.66x (slower).
And some virtual machines advertise AMX but fault on it: the first bf16 matmul kills the process
with SIGILL, which cannot be caught. So a one-time subprocess times a bf16 and an fp32 matmul
under this process's environment; --precision auto takes bf16 where it is at least
BF16_SPEEDUP_NEEDED times faster, fp32 otherwise. The answer is kept for the process and handed
to its children (torchrun ranks, workers) through the environment, keyed by what it depends on."""

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
# auto picks bf16 on a CPU only if its bf16 matmul is this much faster than fp32: a margin over
# the probe's noise, since a bf16 step that merely ties fp32 costs precision for nothing.
BF16_SPEEDUP_NEEDED = 1.2
PROBE_SHAPE = (4096, 384, 1536)  # (M, K, N): a DiT-S MLP's first linear on 16 images of 256 tokens
PROBE_TIMEOUT_S = 300.0
PROBE_RESULT_VAR = "DITLAB_CPU_BF16_PROBE"  # "<key>=<speedup>": the probe's answer, inherited by children

_PROBE = f"""
import time, torch
torch.set_num_threads(1)
a, b = torch.randn({PROBE_SHAPE[0]}, {PROBE_SHAPE[1]}), torch.randn({PROBE_SHAPE[1]}, {PROBE_SHAPE[2]})
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
    return CpuBf16(True, speedup, f"bf16 matmul {speedup:.2f}x fp32")


def _probe_key() -> str:
    """What the probe's answer depends on besides the machine: torch's build and the oneDNN cap."""
    return f"{torch.__version__}|{os.environ.get(ONEDNN_ISA_VAR, '').strip().upper()}"


def _inherited() -> CpuBf16 | None:
    """The answer a parent process measured under the same key, if it left one in the environment."""
    key, _, value = os.environ.get(PROBE_RESULT_VAR, "").rpartition("=")
    if key != _probe_key():
        return None
    try:
        speedup = float(value)
    except ValueError:
        return None
    return CpuBf16(True, speedup, f"bf16 matmul {speedup:.2f}x fp32 (measured by a parent process)")


@functools.cache
def cpu_bf16() -> CpuBf16:
    """Whether bf16 runs, and pays, on this CPU: measured once per process by a subprocess (or
    taken from a parent's measurement under the same torch and oneDNN cap), see run_bf16_probe."""
    found = _inherited()
    if found is None:
        found = run_bf16_probe()
        if found.usable and found.speedup is not None:
            os.environ[PROBE_RESULT_VAR] = f"{_probe_key()}={found.speedup!r}"
    return found


def check_cpu_bf16(flag: str = "--precision bf16") -> None:
    """Refuse bf16 on a CPU where it would kill the process, with the way out in one line."""
    found = cpu_bf16()
    if not found.usable:
        raise UserError(f"{flag}: {found.detail}; set {ONEDNN_ISA_VAR}={ONEDNN_SAFE_ISA} in the environment "
                         "before starting (bf16 then runs without AMX)")


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
    bf16 matmul a one-time subprocess measures at least BF16_SPEEDUP_NEEDED times faster than fp32
    (and not faulting; see `cpu_bf16`); fp32 elsewhere."""
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
