"""Tests of gdjax/guidance.py: classifier-free guidance at scale 1 is the conditional
prediction, at 0 the unconditional (null-label) one, in between and beyond the formula
eps_null + s * (eps_label - eps_null), checked against the model's predictions computed
apart; and inside the scanned DDIM reverse process it gives the same samples as a float64
numpy loop over those predictions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdjax import ddim, guidance, unet
from tests.test_ddim import SCHEDULE, T, ref_grid, ref_step

CONFIG = unet.get_unet_config("tiny", num_class_embeds=4)  # 3 classes and a null label
NULL = 3


@pytest.fixture(scope="module")
def model():
    params = unet.init_params(CONFIG, jax.random.key(0))
    apply = jax.jit(lambda p, x, t, y: unet.UNet(CONFIG).apply({"params": p}, x, t, y))
    return params, apply


def test_guidance_scales(model):
    params, apply = model
    x = jax.random.normal(jax.random.key(1), (3, CONFIG.sample_size, CONFIG.sample_size,
                                              CONFIG.in_channels))
    t, labels = jnp.array([10, 500, 999]), jnp.array([0, 1, 2])
    cond = np.asarray(apply(params, x, t, labels), np.float64)
    uncond = np.asarray(apply(params, x, t, jnp.full(3, NULL)), np.float64)
    assert np.abs(cond - uncond).max() > 1e-3  # the label matters
    for scale in (0.0, 0.5, 1.0, 3.0):
        got = np.asarray(guidance.guided_denoise(apply, params, labels, NULL, scale)(x, t))
        np.testing.assert_allclose(got, uncond + scale * (cond - uncond), rtol=1e-4,
                                   atol=1e-5, err_msg=f"scale {scale}")


def test_guided_reverse_process_against_a_float64_loop(model):
    """DDIM (eta 0, 4 steps) over the guided predictions, as REFERENCE §2's float64 numpy
    step (tests/test_ddim.py) applies it to the same predictions, row by row."""
    params, apply = model
    x0 = jax.random.normal(jax.random.key(2), (2, CONFIG.sample_size, CONFIG.sample_size,
                                               CONFIG.in_channels))
    labels, scale, steps = jnp.array([2, 0]), 2.0, 4
    denoise = guidance.guided_denoise(apply, params, labels, NULL, scale)
    got = np.asarray(ddim.reverse_process(denoise, SCHEDULE, x0, num_steps=steps))
    k = np.zeros(2, np.int64)
    grid = ref_grid(steps, k)
    x = np.asarray(x0, np.float64)
    for i in range(steps):
        t = grid[i]
        eps = np.asarray(denoise(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.int32)),
                         np.float64)
        x = ref_step(x, eps, t, t - (T - k) // steps, 0.0, None)
    np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)
