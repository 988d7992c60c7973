"""Trajectory distillation: the student regresses onto the teacher's predictions at the
intermediate samples of its reverse process, recomputed outside the step in float64.

The toy per-pixel linear denoiser and the step's draws come from test_strategy_options.py:
the teacher's reverse process to each row's own timestep is run in float64 numpy with every
state kept, and each replay row the student saw must be one of its own row's states, its
target the teacher's eps there.
"""

import jax
import numpy as np
import pytest

from gdjax import compute, strategies
from gdjax.strategies import StrategyConfig
from tests.test_strategy_options import (ALPHA_BAR, LAMBD, SCHEDULE, STUDENT, TEACHER, Draws,
                                         add_noise64, denoise64, one_step)


def trajectory64(params, x, targets, *, num_steps):
    """The float64 reverse process of test_strategy_options, every step's (x, t) kept."""
    k = np.asarray(targets, np.int64)
    ratio = (1000 - k) / num_steps
    table = np.round(np.outer(np.arange(num_steps, 0, -1), ratio)).astype(np.int64) - 1 + k
    prev = table - (1000 - k) // num_steps
    states = []
    for i in range(num_steps):
        t, t_prev = table[i], prev[i]
        states.append((x, t))
        e = denoise64(params, x, t)
        a_t = ALPHA_BAR[t][:, None, None, None]
        a_prev = np.where(t_prev >= 0, ALPHA_BAR[np.maximum(t_prev, 0)], 1.0)[:, None, None, None]
        x0 = np.clip((x - np.sqrt(1 - a_t) * e) / np.sqrt(a_t + 1e-8), -1, 1)
        new = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * e
        moved = np.ones_like(t, bool) if i == 0 else t != table[i - 1]
        x = np.where(moved[:, None, None, None], new, x)
    return states


@pytest.mark.parametrize("steps", [3, 5])
def test_rows_are_states_of_the_teachers_process_and_targets_its_predictions(steps):
    b = r = 32
    cfg = StrategyConfig(strategies.TRAJECTORY, lambd=LAMBD, teacher_steps=steps)
    images, _, metrics, (x, t) = one_step(cfg, b)
    d = Draws(b, r, num_steps=steps)
    states = trajectory64(TEACHER, d.start, d.replay_t, num_steps=steps)
    x_replay, t_replay = x[b:].astype(np.float64), t[b:]
    picked = []
    for row in range(r):
        match = [j for j, (xs, ts) in enumerate(states)
                 if ts[row] == t_replay[row] and np.abs(xs[row] - x_replay[row]).max() < 2e-5]
        assert match, f"replay row {row} is none of its trajectory's states"
        picked.append(match[-1])
    assert len(set(picked)) == steps  # 32 rows: every step drawn (chance of missing one < 1%)
    assert t_replay.max() == 999 and (t_replay >= d.replay_t).all()  # on the way to the stop
    target = denoise64(TEACHER, x_replay, t_replay)
    x_t = add_noise64(images, d.eps, d.t)
    data = np.mean((denoise64(STUDENT, x_t, d.t) - d.eps) ** 2)
    replay = np.mean((denoise64(STUDENT, x_replay, t_replay) - target) ** 2)
    for key, want in (("data_loss", data), ("replay_loss", replay),
                      ("loss", data / 3 + 2 / 3 * LAMBD * replay)):
        assert float(metrics[key]) == pytest.approx(want, rel=1e-5), key


def test_its_targets_cost_no_forward_beyond_the_process():
    """teacher_steps forwards a replay row (the targets are the scan's own predictions),
    against full generation distillation's teacher_steps + 1, counted from the jaxpr."""
    apply_fn = lambda params, x, t: x @ params["w"]  # noqa: E731  (a counted matmul)
    teacher = {"w": jax.ShapeDtypeStruct((1, 1), np.float32)}

    def teacher_flops(name):
        cfg = StrategyConfig(name, teacher_steps=3)
        return compute.flops(lambda p: strategies.replay_rows(
            cfg, apply_fn=apply_fn, teacher_params=p, schedule=SCHEDULE,
            rng=jax.random.key(0), image_shape=(4, 8, 8, 1)), teacher)

    per_forward = 2 * 4 * 8 * 8  # a multiply and an add per pixel of the 4 rows
    traj, full = teacher_flops(strategies.TRAJECTORY), teacher_flops(strategies.FULL_GENERATION)
    assert full - traj == per_forward

