"""The compiled train step: every strategy, the frozen teacher, targets, weights, devices."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdjax import ddim, losses, strategies, unet
from gdjax.schedule import add_noise, make_schedule
from gdjax.strategies import StrategyConfig
from gdjax.train_step import OptimConfig, init_state, make_optimizer, make_train_step

SCHEDULE = make_schedule()
CFG = unet.get_unet_config("tiny")
MODEL = unet.UNet(CFG)
B = 4


def apply_fn(params, x, t):
    return MODEL.apply({"params": params}, x, t)


APPLY = jax.jit(apply_fn)


@pytest.fixture(scope="module")
def setup():
    student = unet.init_params(CFG, jax.random.key(0))
    teacher = unet.init_params(CFG, jax.random.key(1))
    images = jax.random.uniform(jax.random.key(2), (B, 16, 16, 1), minval=-1, maxval=1)
    return student, teacher, {"image": images, "memory": images[::-1]}


def copy(tree):
    return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


OPT = make_optimizer(OptimConfig(learning_rate=1e-3))


@functools.lru_cache(maxsize=None)
def compiled_step(strategy):
    """One jitted step per strategy, shared by the tests so each compiles once."""
    return make_train_step(apply_fn=apply_fn, schedule=SCHEDULE,
                           strategy=StrategyConfig(strategy, lambd=0.7), optimizer=OPT)


def run_steps(strategy, student, teacher, batch, n=2, experience=1):
    step = compiled_step(strategy)
    state = init_state(copy(student), OPT, experience=experience)
    metrics = []
    for _ in range(n):
        state, m = step(state, teacher, batch, jax.random.key(7))
        metrics.append(jax.device_get(m))
    return step, state, metrics


def test_replay_weights_sum_to_one():
    for k in range(5):
        w_data, w_replay = losses.replay_weights(jnp.int32(k), True)
        assert float(w_data) == pytest.approx(1 / (k + 1))
        assert float(w_replay) == pytest.approx(1 - 1 / (k + 1))
        assert float(w_data + w_replay) == pytest.approx(1.0)
    assert tuple(map(float, losses.replay_weights(jnp.int32(3), False))) == (1.0, 1.0)


@pytest.mark.parametrize("name", [strategies.FULL_GENERATION])
def test_steps_compile_once_and_keep_the_teacher_frozen(name, setup, compilations):
    # Every strategy, through the experience loop: test_continual.py's end-to-end test.
    student, teacher, batch = setup
    teacher_before = jax.tree.map(np.asarray, teacher)
    compiled_step.cache_clear()  # a step of its own, compiled in this test
    step, state, metrics = run_steps(name, student, teacher, batch, n=3)
    run_steps(name, student, teacher, batch, n=1, experience=4)  # another experience: no retrace
    assert compilations["train_step"] == 1
    assert int(state.step) == 3
    jax.tree.map(np.testing.assert_array_equal, teacher_before, jax.tree.map(np.asarray, teacher))
    for m in metrics:
        assert all(np.isfinite(v) for v in m.values())
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params, student))
    assert max(moved) > 0
    assert metrics[0]["replay_loss"] > 0


def replay_key(step_index):
    rng = jax.random.fold_in(jax.random.key(7), step_index)
    return jax.random.split(rng, 3)


@pytest.mark.parametrize("name", [strategies.FULL_GENERATION, strategies.GAUSSIAN_SYMMETRY,
                                  strategies.NO_DISTILLATION])
def test_targets_are_the_teachers_predictions(name, setup):
    """Recompute the step's replay rows and targets outside it, and its losses from them.

    With the UNet; partial generation and plain gaussian distillation (and the other
    options) are recomputed in float64 with a toy denoiser in test_strategy_options.py.
    """
    student, teacher, batch = setup
    cfg = StrategyConfig(name, lambd=0.7)
    k_eps, k_t, k_replay = replay_key(0)
    x0 = batch["image"]
    eps = jax.random.normal(k_eps, x0.shape)
    t = jax.random.randint(k_t, (B,), 0, 1000)
    rows = jax.jit(lambda tp, key: strategies.replay_rows(
        cfg, apply_fn=apply_fn, teacher_params=tp, schedule=SCHEDULE, rng=key,
        image_shape=x0.shape))(teacher, k_replay)
    if name == strategies.NO_DISTILLATION:
        assert not np.allclose(rows.target, APPLY(teacher, rows.x, rows.t))
    else:
        np.testing.assert_allclose(rows.target, APPLY(teacher, rows.x, rows.t), atol=1e-6)
    if name in (strategies.GAUSSIAN, strategies.GAUSSIAN_SYMMETRY):
        assert float(jnp.std(rows.x)) > 0.5  # pure noise
    pred = APPLY(student, jnp.concatenate([add_noise(SCHEDULE, x0, noise=eps, t=t), rows.x]),
                             jnp.concatenate([t, rows.t]))
    data = float(jnp.mean((pred[:B] - eps) ** 2))
    replay = float(jnp.mean((pred[B:] - rows.target) ** 2))
    _, _, metrics = run_steps(name, student, teacher, batch, n=1, experience=2)
    assert metrics[0]["data_loss"] == pytest.approx(data, rel=1e-4)
    assert metrics[0]["replay_loss"] == pytest.approx(replay, rel=1e-4)
    assert metrics[0]["loss"] == pytest.approx(data / 3 + (2 / 3) * 0.7 * replay, rel=1e-4)


@pytest.mark.parametrize("name", [strategies.FULL_GENERATION, strategies.ER])
def test_a_padded_last_batch_counts_only_its_real_rows(name, setup):
    """An epoch's short last batch: 3 real rows of B = 4 (mask 1, 1, 1, 0). The losses are
    means over the real rows and over the first ceil(4 * 3 / 4) = 3 replay rows,
    recomputed outside the step in float64; whatever the padding row holds, the update is
    bitwise the same (its gradient is exactly zero)."""
    student, teacher, batch = setup
    cfg = StrategyConfig(name, lambd=0.7)
    mask = np.array([1, 1, 1, 0], np.float32)
    k_eps, k_t, k_replay = replay_key(0)
    x0 = batch["image"]
    eps = jax.random.normal(k_eps, x0.shape)
    t = jax.random.randint(k_t, (B,), 0, 1000)
    rows = jax.jit(lambda tp, key, memory: strategies.replay_rows(
        cfg, apply_fn=apply_fn, teacher_params=tp, schedule=SCHEDULE, rng=key,
        image_shape=x0.shape, memory_x0=memory))(teacher, k_replay, batch["memory"])
    pred = np.asarray(APPLY(student, jnp.concatenate([add_noise(SCHEDULE, x0, noise=eps, t=t),
                                                      rows.x]), jnp.concatenate([t, rows.t])),
                      np.float64)
    per_row = lambda p, target: ((p - np.asarray(target, np.float64)) ** 2).mean(axis=(1, 2, 3))
    data, replay = per_row(pred[:B], eps)[:3].mean(), per_row(pred[B:], rows.target)[:3].mean()
    want = (np.concatenate([per_row(pred[:B], eps)[:3], per_row(pred[B:], rows.target)[:3]]).mean()
            if name == strategies.ER else data / 3 + (2 / 3) * 0.7 * replay)
    padded = dict(batch, mask=jnp.asarray(mask))
    junk = dict(padded, image=batch["image"].at[3].set(5.0), memory=batch["memory"].at[3].set(-9.0))
    _, state, metrics = run_steps(name, student, teacher, padded, n=1, experience=2)
    _, state_junk, metrics_junk = run_steps(name, student, teacher, junk, n=1, experience=2)
    assert metrics[0]["data_loss"] == pytest.approx(data, rel=1e-4)
    assert metrics[0]["replay_loss"] == pytest.approx(replay, rel=1e-4)
    assert metrics[0]["loss"] == pytest.approx(want, rel=1e-4)
    assert metrics_junk[0] == metrics[0]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
                 jax.device_get(state_junk.params))
    # Without the mask the junk row would count.
    _, _, unmasked = run_steps(name, student, teacher, dict(junk, mask=jnp.ones(B)), n=1,
                               experience=2)
    assert unmasked[0]["data_loss"] != pytest.approx(data, rel=1e-3)


def test_replay_rows_follow_the_batch_size():
    for mask, rows, want in (([1, 1, 1, 1], 4, 4), ([1, 1, 1, 0], 4, 3), ([1, 0, 0, 0], 4, 1),
                             ([1, 1, 0, 0], 3, 2), ([1, 1, 1, 0], 8, 6), ([1, 1, 1, 1], 2, 2)):
        got = np.asarray(losses.replay_mask(jnp.asarray(mask, jnp.float32), rows))
        np.testing.assert_array_equal(got, np.arange(rows) < want)
    assert losses.replay_mask(None, 4) is None


def test_full_generation_inputs_come_from_the_teachers_reverse_process(setup):
    student, teacher, batch = setup
    cfg = StrategyConfig(strategies.FULL_GENERATION, teacher_steps=2)
    _, _, k_replay = replay_key(0)
    rows = jax.jit(lambda tp, key: strategies.replay_rows(
        cfg, apply_fn=apply_fn, teacher_params=tp, schedule=SCHEDULE, rng=key,
        image_shape=(B, 16, 16, 1)))(teacher, k_replay)
    k_noise, k_t, k_start, _ = jax.random.split(k_replay, 4)
    # The reverse process written out as a Python loop of DDIM steps, outside any scan.
    x0 = jax.random.normal(k_start, (B, 16, 16, 1))
    for t_now, t_prev in ((999, 499), (499, -1)):
        tt = jnp.full((B,), t_now)
        x0 = ddim.ddim_step(SCHEDULE, x0, APPLY(teacher, x0, tt), t=tt, t_prev=jnp.full((B,), t_prev))
    t = jax.random.randint(k_t, (B,), 0, 1000)
    want = add_noise(SCHEDULE, x0, noise=jax.random.normal(k_noise, (B, 16, 16, 1)), t=t)
    np.testing.assert_allclose(rows.x, want, atol=1e-5)


def test_lwf_distils_on_the_real_rows(setup):
    student, teacher, batch = setup
    k_eps, k_t, _ = replay_key(0)
    x0 = batch["image"]
    eps = jax.random.normal(k_eps, x0.shape)
    t = jax.random.randint(k_t, (B,), 0, 1000)
    x_t = add_noise(SCHEDULE, x0, noise=eps, t=t)
    pred = APPLY(student, x_t, t)
    _, _, metrics = run_steps(strategies.LWF, student, teacher, batch, n=1, experience=1)
    assert metrics[0]["data_loss"] == pytest.approx(float(jnp.mean((pred - eps) ** 2)), rel=1e-4)
    want = float(jnp.mean((pred - APPLY(teacher, x_t, t)) ** 2))
    assert metrics[0]["replay_loss"] == pytest.approx(want, rel=1e-4)


def test_symmetric_noise_rule():
    noise = jax.random.normal(jax.random.key(0), (6, 4, 4, 1))
    t = jnp.array([900, 500, 600, 400, 100, 650])  # mid rows: 1, 2, 3, 5 -> first half 1, 2
    out = np.asarray(strategies.symmetric_noise(noise, t))
    n = np.asarray(noise)
    np.testing.assert_array_equal(out[0], n[0])
    for i in (1, 2):  # top from bottom
        np.testing.assert_array_equal(out[i, :2], n[i, 2:][::-1])
        np.testing.assert_array_equal(out[i, 2:], n[i, 2:])
    for i in (3, 5):  # left from right
        np.testing.assert_array_equal(out[i, :, :2], n[i, :, 2:][:, ::-1])
        np.testing.assert_array_equal(out[i, :, 2:], n[i, :, 2:])
    top = n[4].copy()
    top[:2] = n[4, 2:][::-1]
    want = top.copy()
    want[:, :2] = top[:, 2:][:, ::-1]
    np.testing.assert_array_equal(out[4], want)


def test_er_is_one_criterion_over_all_rows(setup):
    student, teacher, batch = setup
    _, _, m = run_steps(strategies.ER, student, teacher, batch, n=1, experience=3)
    assert m[0]["loss"] == pytest.approx(0.5 * (m[0]["data_loss"] + m[0]["replay_loss"]), rel=1e-5)


def test_bad_settings_are_named_where_they_are_made(setup):
    """Each settings dataclass checks itself when it is built (gdjax/run.py builds them from
    the config); a criterion name reaching the step anyway fails as it is traced."""
    with pytest.raises(ValueError, match="strategy.name='distill'"):
        StrategyConfig("distill")
    with pytest.raises(ValueError, match="strategy.teacher_steps=0 must be an integer >= 1"):
        StrategyConfig(teacher_steps=0)
    with pytest.raises(ValueError, match="train.learning_rate=0 must be > 0"):
        OptimConfig(learning_rate=0)
    with pytest.raises(ValueError, match=r"train.grad_clip=nan must be a finite number"):
        OptimConfig(grad_clip=float("nan"))
    student, teacher, batch = setup
    step = make_train_step(apply_fn=apply_fn, schedule=SCHEDULE, strategy=StrategyConfig(),
                           optimizer=OPT, criterion="l3", with_replay=False)
    with pytest.raises(ValueError, match="train.criterion='l3' is unknown"):
        step(init_state(copy(student), OPT), teacher, batch, jax.random.key(0))


MULTI_DEVICE = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from gdjax import unet
    from gdjax.schedule import make_schedule
    from gdjax.strategies import StrategyConfig
    from gdjax.train_step import OptimConfig, init_state, make_optimizer, make_train_step
    from jax.sharding import NamedSharding, PartitionSpec as P
    assert jax.device_count() == 8
    cfg = unet.get_unet_config("tiny")
    model = unet.UNet(cfg)
    apply_fn = lambda p, x, t: model.apply({"params": p}, x, t)
    student = unet.init_params(cfg, jax.random.key(0))
    teacher = unet.init_params(cfg, jax.random.key(1))
    images = jax.random.uniform(jax.random.key(2), (8, 16, 16, 1), minval=-1, maxval=1)
    opt = make_optimizer(OptimConfig(learning_rate=1e-3))
    strategy = StrategyConfig("full_generation_distillation")
    results = []
    from jax.sharding import AxisType
    for mesh in (None, jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))):
        step = make_train_step(apply_fn=apply_fn, schedule=make_schedule(), strategy=strategy,
                               optimizer=opt, mesh=mesh)
        state = init_state(jax.tree.map(jnp.array, student), opt, experience=1)
        batch = {"image": images}
        if mesh is not None:
            rep = NamedSharding(mesh, P())
            state, teacher_in = jax.device_put((state, teacher), rep)
            batch = {"image": jax.device_put(images, NamedSharding(mesh, P("data")))}
        else:
            teacher_in = teacher
        for _ in range(2):
            state, m = step(state, teacher_in, batch, jax.random.key(3))
        results.append((jax.device_get(m), jax.device_get(state.params),
                        jax.device_get(state.opt_state)))
    (m1, p1, o1), (m8, p8, o8) = results
    for k in m1:
        np.testing.assert_allclose(m1[k], m8[k], rtol=1e-5, atol=1e-6)
    # Adam's moments are linear (mu) and quadratic (nu) in the gradients, so they show a
    # device's rows dropped or the mean scaled (which Adam's normalised step would hide);
    # 1 and 8 devices differ there by float32 rounding only, relative to the moment's
    # largest entry (not each leaf's: attention key biases get a gradient of exactly 0 in
    # exact arithmetic, float noise of 1e-12 here, which the two runs need not share).
    def moments(opt_state):
        out = {"mu": [], "nu": []}
        for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
            names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
            if names and names[-1] in out:
                out[names[-1]].append(np.asarray(leaf, np.float64))
        return out
    mo1, mo8 = moments(o1), moments(o8)
    assert len(mo1["mu"]) == len(mo1["nu"]) == len(jax.tree.leaves(p1))
    worst = 0.0
    for name in ("mu", "nu"):
        scale = max(np.abs(a).max() for a in mo1[name])
        assert scale > 0
        worst = max([worst] + [np.abs(a - b).max() / scale for a, b in zip(mo1[name], mo8[name])])
    assert worst < 1e-5, worst
    # The params: Adam's first steps move each one by about lr * sign(grad) whatever the
    # gradient's size, so where a gradient is within float noise of 0 the two may move
    # apart by up to ~lr (1e-3); the most seen is 3e-5.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4), p1, p8)
    print("OK", float(m1["loss"]), float(m8["loss"]), "moments", worst,
          "params", max(float(np.abs(a - b).max()) for a, b in
                        zip(jax.tree.leaves(p1), jax.tree.leaves(p8))))

    # Evaluation on the same 8 devices: sampling, the classifier's logits and features, and
    # the scores computed from them equal one device's (no sharding, no mesh).
    from gdjax.data import data_sharding
    from gdjax.eval import classifier, metrics, sampling
    sharding = data_sharding(jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,)))
    cnn = classifier.init_variables("simple_cnn", jax.random.key(4), (16, 16, 1), 10)
    samples = {}
    for where in (None, sharding):
        # 20 samples in batches of 16 rows: the same batches on both, the last one cut
        samples[where] = sampling.generate(apply_fn, student, make_schedule(),
                                           jax.random.key(5), num=20, image_shape=(16, 16, 1),
                                           num_steps=3, batch_size=16, sharding=where)
    s1, s8 = samples[None], samples[sharding]
    assert s1.shape == (20, 16, 16, 1) and s1.std() > 0.01
    # The first DDIM step from t = 999 divides the model's eps error by sqrt(alpha_bar)
    # (0.0064): float32 rounding of per-device matmul shapes (1e-6) shows as about 1e-4.
    np.testing.assert_allclose(s1, s8, atol=2e-3)
    assert np.abs(s1 - s8).mean() < 1e-4
    scores = []
    for where in (None, sharding):  # the classifier on the same images, 12 rows a batch
        logits, features = classifier.classify(cnn, s1 * 2 - 1, arch="simple_cnn",
                                               batch_size=12, sharding=where)
        freq = metrics.class_frequencies(np.argmax(logits, -1), 10)
        mu, sigma = metrics.feature_statistics(features[:10])
        fd = metrics.frechet_distance(mu, sigma, *metrics.feature_statistics(features[10:]))
        scores.append((logits, features, freq, fd))
    (l1, f1, q1, d1), (l8, f8, q8, d8) = scores
    assert l1.shape == (20, 10) and f1.shape[0] == 20 and np.ptp(l1) > 0
    np.testing.assert_allclose(l1, l8, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(f1, f8, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(q1, q8)
    np.testing.assert_allclose(d1, d8, rtol=1e-3)
    print("EVAL OK", d1, d8)
""")


@pytest.mark.slow  # a subprocess of 8 fake devices: `python -m pytest -q -m slow tests`
def test_eight_devices_equal_one_in_training_and_evaluation():
    # The suite's fast-compile flag (conftest.py) kept: compilation dominates this test.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
    out = subprocess.run([sys.executable, "-c", MULTI_DEVICE], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout and "EVAL OK" in out.stdout
