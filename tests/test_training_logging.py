"""Weights & Biases logging beside metrics.jsonl, in offline mode (no network)."""

import json

import numpy as np
import pytest
from PIL import Image
from test_training import run_cfg

from ditlab.training import train
from ditlab.training.sinks import WANDB_ID_FILE


def test_wandb_offline_logs_the_metrics_rows_and_the_sample_grids(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install 'ditlab[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    kw = dict(ckpt_every=4, log_every=2, sample_every=4, sample_steps=2, wandb="ditlab-test")
    train(run_cfg(tmp_path, max_steps=4, **kw), device="cpu")
    train(run_cfg(tmp_path, max_steps=6, **kw), device="cpu")  # resumed: logs into the same W&B run
    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith("-" + run_id) for r in runs)
    logged = b"".join(next(r.glob("run-*.wandb")).read_bytes() for r in runs)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for row in rows:  # every value of metrics.jsonl went to W&B, as W&B stores it (JSON text)
        for key in ("loss", "mse", "vb", "grad_norm", "lr"):
            assert json.dumps(row[key]).encode() in logged, (row["step"], key)
    assert b"train/loss" in logged
    media = list(runs[0].glob("files/media/images/samples_4_*.png"))
    assert len(media) == 1  # the EMA grid of step 4, the same pixels as samples/step-0000004.png
    ours = np.asarray(Image.open(tmp_path / "samples" / "step-0000004.png").convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(media[0]).convert("RGB")), ours)


def test_wandb_missing_is_a_one_line_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"--wandb proj: the wandb package is not installed"):
        train(run_cfg(tmp_path, max_steps=2, wandb="proj"), device="cpu")
    assert not (tmp_path / "checkpoints").exists()
