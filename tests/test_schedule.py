"""The noise schedule against a float64 numpy implementation of REFERENCE §1."""

import jax.numpy as jnp
import numpy as np
import pytest

from gdjax import schedule as sched


def reference_alphas_cumprod(rescale=True):
    """Float64 numpy, written from REFERENCE §1."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    if rescale:
        s = np.sqrt(np.cumprod(1.0 - betas))
        s0, s_t = s[0], s[-1]
        s = (s - s_t) * s0 / (s0 - s_t)
        alpha_bar = s**2
        alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
        betas = 1.0 - alphas
    return np.cumprod(1.0 - betas)


def test_zero_terminal_snr_is_exact_and_first_value_kept():
    s = sched.make_schedule()
    ab = np.asarray(s.alphas_cumprod)
    assert ab.dtype == np.float32 and ab.shape == (1000,)
    assert ab[999] == 0.0
    assert ab[0] == pytest.approx(1.0 - 1e-4, abs=1e-7)
    plain = np.asarray(sched.make_schedule(rescale_zero_snr=False).alphas_cumprod)
    assert ab[0] == pytest.approx(plain[0], abs=1e-7)
    assert plain[999] > 1e-5  # without the rescale the terminal SNR is not zero


@pytest.mark.parametrize("rescale", [True, False])
def test_matches_float64_reference(rescale):
    s = sched.make_schedule(rescale_zero_snr=rescale)
    ref = reference_alphas_cumprod(rescale)
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod), ref, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(s.alphas), 1.0 - np.asarray(s.betas), atol=0)
    assert np.all(np.diff(ref) < 0)


def test_cosine_schedule_matches_formula():
    s = sched.make_schedule("cosine", rescale_zero_snr=False)
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    i = np.arange(1000, dtype=np.float64)
    betas = np.minimum(1 - f((i + 1) / 1000) / f(i / 1000), 0.999)
    np.testing.assert_allclose(np.asarray(s.betas), betas, atol=1e-6)
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod), np.cumprod(1 - betas), atol=1e-6)
    assert np.asarray(sched.make_schedule("cosine").alphas_cumprod)[-1] == 0.0


def test_add_noise_per_row_timesteps():
    s = sched.make_schedule()
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (4, 5, 5, 2)).astype(np.float32)
    eps = rng.normal(size=x0.shape).astype(np.float32)
    t = np.array([0, 1, 500, 999])
    out = np.asarray(sched.add_noise(s, jnp.asarray(x0), noise=jnp.asarray(eps), t=jnp.asarray(t)))
    ab = reference_alphas_cumprod()[t][:, None, None, None]
    np.testing.assert_allclose(out, np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps, atol=1e-5)
    np.testing.assert_array_equal(out[3], eps[3])  # zero terminal SNR: pure noise at t=999


@pytest.mark.parametrize("kwargs, field", [
    (dict(beta_schedule="quadratic"), "beta_schedule"),
    (dict(num_train_timesteps=1), "num_train_timesteps"),
    (dict(num_train_timesteps=2**70), "num_train_timesteps=1180591620717411303424 must be"),
    (dict(beta_start=0.03), "beta_start"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        sched.make_schedule(**kwargs)
