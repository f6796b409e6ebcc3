"""What decides whether this CPU can do bf16 in hardware: its instruction flags, torch's reported
CPU capability and the variables that cap the instruction sets of oneDNN, ATen and MKL. Reading them
(`read_cpu_facts`) is kept apart from deciding (`no_bf16_hardware`), so the decision is a pure
function that tests feed with any CPU's facts.

A bf16 matmul on a CPU runs through oneDNN. Only two x86 extensions compute on bf16: AVX512-BF16
(Intel Cooper Lake and later Xeons, AMD Zen 4 and later) and AMX-BF16 (Intel Sapphire Rapids and
later); AVX-NE-CONVERT only converts. Without them (AMD Zen 3, most laptops) oneDNN emulates bf16
and the matmul measured 28x slower than fp32 (AMD EPYC Zen 3); capping oneDNN below
AVX512_CORE_BF16 has the same effect on any CPU. On Arm the extension is FEAT_BF16 ("bf16" in
/proc/cpuinfo's Features)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
X86_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # the x86 extensions that compute on bf16
X86_AMX_FLAGS = frozenset({"amx_bf16", "amx_tile"})
ARM_BF16_FLAGS = frozenset({"bf16"})
X86_ARCHS = frozenset({"x86_64", "amd64", "i386", "i686"})
ARM_ARCHS = frozenset({"aarch64", "arm64"})
# The variables that cap an instruction set (each changes what a bf16 or fp32 matmul runs on).
ONEDNN_ISA_VAR = "ONEDNN_MAX_CPU_ISA"
ISA_VARS = (ONEDNN_ISA_VAR, "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")
# oneDNN's ISA names (its ONEDNN_MAX_CPU_ISA values) that hold no bf16 instructions, and those below AMX.
ONEDNN_BELOW_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                               "AVX512_CORE_VNNI"})  # fmt: skip
ONEDNN_BELOW_AMX = ONEDNN_BELOW_BF16 | {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512"}
# torch's CPU capabilities (torch.backends.cpu.get_cpu_capability) of an x86 CPU without AVX-512.
X86_NO_AVX512_CAPABILITIES = frozenset({"DEFAULT", "NO AVX", "AVX", "AVX2"})


@dataclass(frozen=True)
class CpuFacts:
    """Everything the bf16 answer depends on, as read on this machine (or given by a test)."""

    arch: str  # platform.machine(), e.g. "x86_64"
    model: str  # the CPU's model name ("" where unknown)
    flags: frozenset[str] | None  # its instruction flags; None where unknown (no /proc/cpuinfo)
    capability: str  # torch.backends.cpu.get_cpu_capability(), e.g. "AVX512"
    caps: tuple[tuple[str, str], ...]  # the ISA_VARS set in the environment, (name, value) in order
    torch_version: str

    def cap(self, name: str) -> str:
        return dict(self.caps).get(name, "").strip().upper()

    @property
    def onednn_cap(self) -> str:
        return self.cap(ONEDNN_ISA_VAR) or self.cap("DNNL_MAX_CPU_ISA")

    def as_dict(self) -> dict[str, object]:
        flags = None if self.flags is None else " ".join(sorted(self.flags))
        return {"arch": self.arch, "model": self.model, "flags": flags,
                "capability": self.capability, "caps": [list(c) for c in self.caps],
                "torch": self.torch_version}  # fmt: skip


def _cpuinfo(text: str) -> tuple[str, frozenset[str] | None]:
    """(model name, flags) of the first processor in /proc/cpuinfo's text."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() and fields:  # the first processor's block ends: the others repeat it
            break
        name, sep, value = line.partition(":")
        if sep:
            fields.setdefault(name.strip().lower(), value.strip())
    model = next((fields[k] for k in ("model name", "model", "hardware", "cpu part") if fields.get(k)), "")
    flags = fields.get("flags", fields.get("features"))
    return model, None if flags is None else frozenset(flags.split())


def cpu_model() -> str:
    """This machine's CPU model name (/proc/cpuinfo), else the processor or machine type (no torch)."""
    try:
        model = _cpuinfo(CPUINFO.read_text(errors="replace"))[0]
    except OSError:
        model = ""
    return model or platform.processor() or platform.machine()


def read_cpu_facts() -> CpuFacts:
    """This machine's CpuFacts under this process's environment (imports torch)."""
    import torch

    try:
        model, flags = _cpuinfo(CPUINFO.read_text(errors="replace"))
    except OSError:
        model, flags = platform.processor(), None
    return CpuFacts(platform.machine().lower(), model, flags, torch.backends.cpu.get_cpu_capability(), env_caps(),
                    torch.__version__)  # fmt: skip


def env_caps() -> tuple[tuple[str, str], ...]:
    """The ISA_VARS this process's environment sets, (name, value) in ISA_VARS' order."""
    return tuple((name, os.environ[name]) for name in ISA_VARS if os.environ.get(name, "").strip())


def no_bf16_hardware(facts: CpuFacts) -> str | None:
    """Why a bf16 matmul cannot run in hardware on this CPU (then fp32 wins without measuring), or
    None where it may (then only a measurement says whether it pays)."""
    x86, arm = facts.arch in X86_ARCHS, facts.arch in ARM_ARCHS
    if x86 and facts.onednn_cap in ONEDNN_BELOW_BF16:
        return f"{ONEDNN_ISA_VAR}={facts.onednn_cap} keeps oneDNN below its bf16 instructions"
    wanted = X86_BF16_FLAGS if x86 else ARM_BF16_FLAGS if arm else None
    if wanted is not None and facts.flags is not None and not facts.flags & wanted:
        return f"the CPU has no bf16 instructions (none of {', '.join(sorted(wanted))})"
    if x86 and facts.flags is None and not facts.cap("ATEN_CPU_CAPABILITY") \
            and facts.capability.upper() in X86_NO_AVX512_CAPABILITIES:  # fmt: skip
        return f"torch reports CPU capability {facts.capability} (no AVX-512, so no bf16 instructions)"
    return None


def may_fault_on_amx(facts: CpuFacts) -> bool:
    """Whether a bf16 matmul could use AMX here, which some virtual machines advertise but fault on
    (SIGILL): then only a subprocess can tell whether bf16 runs at all."""
    if facts.arch not in X86_ARCHS or facts.onednn_cap in ONEDNN_BELOW_AMX:
        return False
    return facts.flags is None or bool(facts.flags & X86_AMX_FLAGS)
