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
def fresh_probe():
    runtime.cpu_bf16.cache_clear()
    yield
    runtime.cpu_bf16.cache_clear()


def fake_run(returncode, stdout="", stderr=""):
    def run(cmd, **kwargs):
        assert cmd[0] == sys.executable
        return subprocess.CompletedProcess(cmd, returncode, stdout, stderr)

    return run


def test_a_cap_below_amx_answers_without_a_subprocess(monkeypatch):
    monkeypatch.setattr(runtime, "amx_advertised", lambda: True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_bf16")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("probe started"))
    found = runtime.cpu_bf16()
    assert found.usable and not found.fast and "keeps oneDNN off AMX" in found.detail
    assert resolve_precision("auto", CPU) is None


@pytest.mark.parametrize("cap", ["", "ALL", "AVX512_CORE_AMX"])
def test_caps_that_allow_amx(monkeypatch, cap):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert not runtime.onednn_capped_below_amx()


def test_no_amx_means_fp32_without_a_subprocess(monkeypatch):
    monkeypatch.setattr(runtime, "amx_advertised", lambda: False)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("probe started"))
    assert resolve_precision("auto", CPU) is None
    assert resolve_precision("bf16", CPU) is torch.bfloat16  # runs (slowly) when asked for


def test_working_amx_makes_auto_bf16(monkeypatch):
    monkeypatch.setattr(runtime, "amx_advertised", lambda: True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(subprocess, "run", fake_run(0, "6.5\n"))
    assert runtime.cpu_bf16().speedup == 6.5
    assert resolve_precision("auto", CPU) is torch.bfloat16


def test_slow_bf16_keeps_auto_fp32(monkeypatch):
    monkeypatch.setattr(runtime, "amx_advertised", lambda: True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(subprocess, "run", fake_run(0, "0.66\n"))
    assert resolve_precision("auto", CPU) is None


@pytest.mark.parametrize("code", [-signal.SIGILL, 128 + signal.SIGILL])
def test_faulting_amx_keeps_auto_fp32_and_refuses_bf16_in_one_line(monkeypatch, code):
    monkeypatch.setattr(runtime, "amx_advertised", lambda: True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(subprocess, "run", fake_run(code))
    assert resolve_precision("auto", CPU) is None
    with pytest.raises(ValueError, match="SIGILL") as err:
        resolve_precision("bf16", CPU)
    assert "ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16" in str(err.value) and "\n" not in str(err.value)


def test_a_broken_probe_is_not_fatal(monkeypatch):
    monkeypatch.setattr(runtime, "amx_advertised", lambda: True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(subprocess, "run", fake_run(1, stderr="Traceback\nImportError: no torch\n"))
    found = runtime.cpu_bf16()
    assert found.usable and not found.fast and "ImportError: no torch" in found.detail


def test_the_real_probe_never_takes_this_process_down():
    # Uncapped, on a CPU that faults on AMX this child dies of SIGILL; the parent reads that.
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    found = runtime.run_bf16_probe(env)
    if found.usable:
        assert found.speedup is None or found.speedup > 0
    else:
        assert "dies with SIG" in found.detail
