"""The demo's judge: a classifier trained on real digits scores samples."""

import numpy as np
import pytest
import torch

from ditlab.data.digits import load_digits_arrays, read_digits
from ditlab.demo import DigitsJudge, summary_lines


@pytest.fixture(scope="module")
def judge():
    return DigitsJudge()


def test_real_digits_score_high_and_noise_scores_chance(judge):
    real, labels = load_digits_arrays("test")
    assert judge.accuracy(real, labels) > 0.9
    noise = torch.rand(real.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert judge.accuracy(noise, labels) < 0.25  # 10 classes: chance is 0.1
    # Upsampled digits are judged at the native 8x8 resolution.
    big, big_labels = load_digits_arrays("test", 16)
    assert judge.accuracy(big, big_labels) > 0.85


def test_frechet_distance_separates_real_from_noise(judge):
    train, _ = load_digits_arrays("train")
    test, test_labels = load_digits_arrays("test")
    noise = torch.rand(test.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    real_vs_real = judge.frechet(train[:297], test)
    assert judge.frechet(test, test) < 1e-6
    assert judge.frechet(noise, test) > 10 * real_vs_real
    # One image repeated per class has no within-class variety.
    collapsed = torch.stack([test[test_labels == c][0] for c in test_labels.tolist()])
    assert judge.diversity(collapsed, test_labels) == 0.0
    assert judge.diversity(test, test_labels) > 1.0


def test_features_are_the_hidden_layer(judge):
    test, _ = load_digits_arrays("test")
    feats = judge.features(test[:5])
    x = test[:5].reshape(5, -1).numpy().astype(np.float64)
    logits = feats @ judge.clf.coefs_[1] + judge.clf.intercepts_[1]
    assert np.allclose(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), judge.clf.predict_proba(x))


def test_summary_lines():
    report = {"train": {"steps": 10, "seconds": 5.0, "images_per_sec": 256.0},
              "classifier_accuracy_on_held_out_real": 0.98, "real_vs_real_frechet_distance": 2.5,
              "samplers": {"ddpm-250": {"class_accuracy": 0.95, "frechet_distance": 7.0,
                                        "within_class_diversity": 0.9, "images_per_sec": 3.0}}}
    lines = summary_lines(report, "out")
    assert "ddpm-250: class accuracy 0.950" in lines[2] and lines[-1].startswith("wrote out/samples.png")


def test_digits_are_scikit_learns_exactly():
    # read_digits reads scikit-learn's file without importing scikit-learn: the same arrays, bit for bit.
    from sklearn.datasets import load_digits

    images, labels = read_digits()
    bunch = load_digits()
    assert images.dtype == bunch.images.dtype and np.array_equal(images, bunch.images)
    assert labels.dtype == np.int64 and np.array_equal(labels, bunch.target)
