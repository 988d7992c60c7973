"""Continual-learning strategies: for each, the replay half of a batch and its targets.

Every function here is pure and traceable: it runs inside the one compiled train step.
A strategy with a teacher gets the frozen teacher's parameters as an explicit argument
and produces `ReplayRows`: the inputs the student sees, their timesteps and the regression
targets (REFERENCE §4).

Conditional replay (a class-conditional denoiser, model.class_conditional): the replay rows
carry labels, balanced over the classes the teacher has learned (made on the host, see
`gdjax.data.splits.balanced_labels`). The teacher generates each row for its label, guided
at `teacher_guidance` (1: its conditional prediction alone); the student is conditioned on
`cond_labels` (the labels after classifier-free dropout to the null label) and the
distillation targets are the teacher's predictions under the same labels.

Trajectory distillation (beyond the paper; the noisy intermediate distillation of MAGD,
the paper's follow-up) distils the teacher's reverse process at its intermediate samples:
each replay row's teacher runs `teacher_steps` DDIM steps from noise towards the row's
own timestep (drawn as partial generation's), and the row is one of the states that
process passed through, the step drawn uniformly: its input x_j, its timestep t_j and, as
the target, the eps the teacher predicted there, which the scan has already computed. So
its replay costs teacher_steps forwards a row, where full and partial generation
distillation cost teacher_steps + 1. (A conditional model's targets are recomputed under
the dropped labels: one more forward.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from gdjax import ddim
from gdjax import guidance as guidance_lib
from gdjax.schedule import Schedule, add_noise

ApplyFn = Callable[..., jnp.ndarray]  # apply_fn(params, x, t[, labels]) -> eps

NAIVE = "naive"
CUMULATIVE = "cumulative"
ER = "er"
NO_DISTILLATION = "no_distillation"
FULL_GENERATION = "full_generation_distillation"
PARTIAL_GENERATION = "partial_generation_distillation"
GAUSSIAN = "gaussian_distillation"
GAUSSIAN_SYMMETRY = "gaussian_symmetry_distillation"
LWF = "lwf_distillation"
TRAJECTORY = "trajectory_distillation"  # beyond the paper: MAGD's intermediate samples

STRATEGIES = (NAIVE, CUMULATIVE, ER, NO_DISTILLATION, FULL_GENERATION, PARTIAL_GENERATION,
              GAUSSIAN, GAUSSIAN_SYMMETRY, LWF, TRAJECTORY)
# Strategies that need a frozen copy of the previous experience's model.
TEACHER_STRATEGIES = (NO_DISTILLATION, FULL_GENERATION, PARTIAL_GENERATION, GAUSSIAN,
                      GAUSSIAN_SYMMETRY, LWF, TRAJECTORY)
# Strategies whose teacher runs its reverse process (teacher_steps, teacher_eta matter).
GENERATIVE_STRATEGIES = (NO_DISTILLATION, FULL_GENERATION, PARTIAL_GENERATION, TRAJECTORY)
# Those whose reverse process stops at each replay row's own timestep.
PER_ROW_STOP_STRATEGIES = (PARTIAL_GENERATION, TRAJECTORY)
# How the replay rows' timesteps are drawn (strategy.replay_timesteps): uniformly over
# replay_start_timestep..T-1 (the reference), or by replay_timestep_probs.
REPLAY_TIMESTEPS = ("uniform", "min_snr")


@dataclasses.dataclass(frozen=True)
class StrategyConfig:
    """Static (hashable) strategy settings; see configs/base.py for their meaning."""

    name: str = FULL_GENERATION
    lambd: float = 1.0
    weight_replay_loss: bool = True
    replay_start_timestep: int = 0
    teacher_steps: int = 2
    teacher_eta: float = 0.0
    replay_size: int = 0  # 0: the batch size
    er_buffer_size: int = 1000  # experience replay's buffer (gdjax/data/memory.py)
    teacher_guidance: float = 1.0  # conditional replay: the teacher's guidance scale
    replay_timesteps: str = "uniform"  # or "min_snr" (REPLAY_TIMESTEPS, replay_timestep_probs)
    replay_snr_gamma: float = 5.0

    def __post_init__(self):
        if self.name not in STRATEGIES:
            raise ValueError(
                f"strategy.name={self.name!r} is unknown; use one of: {', '.join(STRATEGIES)}.")
        if self.replay_timesteps not in REPLAY_TIMESTEPS:
            raise ValueError(f"strategy.replay_timesteps={self.replay_timesteps!r} is unknown; "
                             f"use one of: {', '.join(REPLAY_TIMESTEPS)}.")
        gamma = self.replay_snr_gamma
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"strategy.replay_snr_gamma={gamma!r} must be a finite number > 0.")
        for name in ("lambd", "teacher_eta", "teacher_guidance"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"strategy.{name}={value!r} must be a finite number >= 0.")
        for name, low in (("replay_start_timestep", 0), ("teacher_steps", 1),
                          ("replay_size", 0), ("er_buffer_size", 1)):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
                raise ValueError(f"strategy.{name}={value!r} must be an integer >= {low}"
                                 + (" (0: the batch size)." if name == "replay_size" else "."))

    def check_timesteps(self, num_train_timesteps: int) -> None:
        """ValueError unless the timestep settings fit a schedule of that many steps."""
        if not self.replay_start_timestep < num_train_timesteps:
            raise ValueError(
                f"strategy.replay_start_timestep={self.replay_start_timestep} must be in "
                f"0..{num_train_timesteps - 1}.")
        if not self.teacher_steps <= num_train_timesteps:
            raise ValueError(
                f"strategy.teacher_steps={self.teacher_steps} must be in 1..{num_train_timesteps}.")


def replay_timestep_probs(alphas_cumprod, t_low: int, gamma: float) -> jnp.ndarray:
    """strategy.replay_timesteps="min_snr": P(t) [T] proportional to min(SNR(t), gamma) /
    SNR(t) = min(1, gamma / SNR(t)) for t >= t_low, 0 below; SNR(t) = abar / (1 - abar), so
    every step with SNR <= gamma (all the noisy ones, t = T - 1 at zero terminal SNR
    included) is equally likely and a cleaner one gamma / SNR(t) times as likely. At small
    SNR the teacher's prediction holds what it knows of the images; at large SNR it is
    nearly the noise added, which a replay row teaches little."""
    abar = jnp.asarray(alphas_cumprod, jnp.float32)
    weight = jnp.minimum(1.0, gamma * (1.0 - abar) / abar)  # gamma / SNR, no 0 / 0
    weight = jnp.where(jnp.arange(abar.shape[0]) >= t_low, weight, 0.0)
    return weight / jnp.sum(weight)


class ReplayRows(NamedTuple):
    """The replay half: inputs x [R, ...] (None: reuse the data rows), timesteps t [R],
    targets, and the labels the student is conditioned on (None: an unconditional model)."""

    x: jnp.ndarray | None
    t: jnp.ndarray
    target: jnp.ndarray
    labels: jnp.ndarray | None = None


def conditioned(apply_fn: ApplyFn, params, x, t, labels=None) -> jnp.ndarray:
    """`apply_fn(params, x, t)`, or with `labels` [B] for a class-conditional denoiser."""
    return apply_fn(params, x, t) if labels is None else apply_fn(params, x, t, labels)


def symmetric_noise(noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """Noise made mirror-symmetric by timestep band (NHWC; the reference's rule, REFERENCE §4).

    Rows with 333 < t <= 666: the first half of them (in row order) get their top half
    replaced by the bottom half flipped upside down, the rest their left half by the right
    half flipped left to right. Rows with t <= 333 get both, top first.
    """
    h, w = noise.shape[1], noise.shape[2]
    top_from_bottom = noise.at[:, : h // 2].set(jnp.flip(noise[:, h - h // 2:], axis=1))
    mid = (t > 333) & (t <= 666)
    rank = jnp.cumsum(mid) - 1
    first = mid & (rank < jnp.sum(mid) // 2)
    low = t <= 333
    rows = lambda m: m.reshape((-1,) + (1,) * (noise.ndim - 1))
    x = jnp.where(rows(first | low), top_from_bottom, noise)
    left_from_right = x.at[:, :, : w // 2].set(jnp.flip(x[:, :, w - w // 2:], axis=2))
    return jnp.where(rows((mid & ~first) | low), left_from_right, x)


def teacher_generate(apply_fn: ApplyFn, teacher_params, schedule: Schedule, noise, *,
                     num_steps: int, eta: float, rng, targets=None, labels=None,
                     null_label: int | None = None, guidance: float = 1.0,
                     return_trajectory: bool = False):
    """The teacher's DDIM reverse process from `noise` (down to `targets`; None: clean);
    with `labels` [R], each row generated for its label, guided at `guidance` against the
    `null_label` prediction (gdjax/guidance.py); with `return_trajectory`, also every
    step's (x, t, eps) (`ddim.Trajectory`)."""
    if labels is None:
        denoise = lambda x, t: apply_fn(teacher_params, x, t)
    else:
        denoise = guidance_lib.guided_denoise(apply_fn, teacher_params, labels, null_label,
                                              guidance)
    return ddim.reverse_process(denoise, schedule, noise, num_steps=num_steps, targets=targets,
                                eta=eta, rng=rng, return_trajectory=return_trajectory)


def replay_rows(cfg: StrategyConfig, *, apply_fn: ApplyFn, teacher_params, schedule: Schedule,
                rng: jax.Array, image_shape: tuple, data_x_t=None, data_t=None,
                memory_x0=None, constrain=lambda x: x, labels=None, cond_labels=None,
                data_labels=None, null_label: int | None = None) -> ReplayRows | None:
    """The replay half of a batch for strategy `cfg.name`; None for strategies without one.

    image_shape: (R, H, W, C) of the replay rows. data_x_t / data_t: the noisy real rows
    (LwF distils on them). memory_x0: real images from the ER buffer. `constrain` pins
    intermediate arrays to the batch sharding.

    A class-conditional denoiser (`null_label` not None) takes `labels` [R]: the class of
    each replay row (ER: its memory image's), which the teacher generates; `cond_labels`
    [R] (default `labels`): what the student and the teacher's targets are conditioned
    on; `data_labels` [B]: the real rows' conditioning labels, for LwF.
    """
    name = cfg.name
    if name in (NAIVE, CUMULATIVE):
        return None
    if null_label is not None and cond_labels is None:
        cond_labels = labels
    k_noise, k_t, k_start, k_gen = jax.random.split(rng, 4)
    T = schedule.num_train_timesteps
    teacher = lambda x, t, y: jax.lax.stop_gradient(conditioned(apply_fn, teacher_params,
                                                                x, t, y))
    if name == LWF:
        return ReplayRows(None, data_t, teacher(data_x_t, data_t, data_labels), data_labels)
    rows = lambda x, t, target: ReplayRows(x, t, target, cond_labels)
    eps = constrain(jax.random.normal(k_noise, image_shape))
    # ER's memory rows are ordinary training rows: timesteps from the full range.
    t_low = 0 if name == ER else cfg.replay_start_timestep
    if name != ER and cfg.replay_timesteps == "min_snr":
        probs = replay_timestep_probs(schedule.alphas_cumprod, t_low, cfg.replay_snr_gamma)
        t = constrain(jax.random.categorical(k_t, jnp.log(probs), shape=image_shape[:1]))
    else:
        t = constrain(jax.random.randint(k_t, image_shape[:1], t_low, T))
    if name == ER:
        return rows(add_noise(schedule, memory_x0, noise=eps, t=t), t, eps)
    if name in (GAUSSIAN, GAUSSIAN_SYMMETRY):
        x = symmetric_noise(eps, t) if name == GAUSSIAN_SYMMETRY else eps
        return rows(x, t, teacher(x, t, cond_labels))
    start = constrain(jax.random.normal(k_start, image_shape))
    generate = lambda targets: jax.lax.stop_gradient(teacher_generate(
        apply_fn, teacher_params, schedule, start, num_steps=cfg.teacher_steps,
        eta=cfg.teacher_eta, rng=k_gen, targets=targets, labels=labels,
        null_label=null_label, guidance=cfg.teacher_guidance))
    if name == PARTIAL_GENERATION:
        x = generate(t)
        return rows(x, t, teacher(x, t, cond_labels))
    if name == TRAJECTORY:
        _, path = jax.lax.stop_gradient(teacher_generate(
            apply_fn, teacher_params, schedule, start, num_steps=cfg.teacher_steps,
            eta=cfg.teacher_eta, rng=k_gen, targets=t, labels=labels, null_label=null_label,
            guidance=cfg.teacher_guidance, return_trajectory=True))
        # one state of each row's own process, its step drawn uniformly (a key apart from
        # the four above, which it shares with partial generation)
        step = jax.random.randint(jax.random.fold_in(k_t, 1), t.shape, 0, cfg.teacher_steps)
        state = lambda a: constrain(a[step, jnp.arange(t.shape[0])])  # noqa: E731
        x, t_state = state(path.x), state(path.t)
        target = state(path.eps) if null_label is None else teacher(x, t_state, cond_labels)
        return rows(x, t_state, target)
    x = add_noise(schedule, generate(None), noise=eps, t=t)
    if name == NO_DISTILLATION:
        return rows(x, t, eps)
    return rows(x, t, teacher(x, t, cond_labels))  # full generation distillation
