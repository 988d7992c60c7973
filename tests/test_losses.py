"""The eps criteria and the replay weighting against float64 numpy and hand-worked values."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gdjax import losses
from gdjax.schedule import make_schedule
from tests.test_schedule import reference_alphas_cumprod

T = np.array([0, 10, 500, 998, 999])  # 999: SNR 0 under zero terminal SNR


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(5, 4, 4, 1)).astype(np.float32) * 1.5
    target = rng.normal(size=(5, 4, 4, 1)).astype(np.float32)
    return pred, target


def reference_snr():
    """SNR in float64 from the schedule's float32 alpha_bar (itself checked against float64
    in test_schedule.py: at t = 0, 1 - alpha_bar = 1e-4 carries float32's rounding)."""
    a = np.asarray(make_schedule().alphas_cumprod, np.float64)[T]
    np.testing.assert_allclose(a, reference_alphas_cumprod(rescale=True)[T], atol=1e-6)
    return a / (1.0 - a)


def loss(name, pred, target):
    return float(losses.criterion(name, jnp.asarray(pred), jnp.asarray(target), jnp.asarray(T),
                                  make_schedule()))


def test_mse_and_smooth_l1_match_float64_and_torch(rows):
    pred, target = rows
    d = pred.astype(np.float64) - target
    assert loss("mse", pred, target) == pytest.approx(np.mean(d**2), rel=1e-6)
    huber = np.where(np.abs(d) < 1.0, 0.5 * d**2, np.abs(d) - 0.5)
    assert np.any(np.abs(d) >= 1.0) and np.any(np.abs(d) < 1.0)  # both branches are used
    assert loss("smooth_l1", pred, target) == pytest.approx(np.mean(huber), rel=1e-6)
    want = torch.nn.functional.smooth_l1_loss(torch.from_numpy(pred), torch.from_numpy(target))
    assert loss("smooth_l1", pred, target) == pytest.approx(float(want), rel=1e-6)


def test_smooth_l1_by_hand():
    # |d| = 0.5 -> 0.125; |d| = 3 -> 2.5; mean 1.3125.
    pred = np.array([[0.5], [-3.0]], np.float32)
    got = losses.criterion("smooth_l1", jnp.asarray(pred), jnp.zeros((2, 1)), jnp.array([0, 0]),
                           make_schedule())
    assert float(got) == pytest.approx(1.3125, abs=1e-7)


def test_min_snr_weights_per_row(rows):
    pred, target = rows
    snr = reference_snr()
    assert snr[-1] == 0.0 and snr[0] > 5.0 > snr[2]  # the clip and the SNR-0 row both occur
    weights = np.where(snr > 0, np.minimum(snr, 5.0) / np.where(snr > 0, snr, 1.0), 1.0)
    got = np.asarray(losses.min_snr_weights(make_schedule(), jnp.asarray(T)))
    np.testing.assert_allclose(got, weights, rtol=1e-5)
    row_mse = np.mean((pred.astype(np.float64) - target).reshape(5, -1) ** 2, axis=1)
    assert loss("min_snr", pred, target) == pytest.approx(np.mean(weights * row_mse), rel=1e-5)
    # The baseline's form: mean weight times the batch-mean MSE.
    assert loss("min_snr_reference", pred, target) == pytest.approx(
        np.mean(weights) * np.mean(row_mse), rel=1e-5)
    assert loss("min_snr", pred, target) != pytest.approx(loss("min_snr_reference", pred, target))


def test_replay_weights_and_combination_by_hand():
    for k, (w_data, w_replay) in enumerate([(1.0, 0.0), (0.5, 0.5), (1 / 3, 2 / 3), (0.25, 0.75)]):
        got = losses.replay_weights(jnp.int32(k), True)
        assert (float(got[0]), float(got[1])) == pytest.approx((w_data, w_replay), abs=1e-7)
        # lambda 3: 2 * w_data + 3 * 4 * w_replay
        combined = losses.combine(jnp.float32(2.0), jnp.float32(4.0), experience=jnp.int32(k),
                                  lambd=3.0, weight_replay_loss=True)
        assert float(combined) == pytest.approx(2 * w_data + 12 * w_replay, rel=1e-6)
    assert float(losses.combine(jnp.float32(2.0), jnp.float32(4.0), experience=jnp.int32(3),
                                lambd=3.0, weight_replay_loss=False)) == pytest.approx(14.0)


def test_unknown_criterion_names_the_choices(rows):
    with pytest.raises(ValueError, match=r"train.criterion='l1' is unknown; use one of"):
        loss("l1", *rows)
