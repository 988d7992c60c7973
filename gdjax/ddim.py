"""The DDIM sampler: trailing timestep grids, one DDIM step, and the reverse process.

The reverse process is a single `jax.lax.scan` over the rows of a timestep table, so it
traces once per (number of steps, input shape) and can run inside a jitted train step,
which is where the teacher's replay samples and distillation targets come from.

Grids follow the PyTorch baseline exactly (REFERENCE §2), including numpy's
round-half-to-even: they are computed on the host in float64 and, for per-sample stop
targets, looked up from a host-built [T, n] table with the traced targets as indices.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gdjax.schedule import Schedule

DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def _check_steps(num_steps: int, num_train_timesteps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not (
            1 <= num_steps <= num_train_timesteps):
        raise ValueError(
            f"num_steps={num_steps!r} is out of range: the DDIM sampler takes an integer "
            f"number of steps in 1..{num_train_timesteps}.")


def _check_targets(targets, num_train_timesteps: int) -> None:
    """Validates stop targets when their values are known on the host (not when traced)."""
    if isinstance(targets, jax.core.Tracer):
        return
    values = np.asarray(targets)
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"target steps must be integers, got dtype {values.dtype}.")
    if values.size and (values.min() < 0 or values.max() > num_train_timesteps - 1):
        raise ValueError(
            f"target step(s) {values.min()}..{values.max()} out of range: each must be in "
            f"0..{num_train_timesteps - 1} (0 generates a clean image).")


def timestep_grid(num_steps: int, target: int = 0, num_train_timesteps: int = 1000) -> np.ndarray:
    """The trailing grid for one stop target: int32 [num_steps], e.g. (10, 0) -> 999 899 ... 99."""
    _check_steps(num_steps, num_train_timesteps)
    _check_targets(target, num_train_timesteps)
    ratio = (num_train_timesteps - target) / num_steps
    grid = np.round(np.arange(num_train_timesteps, target, -ratio)).astype(np.int64) - 1
    return grid[:num_steps].astype(np.int32)


def timestep_table(num_steps: int, targets, num_train_timesteps: int = 1000) -> np.ndarray:
    """Per-sample grids (host, float64): int32 [num_steps, B] for targets of shape [B]."""
    _check_steps(num_steps, num_train_timesteps)
    targets = np.asarray(targets, dtype=np.int64)
    _check_targets(targets, num_train_timesteps)
    ratio = (num_train_timesteps - targets) / num_steps
    table = np.round(np.outer(np.arange(num_steps, 0, -1), ratio)).astype(np.int64)
    return (table - 1 + targets).astype(np.int32)


@functools.lru_cache(maxsize=32)
def _table_for_every_target(num_steps: int, num_train_timesteps: int) -> np.ndarray:
    """int32 [T, num_steps]: row k is the per-sample grid of stop target k."""
    return timestep_table(num_steps, np.arange(num_train_timesteps), num_train_timesteps).T.copy()


def _prev_timestep(t: jnp.ndarray, targets, num_steps: int, num_train_timesteps: int) -> jnp.ndarray:
    return t - (num_train_timesteps - targets) // num_steps


def _alpha_bar(schedule: Schedule, t: jnp.ndarray) -> jnp.ndarray:
    """alpha_bar[t], and 1.0 for t < 0 (the reference's set_alpha_to_one)."""
    return jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], 1.0)


def ddim_step(
    schedule: Schedule,
    x_t: jnp.ndarray,
    eps: jnp.ndarray,
    *,
    t: jnp.ndarray,
    t_prev: jnp.ndarray,
    eta: float = 0.0,
    noise: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """One DDIM update x_t -> x_{t_prev} (eps parameterisation; x0 clipped to [-1, 1] where
    `schedule.clip_sample`, as in the reference).

    `t` and `t_prev` are int arrays of shape [B]; `noise` (like x_t) is required when eta > 0.
    """
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    a_t = _alpha_bar(schedule, t).reshape(shape)
    a_prev = _alpha_bar(schedule, t_prev).reshape(shape)
    x0_hat = (x_t - jnp.sqrt(1.0 - a_t) * eps) / jnp.sqrt(a_t + 1e-8)
    if schedule.clip_sample:
        x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
    shrink = (1.0 - a_t / (a_prev + 1e-8)) / (1.0 - a_t)
    std = eta * jnp.sqrt((1.0 - a_prev) * shrink)
    # 1 - a_prev - std**2, factored so that it stays exactly 0 at eta = 1, t = T-1 in float32
    # (written as a difference it leaves ~1e-8, whose square root is visible in the output).
    direction = jnp.sqrt(jnp.clip((1.0 - a_prev) * (1.0 - eta**2 * shrink), 0.0, 1.0)) * eps
    x_prev = jnp.sqrt(a_prev) * x0_hat + direction
    if noise is not None:
        x_prev = x_prev + std * noise
    elif not (isinstance(eta, (int, float)) and eta == 0):
        raise ValueError("ddim_step with eta > 0 needs `noise` (a standard normal array like x_t).")
    return x_prev.astype(x_t.dtype)


class Trajectory(NamedTuple):
    """Every step of a reverse process: inputs x [n, B, ...], timesteps t [n, B], outputs eps."""

    x: jnp.ndarray
    t: jnp.ndarray
    eps: jnp.ndarray


def step_noise(rng: jax.Array, step: int | jnp.ndarray, shape, dtype=jnp.float32) -> jnp.ndarray:
    """The eta > 0 noise that `reverse_process` injects at step `step` (exposed for tests)."""
    return jax.random.normal(jax.random.fold_in(rng, step), shape, dtype)


def _grid_rows(num_steps: int, targets, batch: int, num_train_timesteps: int):
    """Timesteps [n, B] and previous timesteps [n, B] for scalar or per-sample targets."""
    if targets is None or (not isinstance(targets, jax.core.Tracer) and np.ndim(targets) == 0):
        k = 0 if targets is None else int(targets)
        grid = jnp.asarray(timestep_grid(num_steps, k, num_train_timesteps))
        t = jnp.broadcast_to(grid[:, None], (num_steps, batch))
        k = jnp.full((batch,), k, jnp.int32)
    else:
        _check_targets(targets, num_train_timesteps)
        k = jnp.asarray(targets, jnp.int32)
        k = jnp.broadcast_to(k, (batch,)) if k.ndim == 0 else k
        if k.shape != (batch,):
            raise ValueError(f"targets must have shape ({batch},), got {k.shape}.")
        t = jnp.asarray(_table_for_every_target(num_steps, num_train_timesteps))[k].T
    return t, _prev_timestep(t, k[None, :], num_steps, num_train_timesteps)


def reverse_process(
    denoise_fn: DenoiseFn,
    schedule: Schedule,
    x_init: jnp.ndarray,
    *,
    num_steps: int,
    targets=None,
    eta: float = 0.0,
    rng: jax.Array | None = None,
    return_trajectory: bool = False,
):
    """Runs DDIM from x_init (noise at t = T-1) down to each row's stop target.

    `denoise_fn(x, t)` returns the model's eps for x [B, ...] and int timesteps t [B].
    `targets` is None (clean images), an int, or an int array [B] (partial generation).
    Rows whose timestep repeats the previous row's keep their value. Returns the final
    samples [B, ...], plus a `Trajectory` of every step when `return_trajectory`.
    """
    num_train_timesteps = schedule.num_train_timesteps
    _check_steps(num_steps, num_train_timesteps)
    if eta != 0 and rng is None:
        raise ValueError("reverse_process with eta > 0 needs an `rng` key for the injected noise.")
    batch = x_init.shape[0]
    t_rows, prev_rows = _grid_rows(num_steps, targets, batch, num_train_timesteps)
    changed = jnp.concatenate(
        [jnp.ones((1, batch), bool), t_rows[1:] != t_rows[:-1]], axis=0)
    row_shape = (batch,) + (1,) * (x_init.ndim - 1)

    def body(x, row):
        i, t, t_prev, keep_new = row
        eps = denoise_fn(x, t)
        noise = step_noise(rng, i, x.shape, x.dtype) if eta != 0 else None
        x_new = ddim_step(schedule, x, eps, t=t, t_prev=t_prev, eta=eta, noise=noise)
        x_next = jnp.where(keep_new.reshape(row_shape), x_new, x)
        return x_next, (Trajectory(x, t, eps) if return_trajectory else None)

    rows = (jnp.arange(num_steps), t_rows, prev_rows, changed)
    x_final, trajectory = jax.lax.scan(body, x_init, rows)
    return (x_final, trajectory) if return_trajectory else x_final


def to_unit_interval(x: jnp.ndarray) -> jnp.ndarray:
    """Sampler output in [-1, 1] -> images in [0, 1] for metrics and grids."""
    return jnp.clip(x / 2 + 0.5, 0.0, 1.0)
