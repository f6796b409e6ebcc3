"""Whether bf16 runs, and pays, on this CPU: the answer behind --precision auto on a CPU.

Where the CPU has no bf16 instructions (see `cpu_facts.no_bf16_hardware`) the answer is fp32 and
nothing is timed. Elsewhere it is a measurement, not a flag: through Intel AMX a bf16 matmul measured
7.7x fp32 (a 4096x384 @ 384x1536 matmul on one thread, Xeon with AMX), through AMD Zen 4's
AVX512-BF16 2.6x, but through oneDNN's avx512_core_bf16 kernel on an Intel Xeon 0.54-0.66x (slower).
And some virtual machines advertise AMX but fault on it: the first bf16 matmul kills the process
with SIGILL, which cannot be caught. So a subprocess times an fp32 and a bf16 matmul under this
process's environment, in CPU time of its one thread (so other processes' load moves it little),
and stops at the first bf16 call slower than fp32. The answer is measured once per machine: kept in
$DITLAB_HOME/cpu-bf16/ under a key of everything it depends on (`CpuFacts`: CPU model and flags,
torch version and capability, the ISA caps), written atomically under a lock so that concurrent
processes measure once; a damaged file is measured again and rewritten. Children (torchrun ranks,
workers) also inherit it through the environment, for a $DITLAB_HOME that cannot be written."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ditlab.errors import UserError
from ditlab.runtime.cpu_facts import CpuFacts, may_fault_on_amx, no_bf16_hardware, read_cpu_facts

# auto picks bf16 on a CPU only if its bf16 matmul is this much faster than fp32: a margin over
# the probe's noise, since a bf16 step that merely ties fp32 costs precision for nothing.
BF16_SPEEDUP_NEEDED = 1.2
PROBE_SHAPE = (4096, 384, 1536)  # (M, K, N): a DiT-S MLP's first linear on 16 images of 256 tokens
PROBE_REPEATS = 5  # timed calls of each dtype at most (the best counts), after one untimed fp32 call
PROBE_TIMEOUT_S = 300.0
PROBE_VERSION = 2  # part of the cache key: a change of the probe below measures again
PROBE_RESULT_VAR = "DITLAB_CPU_BF16_PROBE"  # "<key>=<speedup>": the probe's answer, inherited by children
CACHE_FOLDER = "cpu-bf16"  # under $DITLAB_HOME, one <key>.json per CpuFacts

_PROBE = """
import time, torch
torch.set_num_threads(1)
m, k, n = {shape}
a, b = torch.randn(m, k), torch.randn(k, n)
def cpu_s(x, y):
    start = time.thread_time()
    x @ y
    return time.thread_time() - start
cpu_s(a, b)
fp32 = min(cpu_s(a, b) for _ in range({repeats}))
a, b, bf16 = a.bfloat16(), b.bfloat16(), float("inf")
for _ in range({repeats}):
    bf16 = min(bf16, cpu_s(a, b))
    if bf16 > fp32:  # one bf16 call slower than fp32 settles it
        break
print(fp32 / bf16)
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

    @property
    def settled(self) -> bool:
        """Whether this is an answer to keep (not a probe that failed or timed out)."""
        return not self.usable or self.speedup is not None


def run_bf16_probe(env: dict[str, str] | None = None, timeout: float = PROBE_TIMEOUT_S,
                   shape: tuple[int, int, int] = PROBE_SHAPE) -> CpuBf16:  # fmt: skip
    """Time an fp32 and a bf16 (M, K) @ (K, N) matmul of `shape` in a fresh Python with this
    environment (or `env`)."""
    script = _PROBE.format(shape=tuple(shape), repeats=PROBE_REPEATS)
    try:
        proc = subprocess.run([sys.executable, "-c", script], env=os.environ if env is None else env,
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


def probe_key(facts: CpuFacts) -> str:
    """A short name for everything the answer depends on (the cache file's name)."""
    text = json.dumps({"probe": PROBE_VERSION, **facts.as_dict()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cache_path(facts: CpuFacts) -> Path:
    from ditlab.runtime.home import home

    return home() / CACHE_FOLDER / f"{probe_key(facts)}.json"


def load_answer(path: Path, facts: CpuFacts) -> CpuBf16 | None:
    """The answer kept at `path` for exactly these facts; None if absent, damaged or another's."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("probe") != PROBE_VERSION or data.get("facts") != facts.as_dict():
        return None
    usable, speedup, detail = data.get("usable"), data.get("speedup"), data.get("detail")
    if not isinstance(usable, bool) or not isinstance(detail, str):
        return None
    if speedup is not None and not (type(speedup) in (int, float) and math.isfinite(speedup) and speedup > 0):
        return None
    found = CpuBf16(usable, speedup, f"{detail} (measured once, kept in {path})")
    return found if found.settled else None


def store_answer(path: Path, facts: CpuFacts, found: CpuBf16) -> None:
    """Keep a settled answer at `path` (atomically); a cache that cannot be written is skipped."""
    from ditlab.runtime.files import atomic_write_text

    record = {"probe": PROBE_VERSION, "facts": facts.as_dict(), "usable": found.usable,
              "speedup": found.speedup, "detail": found.detail}  # fmt: skip
    try:
        atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    except (OSError, UserError):
        pass


def measured_once(facts: CpuFacts) -> CpuBf16:
    """The answer for `facts` from the cache, else measured (by one process at a time) and kept."""
    try:
        path = cache_path(facts)
    except RuntimeError:  # no home folder to put $DITLAB_HOME's default in: measure for this process
        return run_bf16_probe()
    found = load_answer(path, facts)
    if found is not None:
        return found
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(".lock"), "a")
    except OSError:  # $DITLAB_HOME cannot be written: measure for this process (and its children)
        return run_bf16_probe()
    with lock:
        try:  # a concurrent process measuring now holds it: wait, then read its answer
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:
            pass
        found = load_answer(path, facts)
        if found is None:
            found = run_bf16_probe()
            if found.settled:
                store_answer(path, facts, found)
    return found


def _inherited(key: str) -> CpuBf16 | None:
    """The answer a parent process found under the same key, if it left one in the environment."""
    got, _, value = os.environ.get(PROBE_RESULT_VAR, "").rpartition("=")
    if got != key:
        return None
    try:
        speedup = float(value)
    except ValueError:
        return None
    return CpuBf16(True, speedup, f"bf16 matmul {speedup:.2f}x fp32 (measured by a parent process)")


@functools.cache
def cpu_bf16() -> CpuBf16:
    """Whether bf16 runs, and pays, on this CPU: fp32 without timing anything where the CPU has no
    bf16 instructions, else measured once per machine and key (see the module's docstring)."""
    facts = read_cpu_facts()
    reason = no_bf16_hardware(facts)
    if reason is not None:
        return CpuBf16(True, None, f"{reason}: fp32, nothing measured")
    key = probe_key(facts)
    found = _inherited(key) or measured_once(facts)
    if found.usable and found.speedup is not None:
        os.environ[PROBE_RESULT_VAR] = f"{key}={found.speedup!r}"
    return found


def bf16_runs() -> CpuBf16 | None:
    """None where a bf16 matmul cannot fault here (no AMX in reach), else what the probe found."""
    return cpu_bf16() if may_fault_on_amx(read_cpu_facts()) else None
