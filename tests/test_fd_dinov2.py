"""FD-DINOv2 in `ditlab eval`: EDM2's preprocessing, the metrics against an independent computation
from the features, reference batches made by --save-ref (from a folder and from an .npz, kept
statistics, the cache, refusals), and the DINOv2 entries of the downloader. A tiny random DINOv2
(width 64, depth 2, from the golden fixture) stands in for ViT-L/14 throughout."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ditlab import hub
from ditlab.cli import main
from ditlab.errors import UserError
from ditlab.evaluation import feature_stats, frechet_distance, load_dinov2, precision_recall, save_samples
from ditlab.evaluation.dinov2 import check_released
from ditlab.evaluation.fd_dinov2 import FEATURES_KEY, MU_KEY, RECORD_KEY, SIGMA_KEY

FIXTURE = Path(__file__).parent / "data" / "golden_dinov2_reference.npz"


def tiny_state_dict(name: str = "plain") -> dict[str, torch.Tensor]:
    with np.load(FIXTURE, allow_pickle=False) as f:
        return {k.split("/", 1)[1]: torch.from_numpy(f[k]).float() for k in f.files
                if k.startswith(f"{name}/") and k.count("/") == 1}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("dinov2") / "tiny_dinov2.pth"
    torch.save(tiny_state_dict(), path)
    return str(path)


@pytest.fixture
def no_downloads(tmp_path, monkeypatch):
    """An empty cache, offline, and no torch hub copy: any attempt to get Inception weights fails."""
    monkeypatch.setenv("DITLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DITLAB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def edm2_features(weights: str, images: np.ndarray) -> torch.Tensor:
    """EDM2's DINOv2 detector, written out here: uint8 NCHW as float32, antialiased bicubic resize to
    224, / 255, ImageNet mean and std, the network's CLS token."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32)
    x = F.interpolate(x, size=(224, 224), mode="bicubic", antialias=True) / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        return load_dinov2(weights)(x)


def write_batches(tmp_path: Path) -> tuple[str, str, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    samples, ref = (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (6, 5))
    save_samples(str(tmp_path / "samples.npz"), samples)
    save_samples(str(tmp_path / "ref.npz"), ref)
    return str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), samples, ref


def run_eval(capsys, *argv: str) -> dict:
    assert main(["eval", *argv, "--batch-size", "4", "--device", "cpu"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_fd_dinov2_alone_needs_no_inception(tmp_path, capsys, weights, no_downloads):
    samples, ref, s_img, r_img = write_batches(tmp_path)
    result = run_eval(capsys, samples, ref, "--features", "dinov2", "--dinov2", weights)
    s, r = edm2_features(weights, s_img), edm2_features(weights, r_img)
    fs, fr = feature_stats(s), feature_stats(r)
    assert result["fd_dinov2"] == pytest.approx(frechet_distance(fs.mu, fs.sigma, fr.mu, fr.sigma), rel=1e-5)
    assert result["fd_dinov2"] > 0
    assert (result["precision_dinov2"], result["recall_dinov2"]) == precision_recall(r, s)
    assert "fid" not in result and "inception" not in result["features"]
    record = result["features"]["dinov2"]
    assert record["weights"] == "tiny_dinov2.pth" and record["feature_dim"] == 64
    assert "bicubic" in record["preprocessing"]
    assert result["ref_stats_dinov2"] == "computed"


def test_save_ref_from_a_folder_is_used_and_cached(tmp_path, capsys, weights, no_downloads):
    samples, _, _, _ = write_batches(tmp_path)
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        (tmp_path / "real" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "real" / c / f"{i}.png")
    out = str(tmp_path / "real_ref.npz")
    made = run_eval(capsys, "--save-ref", out, str(tmp_path / "real"), "--features", "dinov2", "--dinov2", weights,
                    "--image-size", "32")
    assert made["features"] == {"dinov2": "computed"} and made["image_shape"] == [32, 32, 3]
    with np.load(out) as z:
        images, labels, feats = z["arr_0"], z["arr_1"], z[FEATURES_KEY]
        mu, sigma, record = z[MU_KEY], z[SIGMA_KEY], json.loads(str(z[RECORD_KEY]))
    assert images.shape == (6, 32, 32, 3) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert (torch.from_numpy(feats) - edm2_features(weights, images)).abs().max() <= 1e-5 * np.abs(feats).max()
    np.testing.assert_allclose(mu, feature_stats(torch.from_numpy(feats)).mu, rtol=0, atol=1e-12)
    assert record["weights"] == "tiny_dinov2.pth" and sigma.shape == (64, 64)

    stored = run_eval(capsys, samples, out, "--features", "dinov2", "--dinov2", weights)
    save_samples(str(tmp_path / "copy.npz"), images)  # the same images without stored features
    computed = run_eval(capsys, samples, str(tmp_path / "copy.npz"), "--features", "dinov2", "--dinov2", weights)
    assert stored["ref_stats_dinov2"] == "stored" and computed["ref_stats_dinov2"] == "computed"
    assert stored["fd_dinov2"] == pytest.approx(computed["fd_dinov2"], rel=1e-6)
    assert stored["precision_dinov2"] == computed["precision_dinov2"]

    flat = tmp_path / "real" / "a"  # a flat folder: no labels
    made = run_eval(capsys, "--save-ref", str(tmp_path / "flat.npz"), str(flat), "--features", "dinov2",
                    "--dinov2", weights, "--image-size", "32")
    with np.load(tmp_path / "flat.npz") as z:
        assert np.array_equal(z["arr_0"], images[:3]) and "arr_1" not in z.files

    before = Path(out).stat().st_mtime_ns
    again = run_eval(capsys, "--save-ref", out, str(tmp_path / "real"), "--features", "dinov2", "--dinov2", weights)
    assert again["features"] == {"dinov2": "cached"} and Path(out).stat().st_mtime_ns == before


def test_save_ref_keeps_stored_inception_stats_and_refuses_mismatches(tmp_path, capsys, weights, no_downloads):
    _, ref, _, r_img = write_batches(tmp_path)
    d = 2048  # ADM-style statistics stored in the source: kept as they are, no Inception run
    adm = {"arr_0": r_img, "mu": np.arange(d, dtype=np.float64), "sigma": np.eye(d), "mu_s": np.zeros(2023),
           "sigma_s": np.eye(2023) * 2}
    np.savez(tmp_path / "adm.npz", **adm)
    out = str(tmp_path / "both.npz")
    made = run_eval(capsys, "--save-ref", out, str(tmp_path / "adm.npz"), "--features", "inception,dinov2",
                    "--dinov2", weights)
    assert made["features"] == {"inception": "stored", "dinov2": "computed"}
    with np.load(out) as z:
        for key in ("mu", "sigma", "mu_s", "sigma_s"):
            assert np.array_equal(z[key], adm[key])

    other = tmp_path / "other.pth"  # another network: the stored features are refused, naming both
    torch.save(tiny_state_dict("reg"), other)
    assert main(["eval", ref, out, "--features", "dinov2", "--dinov2", str(other), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "made by" in err and "other.pth" in err and "tiny_dinov2.pth" in err and "\n" not in err
    cases = [  # one line each, nothing written
        (["--save-ref", str(tmp_path / "x.npz"), ref, "--image-size", "8", "--dinov2", weights], "--image-size 8"),
        ([ref, ref, "--features", "dinov2,clip"], "--features dinov2,clip"),
        ([ref, ref, "--features", "dinov2", "--dinov2", "dinov2_vitx14"], "--dinov2 dinov2_vitx14"),
        ([ref, ref, "--features", "dinov2"], "dinov2_vitl14_pretrain.pth is not in the cache"),
        (["--save-ref", out, ref, "--features", "dinov2", "--dinov2", str(other)], "made by"),
    ]
    for argv, message in cases:
        assert main(["eval", *argv, "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    assert not (tmp_path / "x.npz").exists()


def test_released_dinov2_names_are_the_official_ones_and_checked(tmp_path, monkeypatch, weights):
    with np.load(FIXTURE) as f:
        official = set(json.loads(str(f["hub_layouts"])))  # dinov2_vit{s,b,l,g}14[_reg4]
    assert {n for n, e in hub.RELEASED.items() if e.kind == "dinov2"} == {f"{n}_pretrain.pth" for n in official}
    check_released(Path(weights))  # any size without a name
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / hub.DINOV2_NAME).write_bytes(Path(weights).read_bytes())  # a DINOv2, but not ViT-L/14
    monkeypatch.setenv("DITLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DITLAB_MIRROR", mirror.as_uri())
    monkeypatch.delenv("DITLAB_OFFLINE", raising=False)
    with pytest.raises(UserError, match="not dinov2_vitl14.*removed"):
        hub.fetch(hub.DINOV2_NAME, progress=False)
    assert not (tmp_path / "home" / hub.DINOV2_NAME).exists()


@pytest.mark.gpu
def test_cuda_features_match_cpu(weights):
    """The CUDA path (TF32 off as ditlab eval runs, SDPA's CUDA kernels) gives the CPU's features."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from ditlab.evaluation.evaluate import _full_fp32
    from ditlab.evaluation.fd_dinov2 import dinov2_batch

    images = np.random.default_rng(2).integers(0, 256, (4, 256, 256, 3), dtype=np.uint8)
    cpu = dinov2_batch(load_dinov2(weights), images)
    with _full_fp32():
        gpu = dinov2_batch(load_dinov2(weights, "cuda"), images).cpu()
    assert (gpu - cpu).abs().max() <= 1e-4 * cpu.abs().max()
