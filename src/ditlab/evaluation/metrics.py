"""The metrics of ADM's evaluator as pure functions: Frechet distance (FID, sFID), Inception Score
and k-NN manifold precision / recall (Kynkaanniemi et al. 2019).

Statistics and scores are float64. Precision / recall distances and radii are float32, the
dtype ADM stores them in. (ADM's TF graph first forms each distance block in float16 and uses it
when finite, falling back to float32 only on overflow; that rounding, ~5e-4 of the squared
norms, is not reproduced: only a point that close to a ball's boundary can be counted differently.)"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ditlab.errors import UserError

IS_SPLIT_SIZE = 5000  # ADM scores the samples in consecutive splits of 5000, in file order
PR_NEIGHBOURS = 3  # k of the k-NN manifold radii
PR_BATCH = 10_000  # rows and columns of one block of pairwise distances (ADM's block size)


@dataclass(frozen=True)
class FeatureStats:
    """Mean (D,) and covariance (D, D) of a feature set, float64: ADM's `mu`/`sigma` (or `_s`)."""

    mu: np.ndarray
    sigma: np.ndarray


def feature_stats(features: torch.Tensor | np.ndarray, chunk: int = 8192) -> FeatureStats:
    """Mean and unbiased covariance (np.cov's, divisor N - 1) of features (N, D), in float64.

    The covariance is accumulated from centred float64 chunks, so float32 features of 50K images
    never need a float64 copy of the whole set."""
    x = torch.as_tensor(features)
    n = x.shape[0]
    if x.dim() != 2 or n < 2:
        raise UserError(f"need features (N, D) with N >= 2 for a covariance, got {tuple(x.shape)}")
    mu = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for i in range(0, n, chunk):
        mu += x[i : i + chunk].to(torch.float64).sum(0)
    mu /= n
    sigma = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for i in range(0, n, chunk):
        c = x[i : i + chunk].to(torch.float64) - mu  # (B, D)
        sigma += c.T @ c
    sigma /= n - 1
    return FeatureStats(mu.cpu().numpy(), sigma.cpu().numpy())


def _drop_rounding(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a PSD matrix with those under its rounding level (d * eps * the largest) set to
    zero: on a rank-deficient matrix they are noise of either sign, and their square roots (~1e-8 of
    the scale each) would otherwise add up to a visible error, even a negative distance."""
    tol = eigenvalues.shape[0] * torch.finfo(torch.float64).eps * eigenvalues.abs().max().clamp_min(0.0)
    return torch.where(eigenvalues > tol, eigenvalues, torch.zeros_like(eigenvalues))


def _psd_sqrt(sigma: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix (D, D)."""
    w, v = torch.linalg.eigh(sigma)
    return (v * _drop_rounding(w).sqrt()) @ v.T


def frechet_distance(
    mu1: np.ndarray | torch.Tensor,
    sigma1: np.ndarray | torch.Tensor,
    mu2: np.ndarray | torch.Tensor,
    sigma2: np.ndarray | torch.Tensor,
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), mu (D,), sigma (D, D):
    |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64.

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of the symmetric PSD
    matrix S1^(1/2) S2 S1^(1/2) (similar to S1 S2), so it stays real and finite when a covariance
    is rank-deficient (fewer samples than dimensions), where scipy's sqrtm of S1 S2 can fail.
    Computed with torch.linalg on the device of `sigma1` (CPU for numpy arrays)."""
    device = sigma1.device if isinstance(sigma1, torch.Tensor) else None
    mu1, mu2, s1, s2 = (torch.as_tensor(a, dtype=torch.float64, device=device) for a in (mu1, mu2, sigma1, sigma2))
    mu1, mu2, s1, s2 = torch.atleast_1d(mu1), torch.atleast_1d(mu2), torch.atleast_2d(s1), torch.atleast_2d(s2)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise UserError(
            f"statistics do not match: mu {tuple(mu1.shape)} and {tuple(mu2.shape)}, "
            f"sigma {tuple(s1.shape)} and {tuple(s2.shape)}"
        )
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2  # symmetric to the last bit, as eigh assumes
    root1 = _psd_sqrt(s1)
    m = root1 @ s2 @ root1
    tr_covmean = _drop_rounding(torch.linalg.eigvalsh((m + m.T) / 2)).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + s1.trace() + s2.trace() - 2.0 * tr_covmean)


def inception_score(logits: torch.Tensor | np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's Inception Score of logits (N, C): the softmax p(y|x) in float64, then for each
    consecutive split of `split_size` rows (the last may be shorter) exp(mean_x KL(p(y|x) || p(y))),
    and the mean of the split scores. Zero probabilities contribute 0 (0 log 0 = 0)."""
    x = torch.as_tensor(logits).to(torch.float64)
    if x.dim() != 2 or x.shape[0] == 0:
        raise UserError(f"need logits (N, C) with N >= 1, got {tuple(x.shape)}")
    scores = []
    for part in x.split(split_size):
        log_p = torch.log_softmax(part, dim=1)  # (B, C)
        p = log_p.exp()
        log_marginal = torch.log(p.mean(0, keepdim=True))  # (1, C)
        kl = torch.where(p > 0, p * (log_p - log_marginal), torch.zeros_like(p)).sum(1)  # (B,)
        scores.append(torch.exp(kl.mean()).item())
    return float(np.mean(scores))


def pairwise_sq_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (A, B) between rows of u (A, D) and v (B, D), float32, as
    ADM forms them: |u|^2 - 2 u.v + |v|^2, clipped at zero."""
    u, v = u.to(torch.float32), v.to(torch.float32)
    d = (u * u).sum(1, keepdim=True) - 2.0 * (u @ v.T) + (v * v).sum(1).unsqueeze(0)  # (A, B)
    return d.clamp_min_(0.0)


def manifold_radii(features: torch.Tensor, k: int = PR_NEIGHBOURS, batch: int = PR_BATCH) -> torch.Tensor:
    """Squared distance from each row of features (N, D) to its k-th nearest neighbour, the row
    itself excluded: the (k+1)-th smallest distance of its row, self (0) included, as ADM takes it.
    Returns (N,) float32. Blocks of `batch` x `batch` distances keep 50K x 50K in memory."""
    n = features.shape[0]
    if n <= k:
        raise UserError(f"need more than k={k} feature vectors for k-NN radii, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=features.device)
    for i in range(0, n, batch):
        rows = features[i : i + batch]
        best = None  # (R, <= k+1): the smallest distances seen so far, per row
        for j in range(0, n, batch):
            d = pairwise_sq_distances(rows, features[j : j + batch])  # (R, C)
            cand = d if best is None else torch.cat([best, d], 1)
            best = cand.topk(min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii[i : i + batch] = best[:, k]  # topk sorts ascending: column k is the (k+1)-th smallest
    return radii


def precision_recall(
    ref: torch.Tensor, samples: torch.Tensor, k: int = PR_NEIGHBOURS, batch: int = PR_BATCH,
    ref_radii: torch.Tensor | None = None,
) -> tuple[float, float]:
    """Improved precision and recall of samples (M, D) against ref (N, D), as ADM computes them.

    precision: the fraction of samples within the k-NN radius of at least one reference vector;
    recall: the fraction of reference vectors within the k-NN radius of at least one sample.
    A point on a sphere's boundary counts as inside (distance <= radius). `ref_radii` (N,), the
    `manifold_radii(ref, k)` of an earlier call, saves recomputing them for the same reference."""
    if ref.dim() != 2 or samples.dim() != 2 or ref.shape[1] != samples.shape[1]:
        raise UserError(f"features must be (N, D) with the same D, got {tuple(ref.shape)} and {tuple(samples.shape)}")
    ref_radii = manifold_radii(ref, k, batch) if ref_radii is None else ref_radii  # (N,)
    sample_radii = manifold_radii(samples, k, batch)  # (M,)
    ref_covered = torch.zeros(ref.shape[0], dtype=torch.bool, device=ref.device)
    sample_covered = torch.zeros(samples.shape[0], dtype=torch.bool, device=samples.device)
    for i in range(0, ref.shape[0], batch):
        for j in range(0, samples.shape[0], batch):
            d = pairwise_sq_distances(ref[i : i + batch], samples[j : j + batch])  # (R, S)
            sample_covered[j : j + batch] |= (d <= ref_radii[i : i + batch, None]).any(0)
            ref_covered[i : i + batch] |= (d <= sample_radii[None, j : j + batch]).any(1)
    return sample_covered.double().mean().item(), ref_covered.double().mean().item()
