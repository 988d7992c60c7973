"""The DDIM grids, step and reverse process against a float64 numpy loop of REFERENCE §2."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdjax import ddim
from gdjax.schedule import make_schedule

T = 1000
SCHEDULE = make_schedule()
ALPHA_BAR = np.asarray(SCHEDULE.alphas_cumprod, dtype=np.float64)


def model_np(x, t):
    """A simple analytic 'denoiser' both implementations evaluate."""
    return 0.1 * x + 1e-3 * t.reshape((-1,) + (1,) * (x.ndim - 1))


def model_jnp(x, t):
    return 0.1 * x + 1e-3 * t.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)


def ref_grid(n, k):
    """REFERENCE §2 grid for targets k of shape [B] (float64 numpy): int [n, B]."""
    k = np.asarray(k, np.int64)
    ratio = (T - k) / n
    return np.stack([np.round((n - i) * ratio) - 1 + k for i in range(n)]).astype(np.int64)


def ref_step(x, e, t, t_prev, eta, noise, clip=True):
    a_t = ALPHA_BAR[t][:, None, None, None]
    a_prev = np.where(t_prev >= 0, ALPHA_BAR[np.maximum(t_prev, 0)], 1.0)[:, None, None, None]
    x0 = (x - np.sqrt(1 - a_t) * e) / np.sqrt(a_t + 1e-8)
    x0 = np.clip(x0, -1, 1) if clip else x0
    var = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / (a_prev + 1e-8))
    std = eta * np.sqrt(var)
    out = np.sqrt(a_prev) * x0 + np.sqrt(np.clip(1 - a_prev - std**2, 0, 1)) * e
    return out + std * noise if eta > 0 else out


def ref_loop(x, n, k, eta=0.0, noises=None, clip=True):
    x = np.asarray(x, np.float64)
    k = np.broadcast_to(np.asarray(k, np.int64), x.shape[:1])
    grid = ref_grid(n, k)
    for i in range(n):
        t = grid[i]
        t_prev = t - (T - k) // n
        new = ref_step(x, model_np(x, t), t, t_prev, eta, None if noises is None else noises[i],
                       clip)
        keep = (t == grid[i - 1]) if i else np.zeros_like(t, bool)
        x = np.where(keep[:, None, None, None], x, new)
    return x


def test_scalar_grids():
    np.testing.assert_array_equal(ddim.timestep_grid(10, 0), np.arange(999, 98, -100))
    np.testing.assert_array_equal(
        ddim.timestep_grid(10, 10), [999, 900, 801, 702, 603, 504, 405, 306, 207, 108])
    np.testing.assert_array_equal(ddim.timestep_grid(2, 0), [999, 499])
    np.testing.assert_array_equal(ddim.timestep_grid(1000, 0), np.arange(999, -1, -1))


def test_per_sample_table():
    table = ddim.timestep_table(10, [0, 10])
    np.testing.assert_array_equal(table[:, 0], np.arange(999, 98, -100))
    np.testing.assert_array_equal(table[:, 1], [999, 900, 801, 702, 603, 504, 405, 306, 207, 108])
    ks = np.arange(T)
    for n in (2, 3, 7, 10):
        np.testing.assert_array_equal(ddim.timestep_table(n, ks), ref_grid(n, ks))


def test_one_step_matches_reference():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 3, 3, 2)).astype(np.float32)
    e = rng.normal(size=x.shape).astype(np.float32)
    z = rng.normal(size=x.shape).astype(np.float32)
    t = np.array([999, 500, 99, 5])
    t_prev = np.array([899, 400, -1, 0])
    for eta in (0.0, 1.0):
        got = ddim.ddim_step(SCHEDULE, jnp.asarray(x), jnp.asarray(e), t=jnp.asarray(t),
                             t_prev=jnp.asarray(t_prev), eta=eta,
                             noise=jnp.asarray(z) if eta else None)
        np.testing.assert_allclose(np.asarray(got), ref_step(x, e, t, t_prev, eta, z), atol=1e-5)


@functools.partial(jax.jit, static_argnames=("num_steps", "eta", "return_trajectory"))
def run(x, targets, rng, *, num_steps, eta=0.0, return_trajectory=False, schedule=SCHEDULE):
    return ddim.reverse_process(model_jnp, schedule, x, num_steps=num_steps, targets=targets,
                                eta=eta, rng=rng, return_trajectory=return_trajectory)


def test_one_step_without_the_x0_clip_matches_reference():
    """diffusion.clip_sample=False: the step leaves x0's estimate as it is."""
    unclipped = make_schedule(clip_sample=False)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 3, 3, 2)).astype(np.float32)
    e = rng.normal(size=x.shape).astype(np.float32)
    t, t_prev = np.array([950, 500, 99, 5]), np.array([850, 400, -1, 0])
    got = ddim.ddim_step(unclipped, jnp.asarray(x), jnp.asarray(e), t=jnp.asarray(t),
                         t_prev=jnp.asarray(t_prev))
    want = ref_step(x, e, t, t_prev, 0.0, None, clip=False)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # the clip changes these rows, so the two paths are told apart
    assert np.abs(want - ref_step(x, e, t, t_prev, 0.0, None)).max() > 0.1


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_reverse_process_without_the_x0_clip_matches_reference(eta):
    unclipped = make_schedule(clip_sample=False)
    x = np.random.default_rng(5).normal(size=(5, 4, 4, 1)).astype(np.float32)
    rng = jax.random.key(6)
    noises = [np.asarray(ddim.step_noise(rng, i, x.shape)) for i in range(10)]
    targets = np.array([0, 10, 200, 500, 900])
    got = run(jnp.asarray(x), jnp.asarray(targets), rng, num_steps=10, eta=eta,
              schedule=unclipped)
    want = ref_loop(x, 10, targets, eta, noises if eta else None, clip=False)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    clipped = ref_loop(x, 10, targets, eta, noises if eta else None)
    assert np.abs(want - clipped).max() > 0.1


def test_the_clip_is_static_and_checked():
    """Each clip_sample value is its own trace (a Python branch, not a select), and a
    non-bool is refused early with the key's name."""
    traces = []

    @jax.jit
    def f(schedule, x):
        traces.append(schedule.clip_sample)
        return ddim.reverse_process(model_jnp, schedule, x, num_steps=2)

    x = jnp.ones((2, 4, 4, 1))
    for clip in (True, False, True):
        f(make_schedule(clip_sample=clip), x)
    assert traces == [True, False]
    with pytest.raises(ValueError, match="diffusion.clip_sample"):
        make_schedule(clip_sample="no")


@pytest.mark.parametrize("n", [2, 10])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_reverse_process_matches_reference(n, eta):
    x = np.random.default_rng(n).normal(size=(5, 4, 4, 1)).astype(np.float32)
    rng = jax.random.key(3)
    noises = [np.asarray(ddim.step_noise(rng, i, x.shape)) for i in range(n)]
    got = run(jnp.asarray(x), None, rng, num_steps=n, eta=eta)
    want = ref_loop(x, n, 0, eta, noises if eta else None)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    assert np.abs(want).max() > 0.1  # the check is not vacuous


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_partial_generation_with_repeated_timesteps(eta):
    targets = np.array([0, 10, 500, 995, 999])  # 995 and 999 give repeated grid rows
    assert (np.diff(ref_grid(10, targets), axis=0) == 0).any()
    x = np.random.default_rng(7).normal(size=(5, 4, 4, 1)).astype(np.float32)
    rng = jax.random.key(4)
    noises = [np.asarray(ddim.step_noise(rng, i, x.shape)) for i in range(10)]
    got, traj = run(jnp.asarray(x), jnp.asarray(targets), rng, num_steps=10, eta=eta,
                    return_trajectory=True)
    np.testing.assert_allclose(np.asarray(got), ref_loop(x, 10, targets, eta, noises if eta else None),
                               atol=1e-5)
    np.testing.assert_array_equal(np.asarray(traj.t), ref_grid(10, targets))
    np.testing.assert_array_equal(np.asarray(traj.x[0]), x)
    for i in range(10):
        np.testing.assert_allclose(np.asarray(traj.eps[i]),
                                   model_np(np.asarray(traj.x[i], np.float64), ref_grid(10, targets)[i]),
                                   atol=1e-5)


def test_scalar_target_equals_per_sample_table_of_same_target():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 4, 1)).astype(np.float32))
    a = run(x, 10, None, num_steps=10)
    b = run(x, jnp.full((3,), 10), None, num_steps=10)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_compiles_once_per_steps_and_shape():
    calls = []

    @chex.assert_max_traces(n=2)
    def traced(x, targets):
        calls.append(1)
        return ddim.reverse_process(model_jnp, SCHEDULE, x, num_steps=2, targets=targets)

    f = jax.jit(traced)
    x = jnp.ones((4, 4, 4, 1))
    for seed in range(3):
        f(x * seed, jnp.asarray([0, 10, 20, seed], jnp.int32))
    assert len(calls) == 1
    f(jnp.ones((8, 4, 4, 1)), jnp.zeros((8,), jnp.int32))  # new shape: one more trace
    assert len(calls) == 2


@pytest.mark.parametrize("n", [0, 1001, 2.5])
def test_bad_step_count(n):
    with pytest.raises(ValueError, match="num_steps"):
        ddim.timestep_grid(n)
    with pytest.raises(ValueError, match="num_steps"):
        ddim.reverse_process(model_jnp, SCHEDULE, jnp.zeros((1, 2, 2, 1)), num_steps=n)


@pytest.mark.parametrize("k", [-1, 1000])
def test_bad_target(k):
    with pytest.raises(ValueError, match="target"):
        ddim.timestep_grid(10, k)
    with pytest.raises(ValueError, match="target"):
        ddim.reverse_process(model_jnp, SCHEDULE, jnp.zeros((2, 2, 2, 1)), num_steps=2,
                             targets=np.array([0, k]))


def test_eta_needs_a_key():
    with pytest.raises(ValueError, match="rng"):
        ddim.reverse_process(model_jnp, SCHEDULE, jnp.zeros((1, 2, 2, 1)), num_steps=2, eta=1.0)


def test_the_config_key_reaches_the_runs_schedule():
    """diffusion.clip_sample sets the schedule every sampler of a run reads (the teacher's
    replay, the solver's replay, the evaluation); a non-bool names the key."""
    from gdjax import run as run_lib
    from tests.helpers import tiny_config

    c = tiny_config()
    assert run_lib.settings_from_config(c).schedule.clip_sample is True
    c.diffusion.clip_sample = False
    schedule = run_lib.settings_from_config(c).schedule
    assert schedule.clip_sample is False
    np.testing.assert_array_equal(np.asarray(schedule.alphas_cumprod), ALPHA_BAR.astype(np.float32))
    with c.ignore_type():  # ConfigDict refuses it on the command line; a dict may not
        c.diffusion.clip_sample = 0
    with pytest.raises(ValueError, match=r"diffusion\.clip_sample=0 must be True or False"):
        run_lib.settings_from_config(c)
