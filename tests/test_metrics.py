"""Tests of gdjax.eval.metrics against hand-worked values and independent numpy references."""

import math

import numpy as np
import pytest
import scipy.linalg

from gdjax.eval import metrics

EPS = metrics.KLD_EPS


# ----------------------------------------------------------------------------- Fréchet distance

def _random_covariance(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_of_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=6), _random_covariance(rng, 6)
    assert metrics.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("m1,s1,m2,s2", [(0.0, 1.0, 0.0, 1.0), (1.5, 2.0, -0.5, 0.5),
                                         (3.0, 0.1, 3.0, 4.0)])
def test_frechet_of_1d_gaussians(m1, s1, m2, s2):
    # In 1-D, tr(s1² + s2² - 2 sqrt(s1² s2²)) = (s1 - s2)² for standard deviations s1, s2.
    expected = (m1 - m2) ** 2 + (s1 - s2) ** 2
    got = metrics.frechet_distance([m1], [[s1 ** 2]], [m2], [[s2 ** 2]])
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_frechet_matches_symmetric_formula_on_random_features():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 8))
    b = rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8)) * 0.5 + 0.3
    mu1, s1 = metrics.feature_statistics(a)
    mu2, s2 = metrics.feature_statistics(b)
    np.testing.assert_allclose(mu1, a.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s1, (a - mu1).T @ (a - mu1) / (len(a) - 1), rtol=1e-12)
    # Independent route: tr((S1 S2)^½) = tr((S1^½ S2 S1^½)^½), a symmetric PSD root via eigh.
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    expected = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def _scipy_frechet(mu1, s1, mu2, s2):
    """|mu1 - mu2|² + tr(S1 + S2 - 2 sqrtm(S1 S2)), in the dtype it is given."""
    diff, root = mu1 - mu2, scipy.linalg.sqrtm(s1 @ s2).real
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(root)


def test_frechet_of_float32_statistics_is_computed_in_float64():
    """float32 features and statistics (as a JAX feature network hands them over) with a
    common offset of 5e3 and a nearly singular covariance (rank 12 + tiny noise, in 16-D):
    the traces (~1.6e5) cancel down to a distance of ~1.6, which float32 cannot resolve."""
    rng = np.random.default_rng(0)
    latent, mix = rng.normal(size=(1000, 12)), rng.normal(size=(12, 16)) * 30
    noise = 0.01 * rng.normal(size=(1000, 16))
    a = (5e3 + latent @ mix + noise).astype(np.float32)
    b = (5e3 + 0.25 + latent @ (mix * 1.002) + noise).astype(np.float32)
    mu_a, s_a = metrics.feature_statistics(a)
    np.testing.assert_allclose(mu_a, a.astype(np.float64).mean(0), rtol=1e-13)
    np.testing.assert_allclose(s_a, np.cov(a.astype(np.float64), rowvar=False), rtol=1e-12)
    stats32 = [np.asarray(s, np.float32)
               for s in (*metrics.feature_statistics(a), *metrics.feature_statistics(b))]
    expected = _scipy_frechet(*(s.astype(np.float64) for s in stats32))
    # |0.25|² * 16 from the means + about (0.002)² * tr(S) from the stretch.
    assert 1.4 < expected < 1.9
    # The same formula in float32 is far off (it even comes out negative here).
    assert abs(_scipy_frechet(*stats32) - expected) > 5.0
    assert metrics.frechet_distance(*stats32) == pytest.approx(expected, rel=1e-9)


def test_frechet_with_fewer_samples_than_dimensions_is_finite():
    rng = np.random.default_rng(2)
    s1 = metrics.feature_statistics(rng.normal(size=(10, 32)))
    s2 = metrics.feature_statistics(rng.normal(size=(12, 32)) + 1.0)
    d = metrics.frechet_distance(*s1, *s2)
    assert np.isfinite(d) and d > 0


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------- KID

def _mmd2_loop(x, y):
    """Unbiased MMD² with k(a, b) = (a·b / d + 1)³, one pair at a time."""
    m, d = len(x), x.shape[1]
    k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / (m * m)


def test_kid_on_whole_sets_matches_a_loop():
    # With subset_size = the set sizes every subset is a permutation of the whole set,
    # and the MMD² does not depend on the order.
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(9, 4)), rng.normal(size=(9, 4)) + 0.5
    mean, std = metrics.kid(a, b, subsets=3, subset_size=9, seed=0)
    assert mean == pytest.approx(_mmd2_loop(a, b), rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_subsets_match_a_loop():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(15, 3)), rng.normal(size=(11, 3)) * 2
    mean, std = metrics.kid(a, b, subsets=4, subset_size=6, seed=7)
    draw = np.random.default_rng(7)  # the subsets as the docstring defines them
    values = []
    for _ in range(4):
        pick_a, pick_b = draw.permutation(15)[:6], draw.permutation(11)[:6]
        values.append(_mmd2_loop(a[pick_a], b[pick_b]))
    assert mean == pytest.approx(np.mean(values), rel=1e-12)
    assert std == pytest.approx(np.std(values), rel=1e-9)


def test_kid_separates_distributions():
    rng = np.random.default_rng(5)
    a, same, shifted = (rng.normal(size=(300, 16)), rng.normal(size=(300, 16)),
                        rng.normal(size=(300, 16)) + 1.0)
    near, _ = metrics.kid(a, same, subsets=20, subset_size=100)
    far, _ = metrics.kid(a, shifted, subsets=20, subset_size=100)
    assert abs(near) < 0.05 < far


# ----------------------------------------------------------------------------- class balance

def test_class_frequencies():
    freq = metrics.class_frequencies([0, 2, 2, 3], 5)
    np.testing.assert_array_equal(freq, [0.25, 0.0, 0.5, 0.25, 0.0])
    with pytest.raises(ValueError):
        metrics.class_frequencies([0, 5], 5)


def test_identical_histograms_score_zero():
    t = metrics.class_frequencies([0, 1, 1, 4, 7, 7, 7], 10)
    assert metrics.kld(t, t) == 0.0
    assert metrics.ard(t, t) == 0.0


def test_skewed_histogram_by_hand():
    # 10 classes; the true set is half class 0, half class 1; the generator gives 80/20.
    t = np.zeros(10)
    t[:2] = 0.5
    g = np.zeros(10)
    g[:2] = [0.8, 0.2]
    # KLD = 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2) + 8 * 1e-8 * ln(1e-8/1e-8)
    #     = 0.5 ln(0.625 * 2.5) = 0.5 ln(1.5625) = ln(1.25) = 0.22314355...
    # (the 1e-8 added to the two non-zero classes moves it by about 1e-8).
    assert metrics.kld(t, g) == pytest.approx(math.log(1.25), abs=1e-7)
    # ARD = 0.5 * (|0.5 - 0.8| + |0.5 - 0.2|) = 0.5 * 0.6 = 0.3
    assert metrics.ard(t, g) == pytest.approx(0.3, abs=1e-15)


def test_kld_of_a_missing_class_uses_the_epsilon():
    # True 50/50, generated all class 0: class 1 costs (0.5 + 1e-8) ln((0.5 + 1e-8) / 1e-8).
    t, g = np.array([0.5, 0.5]), np.array([1.0, 0.0])
    expected = (0.5 + EPS) * math.log((0.5 + EPS) / (1.0 + EPS)) \
        + (0.5 + EPS) * math.log((0.5 + EPS) / EPS)
    assert metrics.kld(t, g) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.5 * math.log(0.25e8), rel=1e-6)  # about 8.51
    assert metrics.ard(t, g) == pytest.approx(0.5)


def test_kld_direction_is_true_against_generated():
    t, g = np.array([0.9, 0.1]), np.array([0.5, 0.5])
    forward = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert metrics.kld(t, g) == pytest.approx(forward, abs=1e-7)
    assert metrics.kld(g, t) != pytest.approx(forward, abs=1e-3)


# ----------------------------------------------------------------------------- classifiers

def test_accuracy_from_ids_and_logits():
    labels = np.array([0, 1, 2, 2])
    assert metrics.accuracy([0, 1, 1, 2], labels) == 0.75
    logits = np.eye(3)[[0, 2, 2, 2]] * 5.0
    assert metrics.accuracy(logits, labels) == 0.75


def test_forgetting_by_hand():
    # acc[i, j]: accuracy on experience j after training experience i. The entry above the
    # diagonal (experience 1 before it was trained) must be ignored.
    # avalanche compares with the accuracy right after learning each experience (the
    # diagonal), not with the best one: experience 0 improved to 0.97 after experience 1.
    acc = np.array([[0.90, 1.00, 0.00],
                    [0.97, 0.95, 0.00],
                    [0.50, 0.60, 0.99]])
    # experience 0: 0.90 - 0.50 = 0.40 (not 0.97 - 0.50); experience 1: 0.95 - 0.60 = 0.35
    assert metrics.forgetting(acc) == pytest.approx((0.40 + 0.35) / 2)
    assert metrics.forgetting([[0.8]]) == 0.0


def test_forgetting_can_be_negative_when_accuracy_improves():
    acc = np.array([[0.5, 0.0], [0.7, 0.9]])
    assert metrics.forgetting(acc) == pytest.approx(-0.2)
