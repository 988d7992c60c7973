"""Class-conditional training and conditional replay, against float64 numpy.

As in test_strategy_options.py, the step gets a per-pixel linear denoiser, here with one
(w, b) per label: eps = w[y] * x + b[y] * t / 1000, labels 0..3 and the null label 4. A
debug callback records the student's one call on the data and replay rows, labels
included, so the tests see what the step conditioned it on; every replay input, target
and loss is then recomputed in float64 outside JAX, guidance included.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdjax import continual, strategies, unet
from gdjax import run as run_lib
from gdjax.data import memory
from gdjax.eval import sampling, solver
from gdjax.strategies import StrategyConfig
from gdjax.train_step import OptimConfig, init_state, make_optimizer, make_train_step
from gdjax.logs import read_metrics
from gdjax.run import Run
from tests.conftest import recording_compilations
from tests.helpers import killed_then_resumed, leaves, tiny_config
from tests.test_strategy_options import (SCHEDULE, SHAPE, Draws, add_noise64, f64,
                                         reverse_process64)

NULL = 4
STUDENT = {"w": np.float32([0.3, 0.5, -0.2, 0.7, 0.1]), "b": np.float32([0.2, -0.4, 0.6, 0.1, 0.3])}
TEACHER = {"w": np.float32([0.8, -0.3, 0.4, 0.2, 0.6]), "b": np.float32([-0.5, 0.7, 0.2, -0.1, 0.4])}
LAMBD, EXPERIENCE = 0.7, 2  # loss weights 1/3 and 2/3 * 0.7


def denoise(params, x, t, labels):
    w, b = params["w"][labels], params["b"][labels]
    return (w[:, None, None, None] * x
            + (b * t.astype(jnp.float32) / 1000)[:, None, None, None])


def make_recorder():
    """(apply_fn, calls): the conditional linear denoiser; calls collects (x, t, labels)."""
    calls = []

    def apply_fn(params, x, t, labels):
        jax.debug.callback(lambda *a: calls.append(tuple(map(np.asarray, a))), x, t, labels)
        return denoise(params, x, t, labels)

    return apply_fn, calls


def cond64(params, x, t, labels):
    """The denoiser in float64 numpy."""
    w, b = (np.asarray(params[k], np.float64)[np.asarray(labels)] for k in ("w", "b"))
    return w[:, None, None, None] * x + (b * np.asarray(t, np.float64) / 1000)[:, None, None, None]


def guided64(params, x, t, labels, scale):
    """Classifier-free guidance written out: u + scale * (c - u)."""
    u = cond64(params, x, t, np.full(len(x), NULL))
    return u + scale * (cond64(params, x, t, labels) - u)


def one_step(cfg, batch, *, label_dropout):
    """One step of `cfg` at experience 2 from the untrained student: (metrics, the student's
    (x, t, labels))."""
    apply_fn, calls = make_recorder()
    opt = make_optimizer(OptimConfig())
    step = make_train_step(apply_fn=apply_fn, schedule=SCHEDULE, strategy=cfg, optimizer=opt,
                           null_label=NULL, label_dropout=label_dropout)
    state = init_state(jax.tree.map(jnp.asarray, STUDENT), opt, experience=EXPERIENCE)
    _, metrics = step(state, jax.tree.map(jnp.asarray, TEACHER),
                      jax.tree.map(jnp.asarray, batch), jax.random.key(7))
    rows = len(batch["label"]) + (0 if cfg.name == strategies.LWF else len(batch["replay_label"]))
    student = [c for c in calls if len(c[0]) == rows and c[2].shape == (rows,)]
    # the teacher's calls on the same number of rows come first; the student's is the last
    return jax.device_get(metrics), student[-1]


def batch_of(b, r, *, seed=2):
    g = np.random.default_rng(seed)
    return {"image": g.uniform(-1, 1, (b,) + SHAPE).astype(np.float32),
            "label": np.arange(b, dtype=np.int32) % 4,
            "replay_label": memory.replay_labels((0, 1), rows=r, seed=seed, experience=2, step=0),
            "memory": g.uniform(-1, 1, (r,) + SHAPE).astype(np.float32)}


@pytest.mark.parametrize("name, scale", [
    (strategies.FULL_GENERATION, 2.0), (strategies.PARTIAL_GENERATION, 1.0),
    (strategies.NO_DISTILLATION, 3.0), (strategies.GAUSSIAN, 1.0), (strategies.ER, 1.0),
    (strategies.LWF, 1.0)])
def test_replay_rows_targets_and_losses_in_float64(name, scale):
    """Replay rows generated for their labels (guided at `scale`), the student and the
    teacher's targets conditioned on the same labels after dropout, the three losses."""
    b = r = 8
    batch = batch_of(b, r)
    cfg = StrategyConfig(name, lambd=LAMBD, teacher_guidance=scale)
    metrics, (x, t, y) = one_step(cfg, batch, label_dropout=0.5)
    d = Draws(b, r)
    # every label is the row's own or, dropped, the null label; at 0.5 some of each
    y_data, y_replay = y[:b], y[b:]
    assert np.all((y_data == batch["label"]) | (y_data == NULL))
    x_t = add_noise64(f64(batch["image"]), d.eps, d.t)
    data_pred = cond64(STUDENT, x_t, d.t, y_data)
    data = np.mean((data_pred - d.eps) ** 2)
    if name == strategies.LWF:  # the teacher on the real rows, under their labels
        replay = np.mean((data_pred - cond64(TEACHER, x_t, d.t, y_data)) ** 2)
    else:
        assert np.all((y_replay == batch["replay_label"]) | (y_replay == NULL))
        if name == strategies.ER:
            x_replay, target = add_noise64(f64(batch["memory"]), d.replay_eps, d.replay_t), d.replay_eps
        elif name == strategies.GAUSSIAN:
            x_replay = d.replay_eps
            target = cond64(TEACHER, x_replay, d.replay_t, y_replay)
        else:
            full = name != strategies.PARTIAL_GENERATION
            x_replay = reverse_process64(
                TEACHER, d.start, np.zeros(r, np.int64) if full else d.replay_t, num_steps=2,
                eta=0.0, noises=d.step_noise,
                denoise=lambda p, x, t: guided64(p, x, t, batch["replay_label"], scale))
            if full:
                x_replay = add_noise64(x_replay, d.replay_eps, d.replay_t)
            target = (d.replay_eps if name == strategies.NO_DISTILLATION
                      else cond64(TEACHER, x_replay, d.replay_t, y_replay))
        np.testing.assert_allclose(x[b:], x_replay, atol=2e-5)
        replay = np.mean((cond64(STUDENT, x_replay, d.replay_t, y_replay) - target) ** 2)
    np.testing.assert_allclose(x[:b], x_t, atol=1e-5)
    if name == strategies.ER:
        total = (data + replay) / 2
    else:
        total = data / 3 + 2 / 3 * LAMBD * replay
    for key, want in (("data_loss", data), ("replay_loss", replay), ("loss", total)):
        assert float(metrics[key]) == pytest.approx(want, rel=1e-5), key


def test_guidance_reaches_the_teachers_samples():
    """The same step at teacher_guidance 1 and 3: the replay rows differ, by the float64
    difference of the two guided reverse processes."""
    batch = batch_of(8, 8)
    xs = []
    for scale in (1.0, 3.0):
        cfg = StrategyConfig(strategies.PARTIAL_GENERATION, lambd=LAMBD, teacher_guidance=scale)
        xs.append(one_step(cfg, batch, label_dropout=0.0)[1][0][8:])
    d = Draws(8, 8)
    want = [reverse_process64(TEACHER, d.start, d.replay_t, num_steps=2, eta=0.0,
                              noises=d.step_noise,
                              denoise=lambda p, x, t, s=s: guided64(p, x, t, batch["replay_label"], s))
            for s in (1.0, 3.0)]
    assert np.abs(want[1] - want[0]).max() > 0.05
    np.testing.assert_allclose(xs[1] - xs[0], want[1] - want[0], atol=4e-5)


def test_label_dropout_rate_and_none_at_zero():
    """Dropout 0.3 on 512 real rows: about 30% null labels (binomial sd 2%), the rest the
    rows' own; at 0 every label is kept; replay labels are dropped too."""
    b = 512
    batch = batch_of(b, b)
    cfg = StrategyConfig(strategies.GAUSSIAN, lambd=LAMBD)
    _, (_, _, y) = one_step(cfg, batch, label_dropout=0.3)
    for got, own in ((y[:b], batch["label"]), (y[b:], batch["replay_label"])):
        dropped = got == NULL
        assert 0.24 < dropped.mean() < 0.36
        np.testing.assert_array_equal(got[~dropped], own[~dropped])
    _, (_, _, y) = one_step(cfg, batch, label_dropout=0.0)
    np.testing.assert_array_equal(y, np.concatenate([batch["label"], batch["replay_label"]]))
    del batch["replay_label"]  # a replay batch without its labels is refused, naming them
    with pytest.raises(ValueError, match="needs the batch's 'replay_label'"):
        one_step(cfg, batch, label_dropout=0.0)


# ----------------------------------------------------------------------------- host side


def test_replay_labels_are_balanced_over_the_teachers_classes():
    for classes, rows in (((2, 6), 8), ((2, 6, 1, 8, 4), 12), ((3,), 5)):
        labels = memory.replay_labels(classes, rows=rows, seed=42, experience=3, step=10)
        assert labels.dtype == np.int32 and labels.shape == (rows,)
        counts = np.array([np.sum(labels == c) for c in classes])
        assert counts.sum() == rows and set(np.unique(labels)) <= set(classes)
        assert counts.min() == rows // len(classes) and counts.max() - counts.min() <= 1
        again = memory.replay_labels(classes, rows=rows, seed=42, experience=3, step=10)
        np.testing.assert_array_equal(labels, again)  # a resumed run draws the same
    steps = [memory.replay_labels((2, 6, 1), rows=12, seed=42, experience=3, step=s)
             for s in range(4)]
    assert len({tuple(s) for s in steps}) > 1  # the order changes from step to step
    extra = [tuple(np.flatnonzero(np.bincount(memory.replay_labels(
        (0, 1, 2, 3, 4), rows=7, seed=42, experience=1, step=s), minlength=5) == 2))
        for s in range(10)]
    assert len(set(extra)) > 1  # which classes get the remainder is drawn
    with pytest.raises(ValueError, match="at least one experience"):
        memory.replay_labels((), rows=4, seed=0, experience=0, step=0)


def test_er_memory_labels_are_the_memory_images_labels():
    g = np.random.default_rng(0)
    images = g.uniform(-1, 1, (50, 4, 4, 1)).astype(np.float32)
    labels = np.arange(50) % 7
    buffer = g.choice(50, 20, replace=False)
    rows = memory.memory_rows(images, buffer, rows=9, seed=3, experience=2, step=5)
    got = memory.memory_labels(labels, buffer, rows=9, seed=3, experience=2, step=5)
    index = [int(np.flatnonzero((images == row).all(axis=(1, 2, 3)))[0]) for row in rows]
    np.testing.assert_array_equal(got, labels[index])


# ----------------------------------------------------------------------------- sampling


def sample_denoise(params, x, t, labels=None):
    """A conditional model's apply_fn as gdjax.run builds it: no labels, the null label."""
    return denoise(params, x, t, jnp.full(len(x), NULL) if labels is None else labels)


def test_samples_asked_by_label_with_guidance_equal_float64():
    """`sampling.generate` with SampleLabels: row i gets classes[i mod n] (first_row
    included), guided at 2.5; the float64 guided DDIM from the same initial noise."""
    asked = sampling.SampleLabels((2, 0, 3), NULL, 2.5)
    key = jax.random.key(11)
    out = sampling.generate(sample_denoise, jax.tree.map(jnp.asarray, TEACHER), SCHEDULE, key,
                            num=7, image_shape=SHAPE, num_steps=3, batch_size=4, first_row=5)
    labelled = sampling.generate(sample_denoise, jax.tree.map(jnp.asarray, TEACHER), SCHEDULE,
                                 key, num=7, image_shape=SHAPE, num_steps=3, batch_size=4,
                                 first_row=5, labels=asked)
    rows = np.arange(5, 12)
    k_rows, _ = jax.random.split(key)
    x_init = np.stack([f64(jax.random.normal(jax.random.fold_in(k_rows, int(i)), SHAPE))
                       for i in rows])
    labels = np.array([2, 0, 3])[rows % 3]
    np.testing.assert_array_equal(asked.of_rows(rows), labels)
    for got, fn in ((labelled, lambda p, x, t: guided64(p, x, t, labels, 2.5)),
                    (out, lambda p, x, t: cond64(p, x, t, np.full(len(x), NULL)))):
        want = reverse_process64(TEACHER, x_init, np.zeros(7, np.int64), num_steps=3, eta=0.0,
                                 noises=np.zeros((3, 7) + SHAPE), denoise=fn)
        np.testing.assert_allclose(got, np.clip(want / 2 + 0.5, 0, 1), atol=2e-5)
    assert np.abs(labelled - out).max() > 0.01


# ----------------------------------------------------------------------------- the solver


def test_the_solvers_pool_asks_a_conditional_generator_for_balanced_labels():
    """solver.replay_pool with ReplayLabels: 9 labels balanced over the generator's classes
    (the stream "solver_replay_labels" at step 0, not the generator's own "replay_labels"),
    chunk i of 4 rows guided at 2.0 for labels 4i..4i+3, equal to the float64 guided DDIM
    from the same initial noise; without labels, the null label's samples."""
    asked = solver.ReplayLabels((3, 0, 1), NULL, 2.0)
    cfg = solver.SolverConfig(batch_size=4, replay_size=4, gen_steps=3, replay_pool=9)
    params = jax.tree.map(jnp.asarray, TEACHER)
    pool = solver.replay_pool(cfg, sample_denoise, params, SCHEDULE, seed=5, experience=2,
                              image_shape=SHAPE, batch_size=4, gen_labels=asked)
    plain = solver.replay_pool(cfg, sample_denoise, params, SCHEDULE, seed=5, experience=2,
                               image_shape=SHAPE, batch_size=4)
    labels = memory.replay_labels((3, 0, 1), rows=9, seed=5, experience=2, step=0,
                                  stream="solver_replay_labels")
    np.testing.assert_array_equal(asked.draw(9, seed=5, experience=2, step=0), labels)
    np.testing.assert_array_equal(np.bincount(labels, minlength=4), [3, 3, 0, 3])
    assert not np.array_equal(labels, memory.replay_labels((3, 0, 1), rows=9, seed=5,
                                                           experience=2, step=0))
    base = jax.random.fold_in(jax.random.fold_in(jax.random.key(5), 19), 2)  # solver_pool
    x_init = np.concatenate([f64(jax.random.normal(jax.random.fold_in(base, i), (4,) + SHAPE))
                             for i in range(3)])[:9]
    for got, fn in ((pool, lambda p, x, t: guided64(p, x, t, labels, 2.0)),
                    (plain, lambda p, x, t: cond64(p, x, t, np.full(len(x), NULL)))):
        want = reverse_process64(TEACHER, x_init, np.zeros(9, np.int64), num_steps=3, eta=0.0,
                                 noises=np.zeros((3, 9) + SHAPE), denoise=fn)
        np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.abs(pool - plain).max() > 0.01


def test_the_solvers_fresh_replay_asks_for_each_steps_labels(monkeypatch):
    """Without a pool, every solver step of an experience gets its own balanced labels
    (ReplayLabels.draw at the experience's step count), and the compiled step generates its
    replay rows for them: the same rows as the float64 guided DDIM of those labels. The next
    experience, with more classes, reuses the compiled step."""
    asked = solver.ReplayLabels((2, 1), NULL, 1.5)
    shape = (16, 16, 1)  # the SimpleCNN's smallest input
    cfg = solver.SolverConfig(batch_size=4, replay_size=3, gen_steps=2, epochs=2)
    seen = []  # what the step's replay generation was given
    real = solver.generate_replay

    def recording(*args, **kw):
        x = real(*args, **kw)
        jax.debug.callback(lambda *a: seen.append(tuple(map(np.asarray, a))),
                           jax.random.key_data(args[3]), kw["labels"], x)
        return x

    monkeypatch.setattr(solver, "generate_replay", recording)
    state = solver.init_state(cfg, jax.random.key(0), shape)
    images = np.random.default_rng(0).uniform(-1, 1, (6,) + shape).astype(np.float32)
    state, _ = solver.train_experience(
        cfg, state, images=images, labels=np.arange(6) % 4, experience=3, seed=7,
        with_replay=True, gen_apply=sample_denoise, gen_params=jax.tree.map(jnp.asarray, TEACHER),
        schedule=SCHEDULE, gen_labels=asked)
    assert len(seen) == 4  # 2 epochs of 2 steps (6 images, batch 4, the last partial)
    for step, (key, labels, x) in enumerate(seen):
        want_labels = memory.replay_labels((2, 1), rows=3, seed=7, experience=3, step=step,
                                           stream="solver_replay_labels")
        np.testing.assert_array_equal(labels, want_labels)
        x_init = f64(jax.random.normal(jax.random.wrap_key_data(key), (3,) + shape))
        want = reverse_process64(TEACHER, x_init, np.zeros(3, np.int64), num_steps=2, eta=0.0,
                                 noises=np.zeros((2, 3) + shape),
                                 denoise=lambda p, x, t: guided64(p, x, t, want_labels, 1.5))
        np.testing.assert_allclose(x, want, atol=2e-5)
    assert len({labels.tobytes() for _, labels, _ in seen}) > 1
    # the next experience's classes differ, its compiled step does not
    made = solver.make_step.cache_info().misses
    solver.train_experience(cfg, state, images=images, labels=np.arange(6) % 4, experience=4,
                            seed=7, with_replay=True, gen_apply=sample_denoise,
                            gen_params=jax.tree.map(jnp.asarray, TEACHER), schedule=SCHEDULE,
                            gen_labels=asked._replace(classes=(2, 1, 0)))
    assert solver.make_step.cache_info().misses == made and len(seen) == 8
    assert set(np.concatenate([labels for _, labels, _ in seen[4:]])) == {0, 1, 2}


# ----------------------------------------------------------------------------- settings


def test_settings_and_the_models_labels():
    c = tiny_config("full_generation_distillation")
    c.model.class_conditional = True
    r = run_lib.build(c, "/nonexistent")
    assert r.settings.unet.num_class_embeds == 11 and r.settings.null_label == 10  # 10 digits
    # 2 experiences of 5 digits: the samples after the second are asked for all ten
    assert r.sample_labels(1) == sampling.SampleLabels(
        tuple(r.experiences[0]) + tuple(r.experiences[1]), 10, 1.0)
    # the solver's replay asks the previous generator for its classes, at its guidance
    assert r.solver_replay_labels(0) is None
    assert r.solver_replay_labels(1) == solver.ReplayLabels(tuple(r.experiences[0]), 10, 1.0)
    assert run_lib.build(tiny_config(), "/nonexistent").solver_replay_labels(1) is None
    labels = r.replay_labels(1, step=3, rows=8)  # the teacher's 5 classes in 8 rows
    counts = np.bincount(labels, minlength=10)[list(r.experiences[0])]
    assert counts.sum() == 8 and counts.min() == 1 and counts.max() == 2
    # the unconditional prediction of a conditional model is its null label's
    params = unet.init_params(r.settings.unet, jax.random.key(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 1)), jnp.float32)
    t = jnp.array([5, 900])
    np.testing.assert_array_equal(r.apply_fn(params, x, t),
                                  r.apply_fn(params, x, t, jnp.array([10, 10])))
    bad = [("train", "label_dropout", 1.0, "train.label_dropout=1.0"),
           ("eval", "guidance_scale", -1.0, "eval.guidance_scale=-1.0"),
           ("strategy", "teacher_guidance", float("nan"), "strategy.teacher_guidance=nan")]
    for section, key, value, message in bad:
        c = tiny_config()
        setattr(getattr(c, section), key, value)
        with pytest.raises(ValueError, match=message.replace(".", r"\.")):
            run_lib.settings_from_config(c)
    c = tiny_config("gaussian_distillation")
    c.model.class_conditional, c.train.mode = True, "iid_distill"
    with pytest.raises(ValueError, match="iid_distill"):
        run_lib.settings_from_config(c)


# ----------------------------------------------------------------------------- whole runs


@pytest.mark.slow  # three tiny whole runs per strategy (~40 s)
@pytest.mark.parametrize("name", [strategies.FULL_GENERATION, strategies.ER])
def test_a_conditional_run_compiles_once_and_resumes_bitwise(name, tmp_path, monkeypatch):
    """A conditional run of 5 experiences: each step function compiles once, the replay
    batches carry the teacher's classes, and a run killed inside experience 2 resumes to
    the uninterrupted run's params and metric rows."""

    c = tiny_config(name)
    c.model.class_conditional, c.data.n_experiences = True, 5
    c.strategy.teacher_guidance = 1.5
    seen = []  # (experience, replay labels) of every replay batch made
    real = Run.memory_batch if name == strategies.ER else Run.replay_labels

    def recording(run, *args):
        out = real(run, *args)
        seen.append((args[1] if name == strategies.ER else args[0],
                     out["replay_label"] if name == strategies.ER else out))
        return out

    run_lib._compiled_step.cache_clear()  # this test's own compilations
    with monkeypatch.context() as patch:
        patch.setattr(Run, "memory_batch" if name == strategies.ER else "replay_labels",
                      recording)
        with recording_compilations() as compilations:
            whole = continual.train(c, str(tmp_path / "whole"))
    assert compilations["train_step"] == 2  # the plain step and the replay step
    run = run_lib.build(c, str(tmp_path / "whole"))
    assert sorted({k for k, _ in seen}) == [1, 2, 3, 4] and len(seen) == 16
    for k, labels in seen:
        teacher = {int(x) for e in run.experiences[:k] for x in e}
        assert labels.shape == (8,) and set(labels.tolist()) <= teacher
    resumed = killed_then_resumed(c, str(tmp_path / "killed"), monkeypatch, at=(2, 3))
    for a, b in zip(leaves(resumed.params), leaves(whole.params)):
        np.testing.assert_array_equal(a, b)
    assert read_metrics(tmp_path / "killed", "train") == read_metrics(tmp_path / "whole", "train")

