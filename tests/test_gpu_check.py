"""benchmarks/gpu_check.py: its smoke run end to end on the CPU (so the GPU script cannot rot),
and its machinery: time boxes that kill a hung child's whole process group, the overall budget,
the JSON left after every step, and the resume comparison's rule."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402
from gpu_check_e2e import RESUME_TOLERANCE, compare_runs  # noqa: E402
from gpu_check_runner import Check, StepFailed, run_steps  # noqa: E402

SMOKE_STEPS = {name for name, _, _, in_smoke in gpu_check.build_steps() if in_smoke}


def check(tmp_path, budget_s=60.0):
    return Check(out=tmp_path, smoke=True, sizes=gpu_check.sizes(True), deadline=time.monotonic() + budget_s)


def test_smoke_run_end_to_end(tmp_path):
    pytest.importorskip("diffusers")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path),
                           "--smoke"], env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert proc.returncode == 0, (report.get("failed"), proc.stderr[-3000:])
    assert set(report["passed"]) == SMOKE_STEPS and not report["failed"]
    steps = {name: r.get("result") for name, r in report["steps"].items()}
    peak = steps["environment"]["matmul_bf16"]["best_tflops"]
    assert peak > 0 and report["measured_bf16_tflops"] == peak and steps["environment"]["copy_gbs"] > 0
    assert "skipped" in steps["gpu_tests"]["summary"] and "tests/test_fast_path.py" in steps["gpu_tests"]["files"]
    rows = steps["train_xl_b256"]["runners"]
    assert set(rows) == {"ours[eager]", "ours[ckpt]"}  # compiled variants are left out of the smoke run
    for row in [*rows.values(), *steps["sample_xl_b64_vs_diffusers"]["runners"].values()]:
        assert row["mfu_of_measured_peak"] == pytest.approx(row["tflops"] / peak)
    train = steps["e2e_train_resume"]
    for key in ("single_resumed_vs_straight", "fsdp_resumed_vs_straight"):
        assert train[key]["bitwise"] and train[key]["moved"] > 0  # CPU kernels here are deterministic
    assert steps["e2e_extract_latents"]["images"] == 8
    assert steps["e2e_sample_npz"]["shape"] == [4, 16, 16, 3]
    assert all(isinstance(v, float) for v in steps["e2e_eval"]["metrics"].values())
    assert "=== [e2e_eval]" in (tmp_path / "gpu_check.log").read_text()


def hang(c):
    """A step whose child starts a grandchild that writes its pid, then both hang."""
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(600)']); open(sys.argv[1], 'w').write(str(p.pid)); time.sleep(600)")
    c.run([sys.executable, "-c", code, str(c.out / "grandchild.pid")])


def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for init to reap it is gone too
        return f.read().split(")")[-1].split()[0] == "Z"


def test_a_hung_step_is_killed_with_its_children_and_the_next_step_runs(tmp_path):
    start = time.monotonic()
    report = run_steps(check(tmp_path), [("hang", 3, hang, True), ("after", 30, lambda c: {"ran": True}, True)], {})
    assert time.monotonic() - start < 60
    assert report["steps"]["hang"]["status"] == "failed" and "time box" in report["steps"]["hang"]["error"]
    assert report["steps"]["after"] == {**report["steps"]["after"], "status": "passed", "result": {"ran": True}}
    pid = int((tmp_path / "grandchild.pid").read_text())
    deadline = time.monotonic() + 30
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(pid)
    assert json.loads((tmp_path / "gpu_check.json").read_text())["failed"] == ["hang"]


def test_steps_past_the_budget_are_skipped_not_run_and_errors_are_recorded(tmp_path):
    def fails(c):
        raise StepFailed("found a bug")

    def broken(c):
        return {}["missing"]

    def never(c):
        pytest.fail("ran past the budget")

    report = run_steps(check(tmp_path, budget_s=12), [("fails", 5, fails, True), ("broken", 5, broken, True),
                                                      ("late", 5, lambda c: time.sleep(3) or {}, True),
                                                      ("never", 5, never, True)], {})  # fmt: skip
    assert report["failed"] == ["fails", "broken"] and report["passed"] == ["late"]
    assert report["steps"]["fails"]["error"] == "found a bug" and "KeyError" in report["steps"]["broken"]["error"]
    assert report["skipped"] == ["never"] and "budget" in report["steps"]["never"]["reason"]


def test_unknown_only_is_a_one_line_error_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--out", str(tmp_path / "out"), "--only", "environment,bogus"])
    assert e.value.code == 2 and "--only: unknown step 'bogus'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_full_run_measures_what_the_issue_asks():
    s = gpu_check.sizes(False)
    assert (s["xl"], s["b4"], s["image"], sorted(s["batches"]), s["sample_batches"]) == \
        ("DiT-XL/2", "DiT-B/4", 256, [64, 128, 256], (64, 256))  # fmt: skip
    assert s["e2e_steps"] == 30 and s["compile"] and s["device"] == "cuda"
    assert gpu_check.variants(s, "eager", "block+ckpt") == "eager,block+ckpt"
    assert gpu_check.variants(gpu_check.sizes(True), "eager", "block", "block+ckpt", "ckpt") == "eager,ckpt"
    names = [n for n, *_ in gpu_check.build_steps()]
    assert len(set(names)) == len(names) and names[:2] == ["environment", "gpu_tests"]


def run_pair(value, moved_by=1.0):
    w = {"w": torch.zeros(3)}
    ref = {"step": 4, "model": {"w": w["w"] + moved_by}, "ema": {"w": torch.zeros(3)}}
    middle = {"step": 2, "model": w, "ema": w}
    other = {"step": 4, "model": {"w": ref["model"]["w"] + torch.tensor([0.0, value, 0.0])}, "ema": ref["ema"]}
    return compare_runs(ref, middle, other)


def test_resume_comparison_rule():
    assert run_pair(0.0).bitwise and run_pair(0.0).within_tolerance
    near = run_pair(0.5 * RESUME_TOLERANCE)
    assert not near.bitwise and near.within_tolerance and near.max_abs_diff == pytest.approx(0.5 * RESUME_TOLERANCE)
    assert not run_pair(2 * RESUME_TOLERANCE).within_tolerance
    assert not run_pair(1e-9, moved_by=0.0).within_tolerance  # nothing moved: only bitwise counts


def test_out_of_memory_without_checkpointing_falls_back_to_the_checkpointed_variants(tmp_path, monkeypatch):
    asked = []

    def bench(self, script, args):
        spec = args[args.index("--variants") + 1]
        asked.append(spec)
        if spec != "ckpt":
            raise StepFailed("train_step.py exited 1: torch.OutOfMemoryError: CUDA out of memory.")
        return {"runners": {"ours[ckpt]": {}}}

    monkeypatch.setattr(Check, "bench", bench)
    result = gpu_check.train_bench("xl", 0, "eager,block,ckpt", "none")(check(tmp_path))
    assert asked == ["eager,ckpt", "ckpt"] and "out of memory" in result["out_of_memory"]["error"]
    with pytest.raises(StepFailed, match="out of memory"):  # nothing checkpointed to fall back to
        gpu_check.train_bench("xl", 0, "eager", "none")(check(tmp_path))
