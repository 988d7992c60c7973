"""Tests of the moving average of the params (train.ema_decay, train.ema_teacher): the
average after n steps equals a float64 recursion over the params each step produced; it is
what the evaluation scores and, with ema_teacher, the next experience's teacher; a run
killed inside an experience resumes to the same bits."""

import jax
import numpy as np
import pytest

from gdjax import continual
from gdjax.logs import read_metrics
from gdjax.run import build, settings_from_config
from gdjax.state import initial_state
from tests.helpers import killed_then_resumed, leaves, tiny_config

DECAY = 0.9


def test_the_average_is_the_float64_recursion_over_the_steps_params(tmp_path):
    run = build(tiny_config("naive", ema_decay=DECAY), str(tmp_path))
    ls = initial_state(run)
    step = run.step(False)
    averaged = [np.asarray(v, np.float64) for v in leaves(ls.train.params)]
    rng = np.random.default_rng(0)
    state = ls.train
    for _ in range(5):
        images = rng.uniform(-1, 1, (8, *run.image_shape)).astype(np.float32)
        state, _ = step(state, ls.teacher, {"image": images}, ls.key)
        params = [np.asarray(v, np.float64) for v in leaves(state.params)]
        averaged = [DECAY * e + (1 - DECAY) * p for e, p in zip(averaged, params)]
    got = leaves(state.ema)
    assert len(got) == len(averaged)
    for e, want in zip(got, averaged):
        np.testing.assert_allclose(e, want, rtol=1e-5, atol=1e-6)
    assert max(np.abs(e - p).max() for e, p in zip(got, leaves(state.params))) > 1e-4


@pytest.mark.slow  # a whole run (about 45 s); the recursion above stays in the fast set
def test_the_average_is_evaluated_and_becomes_the_teacher(tmp_path, monkeypatch):
    c = tiny_config("full_generation_distillation", ema_decay=DECAY, ema_teacher=True)
    scored = {}

    def hook(run, k, params):
        scored[k] = leaves(params)
        return {"kld": 0.0}

    seen = {}
    real = continual.train_experience

    def spying(loop, ls, k, start):
        if k == 1:
            seen["teacher"], seen["params"] = leaves(ls.teacher), leaves(ls.train.params)
        out = real(loop, ls, k, start)
        seen[k] = (leaves(out.train.ema), leaves(out.train.params))
        return out

    monkeypatch.setattr(continual, "train_experience", spying)
    continual.train(c, str(tmp_path), eval_hook=hook)
    for k in (0, 1):  # the evaluation scores the average, not the params
        for a, b in zip(scored[k], seen[k][0]):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(seen["teacher"], seen[0][0]):  # the teacher: experience 0's average
        np.testing.assert_array_equal(a, b)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(seen["teacher"], seen["params"]))
    assert len(read_metrics(tmp_path, "experience")) == 2


@pytest.mark.slow  # two whole runs
def test_a_run_with_an_average_killed_mid_experience_resumes_bitwise(tmp_path, monkeypatch):
    c = tiny_config("full_generation_distillation", ema_decay=DECAY, ema_teacher=True)
    whole = continual.train(c, str(tmp_path / "whole"))
    resumed = killed_then_resumed(c, str(tmp_path / "killed"), monkeypatch, at=(1, 3))
    for a, b in zip(leaves((resumed.params, resumed.ema)), leaves((whole.params, whole.ema))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("overrides, message", [
    (dict(ema_decay=1.0), r"train.ema_decay=1.0 must be in \[0, 1\)"),
    (dict(ema_teacher=True), "set train.ema_decay"),
])
def test_bad_average_settings_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        settings_from_config(tiny_config(**overrides))


def test_no_average_by_default(tmp_path):
    # None: no leaves, so the checkpoints of runs without one keep their layout.
    ema = initial_state(build(tiny_config(), str(tmp_path))).train.ema
    assert ema is None and jax.tree.leaves(ema) == []
