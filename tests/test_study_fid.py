"""`ditlab study` with ADM's metrics: an image folder in pixel space, judged by the Inception suite
(random Inception weights in a temporary file; the real file is 92 MB)."""

import json
import math

import numpy as np
import torch
from PIL import Image
from test_evaluation_inception import _random_state_dict
from test_repa_training import tiny_dinov2_file

from ditlab.evaluation import save_samples
from ditlab.evaluation.inception import WEIGHTS_FILENAME
from ditlab.study.report import write_report
from ditlab.study.runner import run_study

SPEC = """
[data]
data = "{data}"
image_size = 8
vae = "pixel"
[train]
eval_steps = [2]
global_batch_size = 8
lr = 1e-3
precision = "fp32"
num_workers = 0
[sizes]
T = {{ depth = 1, hidden_size = 32, num_heads = 2 }}
[[grid]]
sizes = ["T"]
patch_sizes = [4]
[eval]
metric = "fid"
ref = "{ref}"
inception = "{inception}"
features = ["inception", "dinov2"]
dinov2 = "{dinov2}"
num_samples = 6
seeds = [0]
steps = 2
batch_size = 6
keep_samples = false
"""


def test_fid_study_on_an_image_folder(tmp_path):
    g = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(g.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "images" / c / f"{i}.png")
    save_samples(str(tmp_path / "ref.npz"), g.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    spec = tmp_path / "fid.toml"
    weights = tmp_path / WEIGHTS_FILENAME
    torch.save(_random_state_dict(0), weights)
    tiny_dinov2_file(tmp_path / "dino.pth")  # FD-DINOv2 beside ADM's suite
    spec.write_text(SPEC.format(data=tmp_path / "images", ref=tmp_path / "ref.npz", inception=weights,
                                dinov2=tmp_path / "dino.pth"))
    out = tmp_path / "study"
    (summary,) = run_study(spec, out, progress=False)
    assert (summary["trained_steps"], summary["evaluations"]) == (2, 1)
    entry = json.loads((out / "DiT-T-4" / "entry.json").read_text())
    assert entry["tokens"] == 4 and entry["input_size"] == 8  # pixel space: no 8x VAE downsampling
    ev = json.loads((out / "DiT-T-4" / "evals" / "step-0000002" / "ddpm-2-cfg1-n6-random-seed0.json").read_text())
    assert set(ev["metrics"]) == {"fid", "sfid", "is", "precision", "recall", "fd_dinov2", "precision_dinov2",
                                  "recall_dinov2"}
    assert all(math.isfinite(v) for v in ev["metrics"].values()) and ev["metrics"]["fid"] > 0
    assert not list((out / "DiT-T-4" / "samples").rglob("*.npz"))  # keep_samples = false: judged, then removed
    (again,) = run_study(spec, out, progress=False)
    assert (again["trained_steps"], again["evaluations"]) == (0, 0)  # the metrics suffice, not the samples
    write_report(out)
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == "fid" and len(results["rows"]) == 1
