"""The TF-graph InceptionV3 against torch-fidelity's, its weight loading, and `ditlab eval` end to
end, all with random weights written to a temporary file (the real file is 92 MB)."""

import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from ditlab.cli import main
from ditlab.evaluation import (
    extract_features,
    feature_stats,
    inception_score,
    load_inception,
    precision_recall,
    save_reference,
    save_samples,
)
from ditlab.evaluation.batches import NpzImages
from ditlab.evaluation.inception import WEIGHTS_FILENAME, InceptionV3, resize_bilinear_tf1


def _random_state_dict(seed: int) -> dict[str, torch.Tensor]:
    from ditlab.evaluation.inception import random_state_dict

    return random_state_dict(seed)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_FILENAME
    torch.save(_random_state_dict(0), path)
    return str(path)


@pytest.fixture(scope="module")
def model(weights) -> InceptionV3:
    return load_inception(weights)


@pytest.fixture
def fidelity_inception():
    """torch-fidelity's `feature_extractor_inceptionv3` module, imported without the package's
    __init__ (which imports torchvision); sys.modules is restored afterwards."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        pytest.skip("torch-fidelity is not installed")
    saved = {k: m for k, m in sys.modules.items() if k == "torch_fidelity" or k.startswith("torch_fidelity.")}
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = package
    try:
        yield pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    finally:
        for k in [k for k in sys.modules if k == "torch_fidelity" or k.startswith("torch_fidelity.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def _uint8_images(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def test_feature_shapes(model):
    for size in (32, 299):
        pool, spatial = model(_uint8_images(2, size, seed=size))
        assert pool.shape == (2, 2048) and spatial.shape == (2, 17 * 17 * 7)
        assert pool.dtype == spatial.dtype == torch.float32
        assert model.logits(pool).shape == (2, 1008)
        assert pool.std() > 0.1 and spatial.std() > 0.1  # the random weights keep signal alive
    with pytest.raises(ValueError, match="uint8"):
        model(torch.zeros(1, 3, 8, 8))


def test_resize_matches_torch_fidelity_and_keeps_299(fidelity_inception):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = _uint8_images(2, 64, seed=1).float()
    theirs = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    assert torch.equal(resize_bilinear_tf1(x, 299), theirs)
    x = _uint8_images(1, 299, seed=2).float()
    assert torch.equal(resize_bilinear_tf1(x, 299), x)
    # TF1 has no half-pixel offset: output pixel i samples input i * in / out, so row 0 is input row 0.
    x = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    assert resize_bilinear_tf1(x, 8)[0, 0, 0].tolist() == [0, 0.5, 1, 1.5, 2, 2.5, 3, 3]


def test_features_equal_torch_fidelity(fidelity_inception, weights, model):
    theirs = fidelity_inception.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights
    )
    captured = []  # their Mixed_6d 1x1 branch: TF's mixed_6/conv, after BN and ReLU
    theirs.Mixed_6d.branch1x1.register_forward_hook(lambda mod, inp, out: captured.append(out.clone()))
    for size in (64, 256):
        images = _uint8_images(2, size, seed=size)
        with torch.no_grad():
            pool, spatial = model(images)
            logits = model.logits(pool)
            their_pool, their_logits = theirs(images)
        conv = captured.pop()[:, :7]  # (N, 7, 17, 17)
        their_spatial = conv.permute(0, 2, 3, 1).reshape(2, -1)  # (N, 17 * 17 * 7) in TF's (h, w, c) order
        torch.testing.assert_close(pool, their_pool, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(logits, their_logits, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(spatial, their_spatial, rtol=1e-6, atol=1e-6)
        # A channel-first flatten would be a different vector: the order is what the test pins.
        assert not torch.allclose(spatial, conv.reshape(2, -1))


def test_missing_or_foreign_weights_are_one_line_errors(tmp_path, monkeypatch, weights):
    missing = str(tmp_path / "nowhere.pth")
    with pytest.raises(FileNotFoundError, match="github.com/toshas/torch-fidelity/releases") as e:
        load_inception(missing)
    assert missing in str(e.value) and "--inception" in str(e.value) and "\n" not in str(e.value)
    # Without a path: torch hub's checkpoints folder.
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "hub" / "checkpoints" / WEIGHTS_FILENAME)):
        load_inception()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / WEIGHTS_FILENAME).symlink_to(weights)
    assert isinstance(load_inception(), InceptionV3)
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth: not the InceptionV3"):
        load_inception(str(tmp_path / "other.pth"))


def _write_batches(tmp_path, n_samples=6, n_ref=5):
    g = np.random.default_rng(0)
    samples = g.integers(0, 256, (n_samples, 64, 64, 3), dtype=np.uint8)
    ref = g.integers(0, 256, (n_ref, 48, 48, 3), dtype=np.uint8)  # another size: resized like any other
    save_samples(str(tmp_path / "samples.npz"), samples, np.arange(n_samples))
    save_samples(str(tmp_path / "ref.npz"), ref)
    return str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz")


def _frechet_from_features(x: torch.Tensor, y: torch.Tensor) -> float:
    """FID of two small feature sets straight from the samples: with S1 = A A^T, S2 = B B^T
    (A = centred x.T / sqrt(n - 1)), tr((S1 S2)^(1/2)) is the nuclear norm of A^T B."""
    x, y = x.double().numpy(), y.double().numpy()
    a = (x - x.mean(0)).T / np.sqrt(len(x) - 1)  # (D, N)
    b = (y - y.mean(0)).T / np.sqrt(len(y) - 1)  # (D, M)
    nuclear = np.linalg.svd(a.T @ b, compute_uv=False).sum()
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + (a * a).sum() + (b * b).sum() - 2 * nuclear)


@pytest.mark.slow
def test_cli_eval_end_to_end(tmp_path, capsys, weights, model):
    samples, ref = _write_batches(tmp_path)
    # ADM's reference batches store the statistics of a larger set than their images: here those
    # of 5 other images (B), so FID can only match if the stored ones are used, and precision /
    # recall only if the images (A) are.
    other = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    save_samples(str(tmp_path / "other.npz"), other)
    b_pool, b_spatial = extract_features(model, NpzImages(str(tmp_path / "other.npz")))
    save_reference(ref, np.load(ref)["arr_0"], feature_stats(b_pool), feature_stats(b_spatial))
    out = tmp_path / "metrics.json"
    dinov2 = tmp_path / "dinov2.pth"  # both feature spaces in one run: a tiny DINOv2 in the official layout
    with np.load(Path(__file__).parent / "data" / "golden_dinov2_reference.npz") as f:
        torch.save({k[6:]: torch.from_numpy(f[k]).float() for k in f.files if k.startswith("plain/") and
                    k.count("/") == 1}, dinov2)
    argv = ["eval", samples, ref, "--inception", weights, "--batch-size", "4", "--device", "cpu", "--out", str(out),
            "--features", "inception,dinov2", "--dinov2", str(dinov2)]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == result
    assert result["fd_dinov2"] > 0 and 0 <= result["precision_dinov2"] <= 1 and 0 <= result["recall_dinov2"] <= 1
    assert set(result["features"]) == {"inception", "dinov2"}
    assert result["features"]["dinov2"]["weights"] == "dinov2.pth"
    # The same numbers from the pieces: features of each file, then each metric by itself.
    s_pool, s_spatial = extract_features(model, NpzImages(samples), batch_size=3)
    a_pool, _ = extract_features(model, NpzImages(ref), batch_size=5)
    assert result["fid"] == pytest.approx(_frechet_from_features(s_pool, b_pool), rel=1e-6)
    assert result["sfid"] == pytest.approx(_frechet_from_features(s_spatial, b_spatial), rel=1e-6)
    assert result["is"] == pytest.approx(inception_score(model.logits(s_pool)), rel=1e-6)
    assert (result["precision"], result["recall"]) == precision_recall(a_pool, s_pool)
    assert result["fid"] > 0 and result["sfid"] > 0 and result["is"] > 1
    assert (result["num_samples"], result["num_ref"]) == (6, 5)
    assert (result["samples_stats"], result["ref_stats"]) == ("computed", "stored")


def test_cli_eval_bad_input_is_one_line(tmp_path, capsys, weights):
    samples, ref = _write_batches(tmp_path)
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    cases = [
        ([str(tmp_path / "float.npz"), ref, "--inception", weights], "float.npz: arr_0 is float32"),
        ([samples, str(tmp_path / "none.npz"), "--inception", weights], "none.npz: no such file"),
        ([samples, ref, "--inception", str(tmp_path / "w.pth")], "Inception weights not found at"),
        ([samples, ref, "--inception", weights, "--out", str(tmp_path / "no" / "m.json")], "--out"),
        ([samples, ref, "--inception", weights, "--device", "gpu0"], "--device gpu0"),
    ]
    for argv, message in cases:
        assert main(["eval", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err


@pytest.mark.gpu
def test_cuda_features_match_cpu(tmp_path, model, weights):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    images = _uint8_images(4, 256, seed=3)
    save_samples(str(tmp_path / "s.npz"), images.permute(0, 2, 3, 1).numpy())
    with torch.no_grad():
        cpu = model(images)
    gpu = extract_features(load_inception(weights, "cuda"), NpzImages(str(tmp_path / "s.npz")))  # TF32 off
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-4)
