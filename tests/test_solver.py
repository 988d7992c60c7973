"""The classifier trained with generative replay (REFERENCE §6): its loss, its compiled step,
and its place in the experience loop (classifier first, accuracy and forgetting per row)."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdjax import continual, ddim, unet
from gdjax.run import build, model_apply_fn, settings_from_config
from gdjax.eval import classifier as cls
from gdjax.eval import solver
from gdjax.logs import read_metrics
from gdjax.schedule import make_schedule
from tests.helpers import leaves, tiny_config


def softmax64(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def replay_loss64(student, teacher, T, direction="reference"):
    """In float64. "reference" (REFERENCE §6, the authors' direction):
    T^2 * mean(-sum softmax(student/T) * log_softmax(teacher/T)); "forward" swaps them."""
    if direction == "forward":
        student, teacher = teacher, student
    return T**2 * np.mean(-np.sum(softmax64(student / T) * np.log(softmax64(teacher / T)), -1))


def test_replay_loss_is_the_references_formula_and_direction():
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(6, 10)) * 3, rng.normal(size=(6, 10)) * 3
    got = solver.replay_loss(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32),
                             2.0)
    assert float(got) == pytest.approx(replay_loss64(student, teacher, 2.0), rel=1e-5)
    # The baseline's direction: swapping the arguments gives another number, the forward
    # (knowledge distillation's) loss.
    assert abs(replay_loss64(teacher, student, 2.0) - float(got)) > 0.1
    forward = solver.replay_loss(jnp.asarray(student, jnp.float32),
                                 jnp.asarray(teacher, jnp.float32), 2.0, direction="forward")
    assert float(forward) == pytest.approx(replay_loss64(teacher, student, 2.0), rel=1e-5)
    with pytest.raises(ValueError, match="solver.replay_loss='backward' is unknown"):
        solver.SolverConfig(replay_loss="backward")
    # Hand-checked: two classes, equal teacher logits -> log_softmax = log(1/2) for both,
    # so the loss is T^2 * log 2 whatever the student predicts.
    same = solver.replay_loss(jnp.array([[5.0, -1.0]]), jnp.array([[0.3, 0.3]]), 2.0)
    assert float(same) == pytest.approx(4 * np.log(2), rel=1e-6)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_solver_loss_weights_real_and_replay_rows(k):
    rng = np.random.default_rng(1)
    logits, replay, teacher = (rng.normal(size=(4, 10)) for _ in range(3))
    labels = np.array([0, 3, 3, 9])
    ce = np.mean(-np.log(softmax64(logits)[np.arange(4), labels]))
    want = ce / (k + 1) + (1 - 1 / (k + 1)) * replay_loss64(replay, teacher, 2.0)
    logits, replay, teacher = (jnp.asarray(a, jnp.float32) for a in (logits, replay, teacher))
    got = solver.solver_loss(logits, jnp.asarray(labels), replay, teacher,
                             experience=jnp.int32(k), temperature=2.0)
    assert float(got) == pytest.approx(want, rel=1e-5)


@pytest.fixture(scope="module")
def generator():
    config = unet.get_unet_config("tiny")
    return model_apply_fn(config), unet.init_params(config, jax.random.key(3))


@pytest.mark.parametrize("real, direction", [(4, "forward"), (2, "forward"), (4, "reference")])
def test_step_replays_the_previous_generator_labelled_by_the_previous_solver(generator, real,
                                                                           direction):
    """The loss the compiled step minimises equals the formula on replay images and teacher
    labels recomputed outside it; the frozen inputs come out bitwise unchanged. With 2 real
    rows of 4 (an epoch's padded last batch) the means run over those 2 and over the first
    ceil(3 * 2 / 4) = 2 of the 3 replay rows."""
    gen_apply, gen_params = generator
    cfg = solver.SolverConfig(batch_size=4, replay_size=3, gen_steps=2, replay_loss=direction)
    schedule = make_schedule()
    state = solver.init_state(cfg, jax.random.key(0), (16, 16, 1))
    teacher = cls.init_classifier(jax.random.key(1), (16, 16, 1), 10)  # another network
    state = state._replace(teacher=teacher)
    images = np.random.default_rng(2).uniform(-1, 1, (4, 16, 16, 1)).astype(np.float32)
    labels = np.array([1, 2, 2, 7], np.int32)
    rng, experience = jax.random.key(9), 2
    before = [np.array(x) for x in leaves((state.params, teacher, gen_params))]
    n_params = len(leaves(state.params))

    k_gen, k_drop = jax.random.split(rng)
    x_init = jax.random.normal(k_gen, (3, 16, 16, 1))
    replay = ddim.reverse_process(lambda x, t: gen_apply(gen_params, x, t), schedule, x_init,
                                  num_steps=2)
    model = cls.SimpleCNN()
    logits = model.apply({"params": state.params}, jnp.concatenate([images, replay]),
                         train=True, rngs={"dropout": k_drop})
    teacher_logits = model.apply({"params": teacher}, replay)
    ce = np.mean(-np.log(softmax64(logits[:4])[np.arange(4), labels]))
    want = ce / 3 + (2 / 3) * replay_loss64(logits[4:], teacher_logits, 2.0, direction)

    if real < 4:
        kept = -(-3 * real // 4)
        ce = np.mean(-np.log(softmax64(logits[:real])[np.arange(real), labels[:real]]))
        want = ce / 3 + (2 / 3) * replay_loss64(logits[4:4 + kept], teacher_logits[:kept], 2.0,
                                                direction)
        images[real:] = 7.0  # padding rows: whatever they hold counts for nothing
    mask = (np.arange(4) < real).astype(np.float32)
    step = solver.make_step(cfg, gen_apply, True)
    new_state, loss = step(state, gen_params, schedule, images, labels, mask,
                           jnp.int32(experience), rng)
    assert float(loss) == pytest.approx(want, rel=1e-4)
    assert np.abs(np.asarray(replay)).max() <= 1.0  # raw sampler output, clipped x0
    after = leaves((new_state.teacher, gen_params))
    for a, b in zip(after, before[n_params:]):  # state was donated: compare with copies
        np.testing.assert_array_equal(a, b)
    moved = [not np.array_equal(a, b) for a, b in zip(leaves(new_state.params), before)]
    assert all(moved)
    # solver.replay_pool: the same rows handed in ready give the same loss, bit for bit.
    pooled = solver.make_step(cfg, None, True, pooled=True)
    teacher = cls.init_classifier(jax.random.key(1), (16, 16, 1), 10)  # the first was donated
    state = solver.init_state(cfg, jax.random.key(0), (16, 16, 1))._replace(teacher=teacher)
    _, pooled_loss = pooled(state, replay, None, images, labels, mask, jnp.int32(experience),
                            rng)
    assert float(pooled_loss) == float(loss)


def test_bad_solver_settings_are_named(tmp_path):
    c = tiny_config(solver=True)
    c.solver.strategy = "replay"
    with pytest.raises(ValueError, match="solver.strategy='replay'"):
        continual.train(c, str(tmp_path / "a"))
    c = tiny_config(solver=True)
    c.solver.temperature = 0.0
    with pytest.raises(ValueError, match="solver.temperature"):
        continual.train(c, str(tmp_path / "b"))


@pytest.mark.parametrize("strategy,solver_strategy", [
    ("full_generation_distillation", "generative_replay"), ("naive", "naive"),
    ("cumulative", "cumulative")])
def test_auto_solver_follows_the_generator(strategy, solver_strategy):
    assert settings_from_config(tiny_config(strategy, solver=True)).solver.strategy == \
        solver_strategy
    c = tiny_config(strategy, solver=True)
    c.solver.enabled = False
    assert settings_from_config(c).solver is None


def test_loop_trains_the_solver_first_and_logs_accuracy_and_forgetting(tmp_path, monkeypatch):
    """Per experience: the solver trains before the generator's first step (replaying from
    the generator frozen at the boundary), and the row holds accuracies on the classes seen
    and avalanche's forgetting, recomputed here from the logged per-experience accuracies."""
    order = []
    real_train_solver, real_train_experience = continual.train_solver, continual.train_experience

    def train_solver(loop, ls, k):
        order.append(("solver", k, loop.run.settings.strategy.name))
        # Its replay generator is the frozen teacher: the params the generator ended k-1 with.
        if k > 0:
            for a, b in zip(leaves(ls.teacher), leaves(ls.train.params)):
                np.testing.assert_array_equal(a, b)
        return real_train_solver(loop, ls, k)

    monkeypatch.setattr(continual, "train_solver", train_solver)
    monkeypatch.setattr(continual, "train_experience",
                        lambda loop, ls, k, start: (order.append(("generator", k)),
                                                    real_train_experience(loop, ls, k, start))[1])
    workdir = str(tmp_path / "run")
    continual.train(tiny_config(solver=True), workdir)
    assert [o[:2] for o in order] == [("solver", 0), ("generator", 0), ("solver", 1),
                                      ("generator", 1)]
    rows = read_metrics(workdir, "experience")
    for row in rows:
        accs = [row[f"classifier_acc_exp_{j}"] for j in range(row["experience"] + 1)]
        assert all(0.0 <= a <= 1.0 for a in accs)
        assert 0.0 <= row["classifier_accuracy"] <= 1.0
    assert rows[0]["classifier_forgetting"] == 0.0
    assert rows[1]["classifier_forgetting"] == pytest.approx(
        rows[0]["classifier_acc_exp_0"] - rows[1]["classifier_acc_exp_0"])
    # After one epoch (22 steps) on the first five classes it is well above chance (0.2).
    assert rows[0]["classifier_acc_exp_0"] > 0.3


class FakeSteps:
    """Stands in for solver.make_step, so that nothing compiles: records how each step was
    made and what it was given, and returns `losses` one per step (1.0 when not given)."""

    def __init__(self, losses=()):
        self.made, self.calls, self.losses = [], [], list(losses)

    def __call__(self, cfg, gen_apply, with_replay, mesh=None, pooled=False, gen_labels=None):
        self.made.append((gen_apply, with_replay) + ((True,) if pooled else ()))

        def step(state, gen_params, schedule, images, labels, mask, experience, rng):
            self.calls.append(dict(state=state, gen_params=gen_params, schedule=schedule,
                                   images=np.asarray(images), labels=np.asarray(labels),
                                   mask=np.asarray(mask), experience=int(experience)))
            i = len(self.calls) - 1
            return state, jnp.float32(self.losses[i] if self.losses else 1.0)

        return step


def _pairs(images, labels):
    """The multiset of (image bytes, label) rows."""
    return collections.Counter((x.tobytes(), int(y)) for x, y in zip(images, labels))


@pytest.mark.parametrize("strategy", ["naive", "cumulative", "full_generation_distillation"])
def test_solver_data_and_replay_follow_its_strategy(strategy, tmp_path, monkeypatch):
    """Through solver.learn_experience, experience by experience: the naive and the
    generative-replay solver see experience k's training rows only, the cumulative one those
    of experiences 0..k, each row exactly once per epoch (the last batch partial, padded and
    masked); only generative replay, from k = 1, gets the replay step and the frozen
    previous generator."""
    run = build(tiny_config(strategy, solver=True), str(tmp_path))
    fake = FakeSteps()
    monkeypatch.setattr(solver, "make_step", fake)
    previous_generator, params = {"w": jnp.arange(3.0)}, {"w": jnp.ones(2)}
    # A stand-in solver state: the real network's init would compile for seconds.
    state = solver.SolverState(params, None, None)
    cfg = run.settings.solver
    for k in range(len(run.experiences)):
        classes = (np.concatenate(run.experiences[:k + 1]) if strategy == "cumulative"
                   else np.asarray(run.experiences[k]))
        mask = np.isin(run.train.labels, classes)
        allowed = _pairs(run.train.images[mask], run.train.labels[mask])
        fake.calls.clear()
        solver.learn_experience(cfg, state, train=run.train, experiences=run.experiences,
                                experience=k, seed=0, gen_apply=run.apply_fn,
                                gen_params=previous_generator, schedule=run.schedule)
        replay = strategy == "full_generation_distillation" and k > 0
        assert fake.made[-1] == ((run.apply_fn, True) if replay else (None, False))
        assert all(c["experience"] == k for c in fake.calls)
        assert all(c["gen_params"] is (previous_generator if replay else None) and
                   c["schedule"] is (run.schedule if replay else None) for c in fake.calls)
        given = sum((_pairs(c["images"][c["mask"] > 0], c["labels"][c["mask"] > 0])
                     for c in fake.calls), collections.Counter())
        assert given == allowed  # every row once: none from elsewhere, none twice, none left
        n, b = int(mask.sum()), cfg.batch_size
        np.testing.assert_array_equal([c["mask"].sum() for c in fake.calls],
                                      [b] * (n // b) + ([n % b] if n % b else []))
        # The previous solver is frozen first: the teacher that labels replay is a copy.
        np.testing.assert_array_equal(fake.calls[0]["state"].teacher["w"], params["w"])


def test_a_non_finite_solver_loss_stops_naming_experience_epoch_and_step(monkeypatch):
    """10 images in batches of 4: 3 steps per epoch (the last of 2 rows). The loss turns NaN
    at the second step of epoch 1 (solver step 4): the run stops at the end of that epoch,
    before epoch 2."""
    fake = FakeSteps([1.0, 0.9, 0.8, 0.7, float("nan"), 0.6, 0.5])
    monkeypatch.setattr(solver, "make_step", fake)
    epochs_done = []
    progress = type("P", (), {"update": lambda self, n: epochs_done.append(n)})()
    cfg = solver.SolverConfig(strategy="naive", epochs=3, batch_size=4)
    with pytest.raises(solver.NonFiniteSolverLossError) as e:
        solver.train_experience(cfg, solver.SolverState({"w": jnp.ones(2)}, None, None),
                                images=np.zeros((10, 2, 2, 1), np.float32),
                                labels=np.zeros(10, np.int32), experience=3, seed=0,
                                with_replay=False, progress=progress)
    message = str(e.value)
    assert message.startswith("non-finite solver loss (nan) at experience 3, epoch 1, step 1 "
                              "of the epoch (solver step 4 of the experience; 1 of the epoch's "
                              "3 steps")
    assert "Lower solver.learning_rate" in message and "solver.enabled=False" in message
    assert len(fake.calls) == 6 and epochs_done == [1]
    # inf counts too; finite losses pass.
    with pytest.raises(solver.NonFiniteSolverLossError, match=r"\(inf\) at experience 0, "
                       r"epoch 2, step 0 of the epoch \(solver step 8 of"):
        solver.check_finite([np.inf, 1.0], experience=0, epoch=2, first_step=8)
    solver.check_finite(np.array([1.0, 1e30], np.float32), experience=0, epoch=0, first_step=0)


def test_solver_epochs_visit_every_row_once_and_flip_like_the_generator(monkeypatch):
    """10 images at batch 4: steps of 4, 4 and 2 real rows (padded to 4, mask 0 on the
    padding); each epoch's order is the "solver_order" stream at (experience, epoch); with
    `flip` each row is mirrored where the "solver_flip" stream at (experience, epoch, step)
    draws < 0.5, as data.flip does for the generator's rows (CIFAR-10)."""
    fake = FakeSteps()
    monkeypatch.setattr(solver, "make_step", fake)
    images = np.random.default_rng(4).uniform(-1, 1, (10, 3, 3, 1)).astype(np.float32)
    labels = np.arange(10, dtype=np.int32)
    cfg = solver.SolverConfig(strategy="naive", epochs=2, batch_size=4)
    solver.train_experience(cfg, solver.SolverState({"w": jnp.ones(2)}, None, None),
                            images=images, labels=labels, experience=1, seed=5,
                            with_replay=False, flip=True)
    assert len(fake.calls) == 6
    flipped = 0
    for epoch in range(2):
        calls = fake.calls[3 * epoch:3 * epoch + 3]
        np.testing.assert_array_equal([c["mask"].sum() for c in calls], [4, 4, 2])
        assert not calls[2]["images"][2:].any() and list(calls[2]["mask"]) == [1, 1, 0, 0]
        order = np.random.default_rng([5, 14, 2, 1, epoch]).permutation(10)
        seen = np.concatenate([c["labels"][c["mask"] > 0] for c in calls])
        np.testing.assert_array_equal(seen, order)
        for i, c in enumerate(calls):
            n = int(c["mask"].sum())
            flips = np.random.default_rng([5, 15, 3, 1, epoch, i]).random(n) < 0.5
            want = images[c["labels"][:n]].copy()
            want[flips] = want[flips][:, :, ::-1]
            np.testing.assert_array_equal(c["images"][:n], want)
            flipped += flips.sum()
    assert 0 < flipped < 20
    fake.calls.clear()
    solver.train_experience(cfg, solver.SolverState({"w": jnp.ones(2)}, None, None),
                            images=images, labels=labels, experience=1, seed=5,
                            with_replay=False, drop_last=True)
    assert [int(c["mask"].sum()) for c in fake.calls] == [4, 4, 4, 4]


def test_simple_cnn_starts_as_torch_initialises_it():
    """REFERENCE §6: torch's default for Conv2d and Linear, weights and biases
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the bound is checked against torch's own layers."""
    torch = pytest.importorskip("torch")
    params = cls.init_classifier(jax.random.key(0), (16, 16, 1), 10)
    torch.manual_seed(0)
    reference = {"conv1": torch.nn.Conv2d(1, 32, 3), "conv2": torch.nn.Conv2d(32, 32, 3),
                 "conv3": torch.nn.Conv2d(32, 64, 3), "conv4": torch.nn.Conv2d(64, 128, 3),
                 "conv5": torch.nn.Conv2d(128, 128, 1), "head": torch.nn.Linear(128, 10)}
    assert sorted(params) == sorted(reference)
    for name, layer in reference.items():
        bound = 1 / np.sqrt(np.prod(layer.weight.shape[1:]))
        for ours, theirs in ((params[name]["kernel"], layer.weight), (params[name]["bias"],
                                                                      layer.bias)):
            ours, theirs = np.asarray(ours), theirs.detach().numpy()
            assert ours.size == theirs.size
            assert np.abs(theirs).max() <= bound and np.abs(ours).max() <= bound
            # Uniform over the whole range: both reach near the bound, std bound / sqrt(3).
            assert np.abs(ours).max() > 0.7 * bound and np.abs(theirs).max() > 0.7 * bound
            if ours.size >= 1000:
                assert np.std(ours) == pytest.approx(bound / np.sqrt(3), rel=0.05)
                assert np.std(theirs) == pytest.approx(bound / np.sqrt(3), rel=0.05)
    other = cls.init_classifier(jax.random.key(1), (16, 16, 1), 10)
    assert not np.array_equal(other["conv1"]["bias"], params["conv1"]["bias"])


def test_replay_pool_is_drawn_once_per_experience_and_visited_every_epoch(generator,
                                                                         monkeypatch):
    """solver.replay_pool = 7 with 3 replay rows a step: the pool is the previous generator's
    samples in chunks of 3 (chunk i from the "solver_pool" key at (experience, i)), cut to
    7; each step gets 3 of its rows in the epoch's "solver_pool_order" order, wrapping
    around; the compiled step is the pooled one, and the generator is not run per step."""
    gen_apply, gen_params = generator
    schedule = make_schedule()
    cfg = solver.SolverConfig(batch_size=4, replay_size=3, gen_steps=2, replay_pool=7, epochs=2)
    pool = solver.replay_pool(cfg, gen_apply, gen_params, schedule, seed=5, experience=2,
                              image_shape=(16, 16, 1), batch_size=4)
    base = jax.random.fold_in(jax.random.fold_in(jax.random.key(5), 19), 2)
    want = np.concatenate([solver.generate_replay(
        gen_apply, gen_params, schedule, jax.random.fold_in(base, i), shape=(3, 16, 16, 1),
        num_steps=2) for i in range(3)])[:7]
    assert pool.shape == (7, 16, 16, 1)
    np.testing.assert_allclose(pool, want, rtol=0, atol=1e-6)

    fake = FakeSteps()
    monkeypatch.setattr(solver, "make_step", fake)
    drawn = []
    monkeypatch.setattr(solver, "replay_pool",
                        lambda *a, **kw: (drawn.append(kw["experience"]), pool)[1])
    images = np.zeros((10, 16, 16, 1), np.float32)
    solver.train_experience(cfg, solver.SolverState({"w": jnp.ones(2)}, None, None),
                            images=images, labels=np.zeros(10, np.int32), experience=2, seed=5,
                            with_replay=True, gen_apply=gen_apply, gen_params=gen_params,
                            schedule=schedule)
    assert drawn == [2] and fake.made == [(None, True, True)]
    assert len(fake.calls) == 6  # 2 epochs of 3 steps
    for epoch in range(2):
        order = np.random.default_rng([5, 20, 2, 2, epoch]).permutation(7)
        got = np.concatenate([c["gen_params"] for c in fake.calls[3 * epoch:3 * epoch + 3]])
        np.testing.assert_array_equal(got, pool[order[np.arange(9) % 7]])
    assert all(c["schedule"] is None for c in fake.calls)
    with pytest.raises(ValueError, match=r"solver.replay_pool=-1 must be an integer >= 0 "
                       r"\(0: fresh replay images every step\)"):
        solver.SolverConfig(replay_pool=-1)
