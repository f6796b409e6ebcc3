"""The Fashion-MNIST judge (`ditlab.evaluation.fashion_judge`, `judges`): a tiny recipe trained on a
subset, cached by its recipe and read back without training; its scores against independent
computations; `ditlab eval SAMPLES.npz fashion-mnist`; a tiny study judged by it. Needs the real
files (Debian's dataset-fashion-mnist); skipped without them."""

import json

import numpy as np
import pytest
import torch
from test_fashion_data import needs_real

from ditlab.cli import main
from ditlab.evaluation import fashion_judge, feature_stats, frechet_distance, judges, precision_recall
from ditlab.evaluation.batches import save_samples
from ditlab.evaluation.judges import load_judge

pytestmark = needs_real
TINY = fashion_judge.JudgeRecipe(channels=(4, 8, 8), hidden=16, epochs=1, batch_size=64, train_limit=2560)


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    """The tiny judge as the default one, in a cache of its own, and the one object `ditlab eval`
    and the study load for the whole module (so the reference features are computed once)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DITLAB_HOME", str(tmp_path_factory.mktemp("home")))
        mp.setattr(fashion_judge, "DEFAULT_RECIPE", TINY)
        loaded = load_judge("fashion-mnist")
        mp.setattr(judges, "load_judge", lambda data, progress=False: loaded)
        yield loaded


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 1, S, S) in [-1, 1] -> (N, S, S, 1) uint8, as `ditlab sample` writes them."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_the_judge_is_cached_by_its_recipe(judge, monkeypatch):
    path = fashion_judge.cache_path(TINY)
    assert path.is_file() and judge.feature_width == 16
    monkeypatch.setattr(fashion_judge, "train_judge", lambda *a, **k: pytest.fail("trained again"))
    again = fashion_judge.load_fashion_judge(TINY)
    for k, v in judge.net.state_dict().items():
        torch.testing.assert_close(again.net.state_dict()[k], v, rtol=0, atol=0)
    assert fashion_judge.cache_path(fashion_judge.JudgeRecipe(**{**vars(TINY), "seed": 1})) != path
    assert judge.test_accuracy > 0.3  # of the 10,000 test images: it learned something from 2,560


def test_scores_against_an_independent_computation(judge):
    images, labels = judge.real_images("test", 16)
    ref = judge.features(images)  # (10000, 16): the reference at 16x16
    pick = torch.arange(0, 10000, 50)  # 200 test images with wrong labels for half of them
    wrong = torch.where(torch.arange(200) % 2 == 0, labels[pick], (labels[pick] + 1) % 10)
    got = judge.score(images[pick], wrong)
    feats = judge.features(images[pick])
    s, r = feature_stats(feats), feature_stats(ref)
    assert got["frechet_distance"] == pytest.approx(frechet_distance(s.mu, s.sigma, r.mu, r.sigma), rel=1e-9)
    assert (got["precision"], got["recall"]) == pytest.approx(precision_recall(ref, feats))
    assert got["precision"] == 1.0  # each of the 200 lies in its own k-NN ball of the reference
    predicted = judge.logits(images[pick]).argmax(1)
    assert got["class_accuracy"] == pytest.approx((predicted == wrong).double().mean().item())
    floor = judge.floor(200, 16)  # 200 real training images
    assert 0 < floor["frechet_distance"] < 10 * got["frechet_distance"] + 1
    noise = judge.score(torch.rand(200, 1, 16, 16) * 2 - 1, wrong)
    assert noise["frechet_distance"] > 3 * floor["frechet_distance"]


def test_ditlab_eval_with_the_judge(judge, tmp_path, capsys):
    images, labels = judge.real_images("test", 16)
    npz = tmp_path / "samples.npz"
    save_samples(str(npz), to_uint8(images[:100]).repeat(3, axis=-1), labels[:100].numpy())  # ADM's RGB
    assert main(["eval", str(npz), "fashion-mnist", "--out", str(tmp_path / "m.json")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((tmp_path / "m.json").read_text())
    direct = judge.score(images[:100], labels[:100])
    for key in ("frechet_distance", "class_accuracy", "precision", "recall"):  # uint8 rounding only
        assert result[key] == pytest.approx(direct[key], rel=0.05, abs=0.03)
    assert result["num_samples"] == 100 and result["feature_width"] == 16 and result["image_size"] == 16
    assert set(result["floor"]) == {"frechet_distance", "class_accuracy", "precision", "recall"}


TINY_STUDY = """
name = "tiny-fashion"
[data]
data = "fashion-mnist"
image_size = 16
[train]
eval_steps = [1]
global_batch_size = 8
precision = "fp32"
num_workers = 0
[sizes]
T = { depth = 1, hidden_size = 16, num_heads = 2 }
[[grid]]
sizes = ["T"]
patch_sizes = [8]
[eval]
metric = "fashion-mnist"
num_samples = 20
labels = "balanced"
seeds = [0]
steps = 2
batch_size = 20
"""


def test_a_tiny_study_is_judged_by_it(judge, tmp_path):
    from ditlab.study.runner import run_study

    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY_STUDY)
    run_study(spec, tmp_path / "out", progress=False)
    floor = json.loads((tmp_path / "out" / "reference.json").read_text())
    assert floor == {**judge.floor(20, 16), "data": "fashion-mnist"}
    (row,) = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("evals/*/*.json")]
    samples = np.load(next((tmp_path / "out").rglob("samples/*/*.npz")))
    images = torch.from_numpy(samples["arr_0"][..., :1]).permute(0, 3, 1, 2).float() / 127.5 - 1  # (20, 1, 16, 16)
    assert row["metrics"] == pytest.approx(judge.score(images, torch.from_numpy(samples["arr_1"])))
