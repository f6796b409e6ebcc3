"""FID, IS, precision/recall and ADM's .npz layout, each against an independent computation."""

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import scipy.stats
import torch
from sklearn.neighbors import NearestNeighbors

from ditlab.evaluation import (
    FeatureStats,
    NpzImages,
    feature_stats,
    frechet_distance,
    inception_score,
    load_stats,
    manifold_radii,
    precision_recall,
    save_reference,
    save_samples,
)
from ditlab.evaluation.inception import POOL_DIM, SPATIAL_DIM


def _scipy_frechet(mu1, s1, mu2, s2):
    """The TTUR / ADM route: scipy's sqrtm of S1 S2."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _gaussian_samples(rng, n, d):
    a = rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ a + rng.standard_normal(d)


def test_frechet_distance_matches_scipy_sqrtm_route():
    rng = np.random.default_rng(0)
    x, y = _gaussian_samples(rng, 400, 30), _gaussian_samples(rng, 300, 30) * 1.3
    mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_scipy_frechet(mu1, s1, mu2, s2), rel=1e-9)
    assert ours == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)  # symmetric
    assert ours > 1.0


def test_frechet_distance_is_zero_for_identical_statistics():
    rng = np.random.default_rng(1)
    for n in (500, 10):  # full rank and rank-deficient (10 samples in 40 dims)
        x = _gaussian_samples(rng, n, 40)
        mu, sigma = x.mean(0), np.cov(x, rowvar=False)
        assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-10 * np.trace(sigma)


def test_frechet_distance_rank_deficient_matches_nuclear_norm():
    # 10 samples in 50 dims: both covariances have rank 9. With S1 = A A^T and S2 = B B^T,
    # tr((S1 S2)^(1/2)) is the nuclear norm of A^T B, computed from the samples directly.
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((10, 50)), rng.standard_normal((10, 50)) * 2 + 0.5
    a = (x - x.mean(0)).T / np.sqrt(9)  # (50, 10): S1 = a a^T
    b = (y - y.mean(0)).T / np.sqrt(9)
    s1, s2 = a @ a.T, b @ b.T
    assert np.allclose(s1, np.cov(x, rowvar=False)) and np.linalg.matrix_rank(s1) == 9
    nuclear = np.linalg.svd(a.T @ b, compute_uv=False).sum()
    expected = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * nuclear
    ours = frechet_distance(x.mean(0), s1, y.mean(0), s2)
    assert np.isfinite(ours) and ours == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats_match_numpy_in_chunks():
    x = torch.from_numpy(_gaussian_samples(np.random.default_rng(3), 37, 6)).float()
    stats = feature_stats(x, chunk=5)
    ref = x.double().numpy()
    assert stats.mu.dtype == np.float64 and stats.sigma.dtype == np.float64
    np.testing.assert_allclose(stats.mu, ref.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(ref, rowvar=False), rtol=1e-12, atol=1e-12)


def _is_by_entropies(logits, split):
    # exp(E_x KL(p(y|x) || p(y))) = exp(H(p(y)) - E_x H(p(y|x))), per split, then averaged.
    scores = []
    for i in range(0, len(logits), split):
        p = scipy.special.softmax(logits[i : i + split], axis=1)
        scores.append(np.exp(scipy.stats.entropy(p.mean(0)) - scipy.stats.entropy(p, axis=1).mean()))
    return float(np.mean(scores))


def test_inception_score_matches_entropy_formula_with_splits_in_file_order():
    logits = np.random.default_rng(4).standard_normal((23, 11)) * 3
    for split in (5000, 10, 7):  # one split; 10 + 10 + 3; 7 + 7 + 7 + 2
        assert inception_score(torch.from_numpy(logits), split) == pytest.approx(_is_by_entropies(logits, split), 1e-12)
    # The splits follow file order: moving rows across splits changes the score.
    shuffled = logits[np.random.default_rng(5).permutation(23)]
    assert inception_score(shuffled, 10) != pytest.approx(inception_score(logits, 10), rel=1e-6)


def test_inception_score_limits():
    assert inception_score(np.zeros((8, 1008))) == pytest.approx(1.0, abs=1e-12)  # one uniform prediction
    confident = np.full((12, 6), -1e4)  # float32 softmax would underflow to exact zeros here
    confident[np.arange(12), np.arange(12) % 6] = 1e4
    assert inception_score(confident) == pytest.approx(6.0, rel=1e-12)  # 6 equally used, certain classes


def test_manifold_radii_are_kth_neighbour_distances_without_self():
    x = np.random.default_rng(6).standard_normal((29, 5)).astype(np.float32)
    dist, _ = NearestNeighbors(n_neighbors=4).fit(x).kneighbors(x)  # column 0 is the point itself
    ours = manifold_radii(torch.from_numpy(x), k=3, batch=7)  # blocks of 7 x 7
    np.testing.assert_allclose(ours.numpy(), dist[:, 3] ** 2, rtol=1e-5)


def _brute_precision_recall(ref, samples, k):
    def radii(x):
        return np.sort(np.linalg.norm(x[:, None] - x[None], axis=2), axis=1)[:, k]

    d = np.linalg.norm(ref[:, None] - samples[None], axis=2)  # (N, M)
    precision = (d <= radii(ref)[:, None]).any(0).mean()
    recall = (d <= radii(samples)[None, :]).any(1).mean()
    return precision, recall


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(7)
    ref = rng.standard_normal((40, 8)).astype(np.float32)
    samples = (rng.standard_normal((33, 8)) * 1.5 + 0.7).astype(np.float32)
    expected = _brute_precision_recall(ref.astype(np.float64), samples.astype(np.float64), 3)
    ours = precision_recall(torch.from_numpy(ref), torch.from_numpy(samples), k=3, batch=9)
    assert ours == pytest.approx(expected, abs=1e-12)
    assert 0.0 < ours[0] < 1.0 and 0.0 < ours[1] < 1.0


def test_precision_recall_mode_collapse():
    # Reference: 10 well separated modes of 20 points. Samples: all near the points of one mode.
    rng = np.random.default_rng(8)
    centres = rng.standard_normal((10, 16)) * 100
    ref = (centres.repeat(20, 0) + rng.standard_normal((200, 16))).astype(np.float32)
    samples = (ref[:20] + rng.standard_normal((20, 16)) * 1e-3).astype(np.float32)
    precision, recall = precision_recall(torch.from_numpy(ref), torch.from_numpy(samples), batch=64)
    assert precision == 1.0  # every sample is realistic
    assert recall == pytest.approx(0.1, abs=1e-12)  # only one mode in ten is covered


def _images(n, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_samples_npz_round_trip_in_adm_layout(tmp_path):
    images, labels = _images(11), np.arange(11) % 4
    path = str(tmp_path / "samples.npz")
    save_samples(path, images, labels)
    with np.load(path) as z:  # exactly ADM's keys
        assert sorted(z.files) == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(z["arr_1"], labels)
    reader = NpzImages(path)
    assert (reader.num_images, reader.shape) == (11, (8, 8, 3))
    batches = list(reader.batches(4))
    assert [len(b) for b in batches] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    assert [p.name for p in tmp_path.iterdir()] == ["samples.npz"]  # no temp file left behind


def test_reads_plain_and_compressed_npz(tmp_path):
    images = _images(5)
    for name, save in (("plain.npz", np.savez), ("small.npz", np.savez_compressed)):
        save(tmp_path / name, arr_0=images)
        np.testing.assert_array_equal(np.concatenate(list(NpzImages(str(tmp_path / name)).batches(2))), images)


def test_reference_npz_round_trip(tmp_path):
    rng = np.random.default_rng(9)

    def cov(d: int) -> np.ndarray:  # a valid covariance: symmetric positive semi-definite
        a = rng.standard_normal((d, 64))
        return a @ a.T / 64

    pool = FeatureStats(rng.standard_normal(POOL_DIM), cov(POOL_DIM))
    spatial = FeatureStats(rng.standard_normal(SPATIAL_DIM), cov(SPATIAL_DIM))
    path = str(tmp_path / "ref.npz")
    save_reference(path, _images(3), pool, spatial)
    with np.load(path) as z:
        assert sorted(z.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
    stats = load_stats(path)
    for got, want in ((stats["pool"], pool), (stats["spatial"], spatial)):
        np.testing.assert_array_equal(got.mu, want.mu)
        np.testing.assert_array_equal(got.sigma, want.sigma)
    save_samples(str(tmp_path / "s.npz"), _images(3))
    assert load_stats(str(tmp_path / "s.npz")) is None


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"arr_0": np.zeros((2, 8, 8, 3), np.float32)}, "float32, expected uint8"),
        ({"arr_0": np.zeros((2, 3, 8, 8), np.uint8)}, r"shape \(2, 3, 8, 8\)"),
        ({"images": np.zeros((2, 8, 8, 3), np.uint8)}, "no arr_0"),
    ],
)
def test_bad_image_batches_name_the_file(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message) as e:
        NpzImages(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_bad_files_and_stats_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        NpzImages(str(tmp_path / "missing.npz"))
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="text.npz: not an .npz archive"):
        NpzImages(str(tmp_path / "text.npz"))
    np.savez(tmp_path / "half.npz", arr_0=_images(2), mu=np.zeros(POOL_DIM), sigma=np.eye(POOL_DIM))
    with pytest.raises(ValueError, match="half.npz: has mu, sigma but not mu_s, sigma_s"):
        load_stats(str(tmp_path / "half.npz"))
    small = {"mu": np.zeros(3), "sigma": np.eye(3), "mu_s": np.zeros(3), "sigma_s": np.eye(3)}
    np.savez(tmp_path / "dims.npz", arr_0=_images(2), **small)
    with pytest.raises(ValueError, match=r"dims.npz: mu \(3,\) / sigma \(3, 3\), expected \(2048,\)"):
        load_stats(str(tmp_path / "dims.npz"))
    with pytest.raises(ValueError, match="uint8"):
        save_samples(str(tmp_path / "x.npz"), np.zeros((2, 8, 8, 3), np.float32))
    assert not (tmp_path / "x.npz").exists()
