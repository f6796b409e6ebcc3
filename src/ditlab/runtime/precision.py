"""Every precision rule of ditlab: the --precision choices, the autocast dtype of the DiT, the
VAE's compute dtype, and whether bf16 runs and pays on this CPU (for --precision auto; measured at
most once per machine, see `runtime.bf16_probe`). Nothing here runs at import."""

from __future__ import annotations

import os

import torch

from ditlab.errors import UserError
from ditlab.options import PRECISIONS
from ditlab.runtime.bf16_probe import (  # noqa: F401  (the probe's names, re-exported)
    BF16_SPEEDUP_NEEDED,
    PROBE_RESULT_VAR,
    CpuBf16,
    bf16_runs,
    cpu_bf16,
    run_bf16_probe,
)
from ditlab.runtime.cpu_facts import ONEDNN_ISA_VAR

# The autocast dtype of each explicit --precision ("fp32": no autocast).
AMP_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# The VAE's compute dtype of each explicit --precision.
VAE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

ONEDNN_SAFE_ISA = "AVX512_CORE_BF16"  # the highest oneDNN ISA below AMX


def check_cpu_bf16(flag: str = "--precision bf16") -> None:
    """Refuse bf16 on a CPU where it would kill the process, with the way out in one line."""
    found = bf16_runs()
    if found is not None and not found.usable:
        raise UserError(f"{flag}: {found.detail}; set {ONEDNN_ISA_VAR}={ONEDNN_SAFE_ISA} in the environment "
                         "before starting (bf16 then runs without AMX)")


def cap_onednn_below_amx() -> None:
    """Keep this process's oneDNN off AMX where a bf16 matmul would die on it (call before the
    first oneDNN call), and forget the cached probe so --precision bf16 is then allowed."""
    found = bf16_runs()
    if found is not None and not found.usable:
        os.environ[ONEDNN_ISA_VAR] = ONEDNN_SAFE_ISA
        cpu_bf16.cache_clear()


def check_precision(precision: str, flag: str = "--precision") -> None:
    if precision not in PRECISIONS:
        raise UserError(f"{flag} {precision!r}: choose one of {', '.join(PRECISIONS)}")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the DiT for a --precision choice (None: plain fp32).

    auto is bf16 where the hardware does bf16 well: CUDA devices that support it, and CPUs whose
    bf16 matmul measures at least BF16_SPEEDUP_NEEDED times faster than fp32 (and not faulting; see
    `cpu_bf16`: fp32 without measuring on a CPU without bf16 instructions); fp32 elsewhere."""
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
