"""The judge of the bundled digits: a small classifier trained on the real training digits, whose
accuracy on samples says whether they show the requested class, and whose hidden layer is the
feature space of a Frechet distance to real digits (what FID is to ImageNet, for 8x8 digits).
`ditlab demo` and the digits studies judge their samples with it."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ditlab.data.digits import DIGITS_SIZE, load_digits_arrays


class DigitsJudge:
    """A small MLP classifier trained on the real training digits; its hidden layer is the
    feature space of the Frechet distance."""

    def __init__(self, seed: int = 0):
        from sklearn.neural_network import MLPClassifier

        self.train_images, labels = load_digits_arrays("train")  # (1500, 1, 8, 8), also the real reference
        self.clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=500, random_state=seed)
        self.clf.fit(self._flat(self.train_images), labels.numpy())

    @staticmethod
    def _flat(images: torch.Tensor) -> np.ndarray:
        """(N, 1, S, S) in [-1, 1] -> (N, 64) at the native 8x8 resolution."""
        images = images.float().clamp(-1, 1)
        if images.shape[-1] != DIGITS_SIZE:
            images = F.adaptive_avg_pool2d(images, DIGITS_SIZE)
        return images.reshape(images.shape[0], -1).numpy().astype(np.float64)  # (N, 64)

    def predict(self, images: torch.Tensor) -> np.ndarray:
        return self.clf.predict(self._flat(images))

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.predict(images) == labels.numpy()).mean())

    def features(self, images: torch.Tensor) -> np.ndarray:
        """Hidden-layer activations (N, 128)."""
        x = self._flat(images)
        return np.maximum(x @ self.clf.coefs_[0] + self.clf.intercepts_[0], 0.0)

    def diversity(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Mean over classes of the mean pairwise pixel distance between images of that class."""
        flat = torch.from_numpy(self._flat(images))
        per_class = [torch.pdist(flat[labels == c]).mean().item() for c in labels.unique().tolist()
                     if int((labels == c).sum()) > 1]
        return float(np.mean(per_class))

    def frechet(self, a: torch.Tensor, b: torch.Tensor) -> float:
        from ditlab.evaluation.metrics import feature_stats, frechet_distance

        sa, sb = feature_stats(self.features(a)), feature_stats(self.features(b))
        return float(frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma))
