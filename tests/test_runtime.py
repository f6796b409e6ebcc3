"""ditlab.runtime.precision: --precision auto on a CPU, decided from the CPU's facts where it has no
bf16 instructions, else by the bf16 probe, measured once per machine and kept under $DITLAB_HOME.
Every test but the last injects the CPU's facts, so none depends on the CPU it runs on."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from ditlab.runtime import bf16_probe, cpu_facts
from ditlab.runtime import precision as runtime
from ditlab.runtime.cpu_facts import CpuFacts, no_bf16_hardware
from ditlab.runtime.precision import resolve_precision

CPU = torch.device("cpu")
ZEN3 = CpuFacts("x86_64", "AMD EPYC 7763 64-Core Processor", frozenset({"avx", "avx2", "fma"}), "AVX2", (), "2.13.0")
ZEN4 = dataclasses.replace(ZEN3, model="AMD EPYC 9654", capability="AVX512",
                           flags=frozenset({"avx2", "avx512f", "avx512_bf16"}))  # fmt: skip
SAPPHIRE_RAPIDS = dataclasses.replace(ZEN4, model="Intel(R) Xeon(R) Platinum 8480+",
                                      flags=ZEN4.flags | {"amx_bf16", "amx_tile"})  # fmt: skip


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch, tmp_path):
    monkeypatch.delenv(runtime.PROBE_RESULT_VAR, raising=False)
    monkeypatch.setenv("DITLAB_HOME", str(tmp_path / "home"))
    runtime.cpu_bf16.cache_clear()
    yield
    runtime.cpu_bf16.cache_clear()


def on_cpu(monkeypatch, facts: CpuFacts) -> None:
    """Make `facts` this machine's, with the ISA caps of the (monkeypatched) environment."""
    monkeypatch.setattr(bf16_probe, "read_cpu_facts", lambda: dataclasses.replace(facts, caps=cpu_facts.env_caps()))


def fake_run(returncode, stdout="", stderr="", calls=None):
    def run(cmd, **kwargs):
        assert cmd[0] == sys.executable
        if calls is not None:
            calls.append(kwargs["env"].get(runtime.ONEDNN_ISA_VAR))
        return subprocess.CompletedProcess(cmd, returncode, stdout, stderr)

    return run


def never_run(*args, **kwargs):
    pytest.fail("the bf16 probe ran")


def new_process(monkeypatch):
    """Forget what this process knows, as a fresh process starts (the disk cache stays)."""
    runtime.cpu_bf16.cache_clear()
    monkeypatch.delenv(runtime.PROBE_RESULT_VAR, raising=False)


@pytest.mark.parametrize("facts,cap,why", [
    (ZEN3, None, "no bf16 instructions"),  # AMD Zen 3: AVX2 only
    (SAPPHIRE_RAPIDS, "AVX2", "ONEDNN_MAX_CPU_ISA=AVX2"),  # any CPU with oneDNN capped below bf16
    (dataclasses.replace(ZEN3, flags=None), None, "capability AVX2"),  # no /proc/cpuinfo: torch's capability
    (CpuFacts("aarch64", "", frozenset({"fp", "asimd"}), "DEFAULT", (), "2.13.0"), None, "none of bf16"),
])  # fmt: skip
def test_without_bf16_instructions_auto_is_fp32_and_nothing_is_timed(monkeypatch, facts, cap, why):
    if cap is None:
        monkeypatch.delenv(runtime.ONEDNN_ISA_VAR, raising=False)
    else:
        monkeypatch.setenv(runtime.ONEDNN_ISA_VAR, cap)
    on_cpu(monkeypatch, facts)
    monkeypatch.setattr(bf16_probe, "run_bf16_probe", never_run)
    monkeypatch.setattr(subprocess, "run", never_run)
    found = runtime.cpu_bf16()
    assert found.usable and found.speedup is None and why in found.detail and not found.fast
    assert resolve_precision("auto", CPU) is None
    assert resolve_precision("bf16", CPU) is torch.bfloat16  # emulated (slowly) when asked for: no AMX to fault
    assert not (bf16_probe.cache_path(facts).parent).exists()  # nothing kept either


def test_which_facts_leave_the_answer_to_a_measurement():
    assert no_bf16_hardware(ZEN4) is None and no_bf16_hardware(SAPPHIRE_RAPIDS) is None
    # ATEN_CPU_CAPABILITY caps torch's own kernels, not oneDNN's bf16 matmul: still measured
    aten_avx2 = dataclasses.replace(ZEN4, capability="AVX2", caps=(("ATEN_CPU_CAPABILITY", "avx2"),))
    assert no_bf16_hardware(aten_avx2) is None
    assert no_bf16_hardware(dataclasses.replace(ZEN4, caps=((runtime.ONEDNN_ISA_VAR, "avx512_core_bf16"),))) is None
    assert no_bf16_hardware(dataclasses.replace(ZEN4, caps=(("DNNL_MAX_CPU_ISA", "AVX512_CORE"),))) is not None
    assert no_bf16_hardware(dataclasses.replace(ZEN4, flags=None)) is None  # unknown flags, AVX-512: measured
    assert no_bf16_hardware(CpuFacts("arm64", "", None, "DEFAULT", (), "2.13.0")) is None  # e.g. Apple silicon


def test_cpuinfo_is_read_from_the_first_processor():
    text = "processor\t: 0\nmodel name\t: AMD EPYC 9654\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n"
    assert cpu_facts._cpuinfo(text) == ("AMD EPYC 9654", frozenset({"fpu", "avx2", "avx512_bf16"}))
    assert cpu_facts._cpuinfo("processor\t: 0\nFeatures\t: fp asimd bf16\nCPU part\t: 0xd4f\n") == \
        ("0xd4f", frozenset({"fp", "asimd", "bf16"}))  # fmt: skip


@pytest.mark.parametrize("cap", [None, "AVX512_CORE_BF16"])
def test_a_measured_speedup_makes_auto_bf16_whatever_the_isa(monkeypatch, cap):
    # AMD Zen 4 has no AMX, yet its AVX512-BF16 matmul is 2.6x fp32: the measurement decides, not a flag.
    if cap is None:
        monkeypatch.delenv(runtime.ONEDNN_ISA_VAR, raising=False)
    else:
        monkeypatch.setenv(runtime.ONEDNN_ISA_VAR, cap)
    on_cpu(monkeypatch, ZEN4)
    calls = []
    monkeypatch.setattr(subprocess, "run", fake_run(0, "2.64\n", calls=calls))
    assert runtime.cpu_bf16().speedup == 2.64 and runtime.cpu_bf16().fast
    assert resolve_precision("auto", CPU) is torch.bfloat16
    assert calls == [cap]  # once, under this process's oneDNN cap


def test_the_answer_is_measured_once_per_machine_and_key(monkeypatch):
    monkeypatch.delenv(runtime.ONEDNN_ISA_VAR, raising=False)
    on_cpu(monkeypatch, ZEN4)
    calls = []
    monkeypatch.setattr(subprocess, "run", fake_run(0, "2.5\n", calls=calls))
    assert runtime.cpu_bf16().speedup == 2.5
    new_process(monkeypatch)
    found = runtime.cpu_bf16()  # a later command: read from $DITLAB_HOME, not measured
    assert found.speedup == 2.5 and "kept in" in found.detail and calls == [None]
    assert resolve_precision("auto", CPU) is torch.bfloat16

    for change in (lambda: monkeypatch.setenv(runtime.ONEDNN_ISA_VAR, "AVX512_CORE_BF16"),  # another oneDNN cap
                   lambda: on_cpu(monkeypatch, dataclasses.replace(ZEN4, torch_version="9.9.9")),  # another torch
                   lambda: monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")):  # another fp32 path
        change()
        new_process(monkeypatch)
        monkeypatch.setattr(subprocess, "run", fake_run(0, "0.6\n", calls=calls))
        assert runtime.cpu_bf16().speedup == 0.6 and resolve_precision("auto", CPU) is None
    assert calls == [None, "AVX512_CORE_BF16", "AVX512_CORE_BF16", "AVX512_CORE_BF16"]
    assert len(list(bf16_probe.cache_path(ZEN4).parent.glob("*.json"))) == 4


@pytest.mark.parametrize("damage", ["", "{not json", "[]", '{"probe": 2}', "wrong facts", "negative speedup"])
def test_a_damaged_cache_file_is_measured_again_and_rewritten(monkeypatch, damage):
    monkeypatch.delenv(runtime.ONEDNN_ISA_VAR, raising=False)
    on_cpu(monkeypatch, ZEN4)
    facts = bf16_probe.read_cpu_facts()
    path = bf16_probe.cache_path(facts)
    good = {"probe": bf16_probe.PROBE_VERSION, "facts": facts.as_dict(), "usable": True, "speedup": 3.0, "detail": "x"}
    if damage == "wrong facts":  # e.g. a hash collision, or a file copied from another machine
        damage = json.dumps({**good, "facts": ZEN3.as_dict()})
    elif damage == "negative speedup":
        damage = json.dumps({**good, "speedup": -1.0})
    path.parent.mkdir(parents=True)
    path.write_text(damage)
    monkeypatch.setattr(subprocess, "run", fake_run(0, "1.5\n"))
    assert runtime.cpu_bf16().speedup == 1.5
    assert bf16_probe.load_answer(path, facts).speedup == 1.5  # rewritten whole
    assert json.loads(path.read_text())["facts"] == facts.as_dict()


def test_an_unwritable_home_measures_without_error(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("DITLAB_HOME", str(tmp_path / "file" / "home"))  # a path under a file
    on_cpu(monkeypatch, ZEN4)
    monkeypatch.setattr(subprocess, "run", fake_run(0, "2.0\n"))
    assert runtime.cpu_bf16().speedup == 2.0


def test_concurrent_processes_measure_once_and_leave_a_valid_file(tmp_path):
    # Four processes start together on an empty cache; the lock makes one measure (the fake probe
    # sleeps and notes each run), the others wait and read its answer from the file it wrote.
    log = tmp_path / "runs"
    child = textwrap.dedent(f"""
        import subprocess, sys, time
        from ditlab.runtime import bf16_probe
        from ditlab.runtime.cpu_facts import CpuFacts
        facts = CpuFacts("x86_64", "AMD EPYC 9654", frozenset({{"avx512_bf16"}}), "AVX512", (), "2.13.0")
        def probe():
            with open({str(log)!r}, "a") as f:
                f.write("run\\n")
            time.sleep(0.3)
            return bf16_probe.CpuBf16(True, 2.5, "bf16 matmul 2.50x fp32")
        bf16_probe.run_bf16_probe = probe
        print(bf16_probe.measured_once(facts).speedup)
    """)
    env = {**os.environ, "DITLAB_HOME": str(tmp_path / "home")}
    procs = [subprocess.Popen([sys.executable, "-c", child], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]  # fmt: skip
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4 and [o.strip() for o in outs] == ["2.5"] * 4
    assert log.read_text() == "run\n"
    files = list((tmp_path / "home" / bf16_probe.CACHE_FOLDER).iterdir())
    assert sorted(f.name for f in files if not f.name.endswith(".json")) == [".lock"]  # no temporary left
    (kept,) = [f for f in files if f.name.endswith(".json")]
    assert json.loads(kept.read_text())["speedup"] == 2.5


@pytest.mark.parametrize("speedup", ["0.54", "1.0", "1.19"])
def test_bf16_that_is_not_faster_keeps_auto_fp32(monkeypatch, speedup):
    on_cpu(monkeypatch, ZEN4)
    monkeypatch.setattr(subprocess, "run", fake_run(0, speedup + "\n"))
    assert resolve_precision("auto", CPU) is None
    assert resolve_precision("bf16", CPU) is torch.bfloat16  # runs (slowly) when asked for


def test_the_threshold_is_inclusive(monkeypatch):
    on_cpu(monkeypatch, ZEN4)
    monkeypatch.setattr(subprocess, "run", fake_run(0, f"{runtime.BF16_SPEEDUP_NEEDED}\n"))
    assert resolve_precision("auto", CPU) is torch.bfloat16


def test_children_inherit_the_answer_under_the_same_key(monkeypatch, tmp_path):
    monkeypatch.setenv(runtime.ONEDNN_ISA_VAR, "AVX512_CORE_BF16")
    on_cpu(monkeypatch, ZEN4)
    monkeypatch.setattr(subprocess, "run", fake_run(0, "3.5\n"))
    runtime.cpu_bf16()
    inherited = os.environ[runtime.PROBE_RESULT_VAR]
    assert inherited.endswith("=3.5")

    runtime.cpu_bf16.cache_clear()  # as a child process starts with another (empty) $DITLAB_HOME
    monkeypatch.setenv("DITLAB_HOME", str(tmp_path / "child"))
    monkeypatch.setattr(subprocess, "run", never_run)
    found = runtime.cpu_bf16()
    assert found.speedup == 3.5 and "parent" in found.detail

    runtime.cpu_bf16.cache_clear()  # another oneDNN cap is another measurement
    monkeypatch.delenv(runtime.ONEDNN_ISA_VAR)
    monkeypatch.setattr(subprocess, "run", fake_run(0, "0.6\n"))
    assert runtime.cpu_bf16().speedup == 0.6


@pytest.mark.parametrize("junk", ["nonsense", "abc=def"])
def test_a_malformed_inherited_answer_is_measured_again(monkeypatch, junk):
    on_cpu(monkeypatch, ZEN4)
    monkeypatch.setenv(runtime.PROBE_RESULT_VAR, junk)
    monkeypatch.setattr(subprocess, "run", fake_run(0, "0.7\n"))
    assert runtime.cpu_bf16().speedup == 0.7


@pytest.mark.parametrize("code", [-signal.SIGILL, 128 + signal.SIGILL])
def test_faulting_bf16_keeps_auto_fp32_and_refuses_bf16_in_one_line(monkeypatch, code):
    monkeypatch.delenv(runtime.ONEDNN_ISA_VAR, raising=False)
    on_cpu(monkeypatch, SAPPHIRE_RAPIDS)
    monkeypatch.setattr(subprocess, "run", fake_run(code))
    assert resolve_precision("auto", CPU) is None
    assert runtime.PROBE_RESULT_VAR not in os.environ  # nothing measured, nothing handed on
    with pytest.raises(ValueError, match="SIGILL") as err:
        resolve_precision("bf16", CPU)
    assert "ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16" in str(err.value) and "\n" not in str(err.value)
    new_process(monkeypatch)  # the fault is kept too: a later command does not risk it again
    monkeypatch.setattr(subprocess, "run", never_run)
    assert not runtime.cpu_bf16().usable


def test_without_amx_explicit_bf16_needs_no_probe(monkeypatch):
    monkeypatch.delenv(runtime.ONEDNN_ISA_VAR, raising=False)
    on_cpu(monkeypatch, ZEN4)
    monkeypatch.setattr(subprocess, "run", never_run)
    assert resolve_precision("bf16", CPU) is torch.bfloat16


def test_capping_after_a_fault_measures_again_under_the_cap(monkeypatch):
    monkeypatch.delenv(runtime.ONEDNN_ISA_VAR, raising=False)
    on_cpu(monkeypatch, SAPPHIRE_RAPIDS)
    calls = []
    monkeypatch.setattr(subprocess, "run", fake_run(-signal.SIGILL, calls=calls))
    runtime.cap_onednn_below_amx()
    assert os.environ[runtime.ONEDNN_ISA_VAR] == runtime.ONEDNN_SAFE_ISA
    monkeypatch.setattr(subprocess, "run", fake_run(0, "0.55\n", calls=calls))
    assert resolve_precision("bf16", CPU) is torch.bfloat16  # below AMX: nothing can fault, nothing measured
    assert resolve_precision("auto", CPU) is None and runtime.cpu_bf16().usable
    assert calls == [None, runtime.ONEDNN_SAFE_ISA]


def test_a_broken_probe_is_not_fatal_nor_kept(monkeypatch):
    on_cpu(monkeypatch, ZEN4)
    monkeypatch.setattr(subprocess, "run", fake_run(1, stderr="Traceback\nImportError: no torch\n"))
    found = runtime.cpu_bf16()
    assert found.usable and not found.fast and "ImportError: no torch" in found.detail
    assert resolve_precision("auto", CPU) is None
    assert not list(bf16_probe.cache_path(ZEN4).parent.glob("*.json"))


def test_the_real_probe_never_takes_this_process_down():
    # Uncapped, on a CPU that faults on AMX this child dies of SIGILL; the parent reads that. (A small
    # matmul: a fault comes with the first bf16 instruction, whatever the size.)
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    found = runtime.run_bf16_probe(env, shape=(256, 384, 384))
    if found.usable:
        assert found.speedup is None or found.speedup > 0
    else:
        assert "dies with SIG" in found.detail
