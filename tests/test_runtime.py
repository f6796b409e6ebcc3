"""ditlab.runtime.precision: the CPU bf16 probe behind --precision auto."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from ditlab.runtime import precision as runtime
from ditlab.runtime.precision import resolve_precision

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
    monkeypatch.delenv(runtime.PROBE_RESULT_VAR, raising=False)
    runtime.cpu_bf16.cache_clear()
    yield
    runtime.cpu_bf16.cache_clear()


def fake_run(returncode, stdout="", stderr="", calls=None):
    def run(cmd, **kwargs):
        assert cmd[0] == sys.executable
        if calls is not None:
            calls.append(kwargs["env"].get(runtime.ONEDNN_ISA_VAR))
        return subprocess.CompletedProcess(cmd, returncode, stdout, stderr)

    return run


@pytest.mark.parametrize("cap", [None, "AVX512_CORE_BF16"])
def test_a_measured_speedup_makes_auto_bf16_whatever_the_isa(monkeypatch, cap):
    # AMD Zen 4 has no AMX, yet its AVX512-BF16 matmul is 2.6x fp32: the measurement decides, not a flag.
    if cap is None:
        monkeypatch.delenv(runtime.ONEDNN_ISA_VAR, raising=False)
    else:
        monkeypatch.setenv(runtime.ONEDNN_ISA_VAR, cap)
    calls = []
    monkeypatch.setattr(subprocess, "run", fake_run(0, "2.64\n", calls=calls))
    assert runtime.cpu_bf16().speedup == 2.64 and runtime.cpu_bf16().fast
    assert resolve_precision("auto", CPU) is torch.bfloat16
    assert calls == [cap]  # once per process, under this process's oneDNN cap


@pytest.mark.parametrize("speedup", ["0.54", "1.0", "1.19"])
def test_bf16_that_is_not_faster_keeps_auto_fp32(monkeypatch, speedup):
    monkeypatch.setattr(subprocess, "run", fake_run(0, speedup + "\n"))
    assert resolve_precision("auto", CPU) is None
    assert resolve_precision("bf16", CPU) is torch.bfloat16  # runs (slowly) when asked for


def test_the_threshold_is_inclusive(monkeypatch):
    monkeypatch.setattr(subprocess, "run", fake_run(0, f"{runtime.BF16_SPEEDUP_NEEDED}\n"))
    assert resolve_precision("auto", CPU) is torch.bfloat16


def test_children_inherit_the_answer_under_the_same_key(monkeypatch):
    monkeypatch.setenv(runtime.ONEDNN_ISA_VAR, "AVX512_CORE_BF16")
    monkeypatch.setattr(subprocess, "run", fake_run(0, "3.5\n"))
    runtime.cpu_bf16()
    inherited = os.environ[runtime.PROBE_RESULT_VAR]
    assert inherited.endswith("=3.5") and torch.__version__ in inherited

    runtime.cpu_bf16.cache_clear()  # as a child process starts: the environment holds the answer
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("probe started again"))
    found = runtime.cpu_bf16()
    assert found.speedup == 3.5 and "parent" in found.detail

    runtime.cpu_bf16.cache_clear()  # another oneDNN cap is another measurement
    monkeypatch.delenv(runtime.ONEDNN_ISA_VAR)
    monkeypatch.setattr(subprocess, "run", fake_run(0, "0.6\n"))
    assert runtime.cpu_bf16().speedup == 0.6


@pytest.mark.parametrize("junk", ["nonsense", "2.13.0|X=abc"])
def test_a_malformed_inherited_answer_is_measured_again(monkeypatch, junk):
    monkeypatch.setenv(runtime.PROBE_RESULT_VAR, junk)
    monkeypatch.setattr(subprocess, "run", fake_run(0, "0.7\n"))
    assert runtime.cpu_bf16().speedup == 0.7


@pytest.mark.parametrize("code", [-signal.SIGILL, 128 + signal.SIGILL])
def test_faulting_bf16_keeps_auto_fp32_and_refuses_bf16_in_one_line(monkeypatch, code):
    monkeypatch.delenv(runtime.ONEDNN_ISA_VAR, raising=False)
    monkeypatch.setattr(subprocess, "run", fake_run(code))
    assert resolve_precision("auto", CPU) is None
    assert runtime.PROBE_RESULT_VAR not in os.environ  # nothing measured, nothing handed on
    with pytest.raises(ValueError, match="SIGILL") as err:
        resolve_precision("bf16", CPU)
    assert "ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16" in str(err.value) and "\n" not in str(err.value)


def test_capping_after_a_fault_measures_again_under_the_cap(monkeypatch):
    monkeypatch.delenv(runtime.ONEDNN_ISA_VAR, raising=False)
    calls = []
    monkeypatch.setattr(subprocess, "run", fake_run(-signal.SIGILL, calls=calls))
    runtime.cap_onednn_below_amx()
    assert os.environ[runtime.ONEDNN_ISA_VAR] == runtime.ONEDNN_SAFE_ISA
    monkeypatch.setattr(subprocess, "run", fake_run(0, "0.55\n", calls=calls))
    assert runtime.cpu_bf16().usable and resolve_precision("bf16", CPU) is torch.bfloat16
    assert calls == [None, runtime.ONEDNN_SAFE_ISA]


def test_a_broken_probe_is_not_fatal(monkeypatch):
    monkeypatch.setattr(subprocess, "run", fake_run(1, stderr="Traceback\nImportError: no torch\n"))
    found = runtime.cpu_bf16()
    assert found.usable and not found.fast and "ImportError: no torch" in found.detail
    assert resolve_precision("auto", CPU) is None


def test_the_real_probe_never_takes_this_process_down():
    # Uncapped, on a CPU that faults on AMX this child dies of SIGILL; the parent reads that.
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    found = runtime.run_bf16_probe(env)
    if found.usable:
        assert found.speedup is None or found.speedup > 0
    else:
        assert "dies with SIG" in found.detail
