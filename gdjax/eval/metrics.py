"""Metrics of generated samples and of classifiers, as pure float64 numpy functions.

- `frechet_distance` / `feature_statistics`: the Fréchet distance between two Gaussians
  fitted to feature sets (FID's formula; here it runs on whatever features it is given).
- `kid`: the kernel distance of Bińkowski et al., the unbiased MMD² with the cubic
  polynomial kernel averaged over random subsets, as torchmetrics computes it.
- `class_frequencies`, `kld`, `ard`: the class-balance metrics of REFERENCE §7.
- `accuracy`, `forgetting`: the classifier ("solver") metrics of REFERENCE §6.

Nothing here touches JAX, so these run on host arrays and are easy to check by hand.
"""

from __future__ import annotations

import logging
import warnings
from typing import Sequence

import numpy as np
import scipy.linalg

log = logging.getLogger(__name__)

# Added to both distributions before the KL divergence, as the PyTorch baseline does.
KLD_EPS = 1e-8


# ----------------------------------------------------------------------------- Fréchet distance

def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) of features [N, D], in float64 (covariance over N - 1)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6) -> float:
    """|mu1 - mu2|² + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^½), in float64.

    When the product is singular (fewer samples than feature dimensions) its square root
    can come out non-finite; then, as in the usual FID code, `eps` is added to both
    diagonals first. Rounding leaves a tiny imaginary part on the root, which is dropped.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"shapes disagree: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    with warnings.catch_warnings():
        # A singular product is expected with fewer samples than dimensions; what matters
        # is whether its root came out finite, checked below.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        log.warning("Fréchet distance: singular covariance product; adding %g to the diagonals",
                    eps)
        offset = np.eye(len(mu1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            log.warning("Fréchet distance: dropping an imaginary part of up to %g", imag)
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# ----------------------------------------------------------------------------- kernel distance

def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(x·y / D + 1)³, the kernel of KID (degree 3, gamma 1/D, coefficient 1)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _unbiased_mmd2(real: np.ndarray, fake: np.ndarray) -> float:
    m = len(real)
    k_rr, k_ff = _polynomial_kernel(real, real), _polynomial_kernel(fake, fake)
    k_rf = _polynomial_kernel(real, fake)
    # The unbiased estimator leaves the diagonal (each point with itself) out.
    within = (k_rr.sum() - np.trace(k_rr) + k_ff.sum() - np.trace(k_ff)) / (m * (m - 1))
    return float(within - 2.0 * k_rf.sum() / (m * m))


def kid(features_a, features_b, *, subsets: int = 100, subset_size: int = 1000,
        seed: int | np.random.Generator = 0) -> tuple[float, float]:
    """(mean, std) over `subsets` random subsets of the unbiased polynomial-kernel MMD².

    Each subset draws `subset_size` rows without replacement from each set (capped at the
    smaller set's size, which must be >= 2); the std is the population std (ddof 0), as in
    torchmetrics' KernelInceptionDistance. Deterministic given `seed` (an int, or a numpy
    Generator such as a named stream of gdjax/rng.py).
    """
    a = np.asarray(features_a, np.float64)
    b = np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be [N, D] with the same D, got {a.shape} and {b.shape}")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 rows in each set, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        pick_a = rng.permutation(len(a))[:m]
        pick_b = rng.permutation(len(b))[:m]
        values.append(_unbiased_mmd2(a[pick_a], b[pick_b]))
    return float(np.mean(values)), float(np.std(values))


# ----------------------------------------------------------------------------- class balance

def class_frequencies(labels, num_classes: int) -> np.ndarray:
    """Fraction of `labels` (ints in [0, num_classes)) in each class: float64 [num_classes]."""
    labels = np.asarray(labels).reshape(-1)
    if len(labels) == 0:
        raise ValueError("class_frequencies of an empty label set")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, "
                         f"{labels.max()}]")
    return np.bincount(labels, minlength=num_classes).astype(np.float64) / len(labels)


def kld(true_freq, gen_freq) -> float:
    """KL(true || generated) = sum_c (t_c + 1e-8) log((t_c + 1e-8) / (g_c + 1e-8)).

    The 1e-8 is added to both and the sums are not renormalised, exactly as the baseline's
    `KLDivLoss(log(g + 1e-8), t + 1e-8)`; an empty generated class costs t_c log(t_c / 1e-8).
    """
    t = np.asarray(true_freq, np.float64) + KLD_EPS
    g = np.asarray(gen_freq, np.float64) + KLD_EPS
    return float(np.sum(t * np.log(t / g)))


def ard(true_freq, gen_freq) -> float:
    """Absolute ratio difference 0.5 * sum_c |t_c - g_c| (total variation, in [0, 1])."""
    diff = np.asarray(true_freq, np.float64) - np.asarray(gen_freq, np.float64)
    return float(0.5 * np.abs(diff).sum())


# ----------------------------------------------------------------------------- classifiers

def accuracy(predictions, labels) -> float:
    """Fraction of correct predictions; `predictions` are class ids [N] or logits [N, C]."""
    predictions = np.asarray(predictions)
    if predictions.ndim == 2:
        predictions = predictions.argmax(axis=-1)
    labels = np.asarray(labels)
    if predictions.shape != labels.shape or len(labels) == 0:
        raise ValueError(f"need matching non-empty shapes, got {predictions.shape} and "
                         f"{labels.shape}")
    return float(np.mean(predictions == labels))


def forgetting(acc_matrix) -> float:
    """Average forgetting after the last experience, as avalanche's stream forgetting gives it.

    `acc_matrix[i, j]` is the accuracy on experience j's test data after training experience
    i (T x T; entries with i < j are ignored). For each j < T - 1 the forgetting is the
    accuracy right after learning j, acc[j, j], minus the final accuracy acc[T - 1, j]; the
    result is their mean (0.0 when T == 1).
    """
    acc = np.asarray(acc_matrix, np.float64)
    if acc.ndim != 2 or acc.shape[0] != acc.shape[1] or acc.shape[0] == 0:
        raise ValueError(f"acc_matrix must be square [T, T], got shape {acc.shape}")
    last = acc.shape[0] - 1
    if last == 0:
        return 0.0
    return float(np.mean([acc[j, j] - acc[last, j] for j in range(last)]))


def trapezoid_auc(x: Sequence[float], y: Sequence[float]) -> float:
    """The area under the piecewise-linear curve through (x_i, y_i), x increasing: the
    trapezoid rule, as the authors' AUCs
    (FID over generation steps 2, 5, 10, 20; FID over experiences in their report)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2 or np.any(np.diff(x) <= 0):
        raise ValueError(f"the AUC needs two or more increasing x values, one y each; got "
                         f"x={x.tolist()}, y={y.tolist()}")
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))
