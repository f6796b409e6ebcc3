"""The step benchmarks' arithmetic and plumbing (their figures live in the README, not here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ditlab

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import dit_common  # noqa: E402
from train_step import live_weights, parse_variant  # noqa: E402

CPU = torch.device("cpu")


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A10", 125.0), ("NVIDIA L40S", 362.1),
    ("NVIDIA L4", 121.0), ("Some Future GPU", None),
])  # fmt: skip
def test_peak_table_by_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert dit_common.peak_tflops(torch.device("cuda"), None) == peak
    assert dit_common.peak_tflops(torch.device("cuda"), 500.0) == 500.0  # the override wins


def test_cpu_has_a_peak_only_when_given():
    assert dit_common.peak_tflops(CPU) is None
    assert dit_common.utilization(1e12, 1.0, None) is None
    assert dit_common.peak_tflops(CPU, 2.0) == 2.0


def test_utilization_of_the_issue_example():
    # DiT-XL/2 at 256: 118.6 Gflops; 560 images/s of training = 3 x 2 x 118.6e9 x 560 FLOP/s.
    flops_per_step = dit_common.TRAIN_PASSES * dit_common.FLOPS_PER_MAC * 118.6e9 * 560
    assert dit_common.utilization(flops_per_step, 1.0, 989.4) == pytest.approx(0.4028, abs=1e-4)
    assert dit_common.utilization(flops_per_step, 1.0, 796.9) == pytest.approx(0.5, abs=1e-3)


def test_alternation_reverses_the_order_every_other_round():
    calls = []
    runners = {name: (lambda name=name: calls.append(name)) for name in "ab"}
    times = dit_common.alternate(runners, CPU, warmup=1, rounds=3, steps=2, log=lambda msg: None)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] + ["b", "b", "a", "a"] + ["a", "a", "b", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 6, "b": 6}


def test_step_peak_bytes_counts_what_a_call_holds_at_once():
    def two_then_one():
        a = torch.ones(2**20)  # 4 MiB
        b = torch.ones(2**20)
        del a, b
        c = torch.ones(2**19)  # 2 MiB
        return c.sum()

    peak = dit_common.step_peak_bytes(two_then_one, CPU)
    assert 8 * 2**20 <= peak < 8 * 2**20 + 2**16


def test_held_bytes_counts_shared_storage_once():
    x = torch.zeros(1000)
    assert dit_common.held_bytes([x, x[10:], x.view(10, 100), torch.zeros(10)]) == 4000 + 40


def test_the_peer_computes_our_function():
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = live_weights(ditlab.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2,
                                    num_heads=2, num_classes=10), seed=0).eval()  # fmt: skip
    assert all(p.any() for p in model.parameters() if p.requires_grad)  # no zero layer left
    peer = dit_common.make_peer(model).eval()
    assert peer.null_class == model.null_class == 10
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([1, 10, 3])
    with torch.no_grad():
        ours, theirs = model(x, t, y), peer(x, t, y)
    assert (ours - theirs).abs().max() < 1e-5 * ours.abs().max()


def test_variant_specs():
    assert parse_variant("eager") == {"compile": "none", "grad_checkpointing": False}
    assert parse_variant("block+ckpt") == {"compile": "block", "grad_checkpointing": True}
    with pytest.raises(ValueError, match="unknown option 'fast'"):
        parse_variant("model+fast")


def run_script(name, *args):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args], env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.slow
def test_train_step_benchmark_end_to_end():
    pytest.importorskip("diffusers")
    r = run_script("train_step.py", "--model", "DiT-S/8", "--image-size", "64", "--batch-size", "2", "--variants",
                   "eager,ckpt", "--warmup", "1", "--rounds", "2", "--steps", "1", "--device", "cpu", "--threads", "1")
    assert set(r["runners"]) == {"ours[eager]", "ours[ckpt]", "peer"}
    assert r["train_flops_per_step"] == pytest.approx(3 * 2 * r["gflops_per_image"] * 1e9 * 2)
    for row in r["runners"].values():
        assert row["n"] == 2 and row["images_per_s"] == pytest.approx(2 / row["median_s"])
        assert row["peak_memory_gib"] > row["held_gib"] > 0
    assert r["speedup_vs_peer"]["ours[eager]"] == pytest.approx(
        r["runners"]["peer"]["median_s"] / r["runners"]["ours[eager]"]["median_s"])
    assert r["runners"]["peer"]["precision"] == "fp32" and r["runners"]["ours[ckpt]"]["grad_checkpointing"]


@pytest.mark.slow
def test_sample_step_benchmark_end_to_end():
    pytest.importorskip("diffusers")
    r = run_script("sample_step.py", "--model", "DiT-S/8", "--image-size", "64", "--batch-size", "2", "--warmup",
                   "1", "--rounds", "2", "--device", "cpu", "--threads", "1")
    assert r["model_batch"] == 4 and set(r["runners"]) == {"ours", "peer"}
    assert r["flops_per_step"] == pytest.approx(2 * r["gflops_per_image"] * 1e9 * 4)
    ours = r["runners"]["ours"]
    assert ours["images_per_s"] == pytest.approx(2 / (ours["median_s"] * 250))
