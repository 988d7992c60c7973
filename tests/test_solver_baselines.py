"""Tests of the solver's own baselines (gdjax/eval/regularisers.py, gdjax/eval/solver.py):
EWC, SI, LwF and ER for the SimpleCNN, as avalanche computes them.

EWC's importance is recomputed in float64 (JAX with x64 on, the same SimpleCNN, each
minibatch's squared gradient of its mean cross-entropy, averaged over the minibatches, the
last one partial), and its penalty, SI's path integral and consolidation and LwF's
distillation are recomputed in float64 numpy from their formulas. ER's memory rows are
checked to be the buffer's real images of earlier experiences only; every baseline trains
in a continual run, and an EWC run killed after its first experience resumes bit for bit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gdjax import continual
from gdjax.data import memory
from gdjax.eval import classifier as cls
from gdjax.eval import regularisers as reg_lib
from gdjax.eval import solver
from gdjax.logs import read_metrics
from gdjax.run import build, settings_from_config
from tests.helpers import leaves, tiny_config


def random_tree(rng, scale=1.0, shift=0.0):
    return {"a": shift + scale * rng.normal(size=(3, 4)), "b": {"c": shift + scale * rng.normal(size=5)}}


def as32(tree):
    return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), tree)


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(tree)])


# ----------------------------------------------------------------------------- EWC

def test_ewc_importance_is_the_mean_squared_minibatch_gradient_in_float64():
    cfg = solver.SolverConfig(strategy="ewc", batch_size=4)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (10, 16, 16, 1)).astype(np.float32)  # batches 4, 4, 2
    labels = rng.integers(0, 10, 10).astype(np.int32)
    params = cls.init_classifier(jax.random.key(3), (16, 16, 1), 10)
    got = solver.ewc_importance(cfg, params, images, labels)
    model = cls.SimpleCNN(num_classes=10)
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda v: jnp.asarray(np.asarray(v), jnp.float64), params)

        def ce(p, x, y):
            logits = model.apply({"params": p}, x)  # eval mode: no dropout
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

        squares = [jax.tree.map(np.square, jax.grad(ce)(p64, jnp.asarray(images[i:i + 4],
                                                                          jnp.float64),
                                                       jnp.asarray(labels[i:i + 4])))
                   for i in (0, 4, 8)]
        want = flat(jax.tree.map(lambda *s: sum(s) / 3, *squares))
    np.testing.assert_allclose(flat(got), want, rtol=2e-4, atol=1e-12)
    assert want.max() > 0


def test_ewc_penalty_sums_the_stored_experiences_only():
    rng = np.random.default_rng(1)
    params = random_tree(rng)
    reg = reg_lib.ewc_init(as32(params), num_experiences=3)
    stored = []
    for j in range(2):
        anchor, importance = random_tree(rng), random_tree(rng, 0.1, 0.5)
        reg = reg_lib.ewc_store(reg, as32(anchor), as32(importance), j)
        stored.append((anchor, importance))
    # Slot 2 holds junk that must not count.
    reg["anchors"] = jax.tree.map(lambda s: s.at[2].set(99.0), reg["anchors"])
    reg["importance"] = jax.tree.map(lambda s: s.at[2].set(99.0), reg["importance"])
    want = sum(np.sum(flat(imp) * (flat(params) - flat(anchor)) ** 2) for anchor, imp in stored)
    assert int(reg["count"]) == 2
    assert float(reg_lib.ewc_penalty(as32(params), reg)) == pytest.approx(want, rel=1e-5)


# ----------------------------------------------------------------------------- SI

def test_si_path_integral_and_consolidation_in_float64():
    rng = np.random.default_rng(2)
    start = random_tree(rng)
    reg = reg_lib.si_init(as32(start))
    thetas, grads = [start], []
    for _ in range(3):
        grads.append(random_tree(rng))
        thetas.append(jax.tree.map(lambda t, g: t - 0.05 * g, thetas[-1], grads[-1]))
        reg = reg_lib.si_accumulate(reg, as32(grads[-1]), as32(thetas[-2]), as32(thetas[-1]))
    trajectory = sum(flat(g) * (flat(b) - flat(a)) for g, a, b in zip(grads, thetas, thetas[1:]))
    np.testing.assert_allclose(flat(reg["trajectory"]), trajectory, rtol=1e-4, atol=1e-7)
    end = thetas[-1]
    eps = 1e-3
    out = reg_lib.si_consolidate(reg, as32(end), eps)
    cum = trajectory / ((flat(end) - flat(start)) ** 2 + eps)
    np.testing.assert_allclose(flat(out["cum"]), cum, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(flat(out["omega"]), np.minimum(-cum, reg_lib.SI_CLIP),
                               rtol=1e-3, atol=1e-6)
    assert (flat(out["omega"]) == np.float32(reg_lib.SI_CLIP)).any()  # the clip bites
    np.testing.assert_array_equal(flat(out["anchor"]), flat(as32(end)))
    assert not flat(out["trajectory"]).any()
    # The penalty: sum omega * (theta - anchor)^2.
    theta = random_tree(rng)
    want = np.sum(flat(out["omega"]) * (flat(theta) - flat(out["anchor"])) ** 2)
    assert float(reg_lib.si_penalty(as32(theta), out)) == pytest.approx(want, rel=1e-5)


# ----------------------------------------------------------------------------- LwF

def test_lwf_distillation_over_the_earlier_classes_in_float64():
    rng = np.random.default_rng(3)
    student, teacher = rng.normal(size=(5, 10)), rng.normal(size=(5, 10))
    active = np.zeros(10)
    active[[2, 7, 9]] = 1
    mask = np.array([1, 1, 1, 0, 1], np.float64)
    T = 2.0

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    au = [2, 7, 9]
    log_p, log_q = log_softmax(student[:, au] / T), log_softmax(teacher[:, au] / T)
    rows = np.sum(np.exp(log_q) * (log_q - log_p), -1)
    got = reg_lib.lwf_loss(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32),
                           jnp.asarray(active, jnp.float32), T, jnp.asarray(mask, jnp.float32))
    assert float(got) == pytest.approx(np.sum(rows * mask) / mask.sum(), rel=1e-5)
    # No earlier class (the first experience): 0, with finite gradients.
    none = jnp.zeros(10, jnp.float32)
    value, grad = jax.value_and_grad(reg_lib.lwf_loss)(jnp.asarray(student, jnp.float32),
                                                        jnp.asarray(teacher, jnp.float32),
                                                        none, T)
    assert float(value) == 0.0 and np.isfinite(np.asarray(grad)).all()
    alphas = (0.0, 0.5, 1.33333)
    assert [float(reg_lib.lwf_alpha(alphas, jnp.int32(k))) for k in range(5)] == \
        pytest.approx([0.0, 0.5, 1.33333, 1.33333, 1.33333])


# ----------------------------------------------------------------------------- ER and runs

def test_er_memory_rows_are_real_images_of_earlier_experiences(tmp_path, monkeypatch):
    run = build(tiny_config(solver=True), str(tmp_path))
    cfg = solver.SolverConfig(strategy="er", epochs=1, batch_size=32, er_buffer_size=40)
    calls = []
    real_step = solver.make_baseline_step

    def recording(cfg, mesh=None):
        step = real_step(cfg, mesh)

        def wrapped(state, reg, mem_x, mem_y, *rest):
            calls.append((None if mem_x is None else np.asarray(mem_x),
                          None if mem_y is None else np.asarray(mem_y)))
            return step(state, reg, mem_x, mem_y, *rest)
        return wrapped

    monkeypatch.setattr(solver, "make_baseline_step", recording)
    state = solver.init_state(cfg, jax.random.key(0), run.image_shape)
    state, _ = solver.learn_experience(cfg, state, train=run.train, experiences=run.experiences,
                                       experience=0, seed=0, gen_apply=None, gen_params=None,
                                       schedule=None)
    assert all(x is None for x, _ in calls)  # nothing to replay in the first experience
    calls.clear()
    solver.learn_experience(cfg, state, train=run.train, experiences=run.experiences,
                            experience=1, seed=0, gen_apply=None, gen_params=None,
                            schedule=None)
    buffer = memory.buffer_indices(run.train.labels, run.experiences, 1, size=40, seed=0,
                                   stream="solver_er_buffer")
    kept = {x.tobytes(): int(y) for x, y in zip(run.train.images[buffer],
                                                run.train.labels[buffer])}
    assert len(buffer) == 40 and calls
    for mem_x, mem_y in calls:
        assert mem_x.shape[0] == 32
        assert all(kept[x.tobytes()] == int(y) for x, y in zip(mem_x, mem_y))
        assert np.isin(mem_y, run.experiences[0]).all()


# Whole-loop runs of every baseline: slow (pytest.ini), as the EWC resume below.
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["er", "ewc", "si", "lwf"])
def test_each_baseline_trains_beside_the_generator(strategy, tmp_path):
    c = tiny_config("naive", solver=True)
    c.solver.strategy = strategy
    workdir = str(tmp_path)
    continual.train(c, workdir)
    rows = read_metrics(workdir, "experience")
    assert [r["experience"] for r in rows] == [0, 1]
    assert all(0.0 <= r["classifier_accuracy"] <= 1.0 for r in rows)
    assert rows[0]["classifier_acc_exp_0"] > 0.3  # above chance (0.2) after one epoch


@pytest.mark.slow  # a whole run twice (about a minute); the formulas above stay in the fast set
def test_an_ewc_run_killed_after_its_first_experience_resumes_bitwise(tmp_path, monkeypatch):
    c = tiny_config("naive", solver=True)
    c.solver.strategy = "ewc"
    whole = continual.train(c, str(tmp_path / "whole"))
    real = continual.train_solver

    def dying(loop, ls, k):
        if k == 1:
            # The EWC state of experience 0 is in the checkpoint the rerun resumes from.
            assert int(ls.solver_reg["count"]) == 1
            raise KeyboardInterrupt
        return real(loop, ls, k)

    monkeypatch.setattr(continual, "train_solver", dying)
    with pytest.raises(KeyboardInterrupt):
        continual.train(c, str(tmp_path / "killed"))
    monkeypatch.undo()
    resumed = continual.train(c, str(tmp_path / "killed"))
    for a, b in zip(leaves(resumed.params), leaves(whole.params)):
        np.testing.assert_array_equal(a, b)
    assert read_metrics(tmp_path / "killed", "experience") == \
        read_metrics(tmp_path / "whole", "experience")


@pytest.mark.parametrize("key, value, message", [
    ("strategy", "agem", "solver.strategy='agem' is unknown"),
    ("ewc_lambda", -1.0, "must be finite and >= 0"),
    ("lwf_alpha", (), "lwf_alpha not empty"),
    ("si_eps", 0.0, "si_eps=0.0"),
    ("er_buffer_size", 0, "solver.er_buffer_size=0"),
])
def test_bad_baseline_settings_are_named(key, value, message):
    c = tiny_config(solver=True)
    setattr(c.solver, key, value)
    with pytest.raises(ValueError, match=message):
        settings_from_config(c)
