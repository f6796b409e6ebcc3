"""Online evaluation (`ditlab train --eval-every`): the number logged during training equals, bit for
bit, what `ditlab sample` + `ditlab eval` give on the saved checkpoint with the same settings, under
one process and under two (torchrun, gloo), with the digits judge and with FID / FD-DINOv2 (tiny
random Inception and DINOv2 stand-ins); a resumed run neither repeats a finished evaluation nor
skips one that never finished."""

import importlib
import json
import sys

import numpy as np
import pytest
import torch

from ditlab.checkpoints.state import checkpoint_path
from ditlab.cli import main
from ditlab.data.digits import load_digits_arrays
from ditlab.errors import UserError
from ditlab.training import TrainConfig, train

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from test_fd_dinov2 import tiny_state_dict  # noqa: E402
from test_training import torchrun  # noqa: E402

EVAL = dict(eval_samples=16, eval_steps=4, eval_batch_size=4)  # 4 rounds of 4 (2 of 2 x 4 on two ranks)
TINY = dict(model="DiT-S/2", depth=2, hidden_size=32, num_heads=2, image_size=8, global_batch_size=16,
            num_workers=0, sample_every=0, log_every=2, ckpt_every=2, progress=False, ema_decay=0.9, lr=1e-3,
            precision="fp32")


def run_cfg(results, **kw):
    return TrainConfig(data="digits", results=str(results), **{**TINY, **EVAL, **kw})


def eval_rows(results) -> list[dict]:
    rows = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "eval" in row]


def offline(capsys, results, step, ref="digits", *flags, n=16) -> dict:
    """`ditlab sample` + `ditlab eval` on the checkpoint of `step`, with online evaluation's settings."""
    ckpt, out = checkpoint_path(results / "checkpoints", step), results / f"offline-{step}.npz"
    assert main(["sample", "--ckpt", str(ckpt), "--out", str(out), "--num-samples", str(n), "--steps", "4",
                 "--batch-size", "4", "--precision", "fp32", "--device", "cpu", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), ref, "--device", "cpu", *flags]) == 0
    return json.loads(capsys.readouterr().out)


class Recorder:
    """A sink that keeps what it is given."""

    def __init__(self):
        self.rows = []

    def scalars(self, row, step):
        self.rows.append((step, row))

    def image(self, tag, path, step):
        pass

    def close(self):
        pass


def test_online_equals_offline_and_resume_neither_repeats_nor_skips(tmp_path, capsys, monkeypatch):
    sink = Recorder()
    monkeypatch.setattr("ditlab.training.metrics.open_sinks", lambda results, cfg: [sink])
    train(run_cfg(tmp_path, max_steps=2, eval_every=2), device="cpu")
    train(run_cfg(tmp_path, max_steps=4, eval_every=2), device="cpu")  # resumed: step 2 is not evaluated again
    rows = eval_rows(tmp_path)
    assert [row["step"] for row in rows] == [2, 4]
    for row in rows:
        result = offline(capsys, tmp_path, row["step"])
        assert row["eval"]["judge_fd"] == result["judge_fd"]
        assert row["eval"]["judge_accuracy"] == result["judge_accuracy"]
        assert row["eval"]["num_samples"] == 16 and row["eval"]["ref"] == "digits"
    assert rows[0]["eval"]["judge_fd"] != rows[1]["eval"]["judge_fd"]  # two steps' EMA, two numbers
    logged = [(step, row["eval/judge_fd"]) for step, row in sink.rows if "eval/judge_fd" in row]
    assert logged == [(row["step"], row["eval"]["judge_fd"]) for row in rows]  # the sinks saw the same numbers
    # A crash after the checkpoint of step 4 but before its evaluation finished: the row is missing.
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("".join(line + "\n" for line in lines[:-1]))
    train(run_cfg(tmp_path, max_steps=4, eval_every=2), device="cpu")  # evaluates step 4, trains nothing
    train(run_cfg(tmp_path, max_steps=4, eval_every=2), device="cpu")  # finished: nothing to do
    again = eval_rows(tmp_path)
    assert [row["step"] for row in again] == [2, 4] and again[1]["eval"]["judge_fd"] == rows[1]["eval"]["judge_fd"]


def reference(tmp_path, n):
    """An .npz of n real digits (n, 8, 8, 1) uint8, and a tiny DINOv2 in the official layout."""
    real = load_digits_arrays("train")[0][:n]  # (n, 1, 8, 8) in [-1, 1]
    ref, dinov2 = tmp_path / "ref.npz", tmp_path / "tiny_dinov2.pth"
    np.savez(ref, arr_0=(real.permute(0, 2, 3, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8).numpy())
    torch.save(tiny_state_dict(), dinov2)
    return str(ref), str(dinov2)


def cheap_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """A stand-in for the Frechet distance, a function of the same statistics: FID's and sFID's exact
    2048-d matrix square roots cost ~3 s each here (tested in test_evaluation_metrics.py), and what
    this test asserts is that online and offline evaluation reach them with the same statistics."""
    return float(((mu1 - mu2) ** 2).sum() + np.abs(sigma1 - sigma2).sum())


def test_fid_and_fd_dinov2_online_equal_offline(tmp_path, capsys, monkeypatch):
    from ditlab.evaluation.inception import WEIGHTS_FILENAME, random_state_dict

    monkeypatch.setattr(importlib.import_module("ditlab.evaluation.evaluate"), "frechet_distance", cheap_frechet)
    inception = tmp_path / WEIGHTS_FILENAME  # random weights in the real layout; Inception at 299: 4 images
    torch.save(random_state_dict(0), inception)
    ref, dinov2 = reference(tmp_path, 4)
    train(run_cfg(tmp_path / "run", max_steps=2, eval_every=2, eval_samples=4, eval_ref=ref,
                  eval_features="inception,dinov2", eval_inception=str(inception), eval_dinov2=dinov2), device="cpu")
    (row,) = eval_rows(tmp_path / "run")
    result = offline(capsys, tmp_path / "run", 2, ref, "--features", "inception,dinov2", "--inception",
                     str(inception), "--dinov2", dinov2, n=4)
    assert row["eval"]["num_samples"] == 4
    for key in ("fid", "sfid", "is", "precision", "recall", "fd_dinov2", "precision_dinov2", "recall_dinov2"):
        assert row["eval"][key] == result[key], key


@pytest.mark.slow
def test_two_processes_online_equal_offline(tmp_path, capsys):
    ref, dinov2 = reference(tmp_path, 16)  # FD-DINOv2 with a tiny DINOv2: the judge's training would cost more
    flags = ["--eval-every", "2", "--eval-samples", "16", "--eval-steps", "4", "--eval-batch-size", "4",
             "--precision", "fp32", "--eval-ref", ref, "--eval-features", "dinov2", "--eval-dinov2", dinov2]
    torchrun(tmp_path / "run", *flags, max_steps=2)
    (row,) = eval_rows(tmp_path / "run")
    # one process, batch 4: the same images in the same batches as rank 0 and rank 1 drew them; in one
    # thread, as torchrun runs each rank (OMP_NUM_THREADS=1): the same kernels, so the same bits
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = offline(capsys, tmp_path / "run", 2, ref, "--features", "dinov2", "--dinov2", dinov2)
    finally:
        torch.set_num_threads(threads)
    assert row["eval"]["num_samples"] == 16
    for key in ("fd_dinov2", "precision_dinov2", "recall_dinov2"):
        assert row["eval"][key] == result[key], key


def test_bad_online_evaluation_settings_are_one_line_errors(tmp_path):
    for kw, flag in [({"eval_every": -1}, "--eval-every -1"), ({"eval_samples": 0}, "--eval-samples 0"),
                     ({"eval_features": "clip"}, "--eval-features clip"), ({"eval_steps": 0}, "--eval-steps 0"),
                     ({"fsdp": True}, "--fsdp")]:
        with pytest.raises(UserError, match=flag):
            run_cfg(tmp_path, max_steps=1, eval_every=kw.pop("eval_every", 1), **kw)
    with pytest.raises(UserError, match="--eval-ref /nonexistent.npz: no such file"):
        train(run_cfg(tmp_path / "x", max_steps=1, eval_every=1, eval_ref="/nonexistent.npz"), device="cpu")
    assert not (tmp_path / "x" / "checkpoints").exists()  # refused before the first step
