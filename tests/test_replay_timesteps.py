"""strategy.replay_timesteps="min_snr": the replay rows' timestep distribution against float64
numpy (the schedule from tests/test_schedule.py's own float64 implementation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdjax import run as run_lib
from gdjax import strategies
from gdjax.schedule import make_schedule
from gdjax.strategies import StrategyConfig
from tests.helpers import tiny_config
from tests.test_schedule import reference_alphas_cumprod

SCHEDULE = make_schedule()
ROWS = 20000


def probs64(t_low, gamma):
    """min(1, gamma / SNR(t)) for t >= t_low, normalised, in float64."""
    abar = reference_alphas_cumprod()
    with np.errstate(divide="ignore"):
        snr = abar / (1 - abar)
        weight = np.minimum(1.0, gamma / snr)
    weight[:t_low] = 0.0
    return weight / weight.sum()


def test_probabilities_equal_float64():
    for t_low, gamma in ((0, 5.0), (300, 1.0), (0, 20.0)):
        got = np.asarray(strategies.replay_timestep_probs(SCHEDULE.alphas_cumprod, t_low, gamma))
        want = probs64(t_low, gamma)
        # the schedule is float32, as the reference's: 1 - abar near t = 0 carries its
        # rounding (relative 1e-4 at t = 5)
        np.testing.assert_allclose(got, want, rtol=5e-4, atol=1e-9)
        np.testing.assert_allclose(got[200:], want[200:], rtol=2e-5)
    p = probs64(0, 5.0)
    # every step with SNR <= 5 equally likely (t = 999, SNR 0, included), the cleanest rarest
    abar = reference_alphas_cumprod()
    noisy = abar / (1 - abar + 1e-300) <= 5.0
    assert noisy[999] and 0 < noisy.sum() < 1000
    np.testing.assert_allclose(p[noisy], p[999])
    assert p[0] < p[999] / 100


def _teacher(params, x, t):
    return params["w"] * x + params["b"] * (t.astype(jnp.float32) / 1000)[:, None, None, None]


def _rows(cfg, key=jax.random.key(3), memory=None):
    params = {"w": jnp.float32(0.5), "b": jnp.float32(-0.2)}
    return jax.jit(lambda k, m: strategies.replay_rows(
        cfg, apply_fn=_teacher, teacher_params=params, schedule=SCHEDULE, rng=k,
        image_shape=(ROWS, 1, 1, 1), memory_x0=m))(key, memory)


@pytest.mark.parametrize("name", [strategies.GAUSSIAN, strategies.FULL_GENERATION,
                                  strategies.PARTIAL_GENERATION, strategies.NO_DISTILLATION])
def test_replay_timesteps_follow_the_rule(name):
    """20,000 replay rows at gamma 0.5: their timesteps' mass in ten bands of 100 steps is
    the float64 distribution's within 0.01 (5 standard errors), none below
    replay_start_timestep; the default stays the reference's uniform draw."""
    cfg = StrategyConfig(name=name, replay_timesteps="min_snr", replay_snr_gamma=0.5,
                         replay_start_timestep=100, teacher_steps=1)
    t = np.asarray(_rows(cfg).t)
    assert t.min() >= 100 and t.max() <= 999
    bands = np.bincount(t // 100, minlength=10) / ROWS
    want = probs64(100, 0.5).reshape(10, 100).sum(axis=1)
    np.testing.assert_allclose(bands, want, atol=0.01)
    flat = np.array([0.0] + [1 / 9] * 9)
    uniform = np.asarray(_rows(StrategyConfig(name=name, replay_start_timestep=100,
                                              teacher_steps=1)).t)
    np.testing.assert_allclose(np.bincount(uniform // 100, minlength=10) / ROWS, flat,
                               atol=0.01)
    assert np.abs(want - flat).max() > 0.05  # the two rules differ by far more than the noise


def test_er_keeps_the_full_uniform_range():
    """ER's memory rows are ordinary training rows: uniform over 0..999 whatever the rule."""
    cfg = StrategyConfig(name=strategies.ER, replay_timesteps="min_snr", replay_snr_gamma=2.0,
                         replay_start_timestep=500)
    t = np.asarray(_rows(cfg, memory=jnp.zeros((ROWS, 1, 1, 1))).t)
    np.testing.assert_allclose(np.bincount(t // 100, minlength=10) / ROWS, [0.1] * 10,
                               atol=0.01)


def test_settings_reach_the_strategy_and_bad_values_are_named():
    c = tiny_config("full_generation_distillation")
    c.strategy.replay_timesteps, c.strategy.replay_snr_gamma = "min_snr", 3.0
    s = run_lib.settings_from_config(c).strategy
    assert (s.replay_timesteps, s.replay_snr_gamma) == ("min_snr", 3.0)
    for key, value, message in (("replay_timesteps", "snr", "strategy.replay_timesteps='snr' "
                                 "is unknown; use one of: uniform, min_snr"),
                                ("replay_snr_gamma", 0.0, "strategy.replay_snr_gamma=0.0")):
        c = tiny_config()
        setattr(c.strategy, key, value)
        with pytest.raises(ValueError, match=message):
            run_lib.settings_from_config(c)
