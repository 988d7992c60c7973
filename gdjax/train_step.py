"""The one compiled train step: `(state, teacher_params, batch, rng) -> (state, metrics)`.

Inside a single `jax.jit`: noise and timesteps for the real rows, the strategy's replay
half (the frozen teacher's scanned reverse process, re-noising and predictions), the
student's forward and backward pass over all rows at once, gradient clipping and Adam.
Data parallelism: the batch is sharded over a 1-D ('data',) mesh and everything else is
replicated; XLA inserts the gradient all-reduce, so the math equals the one-device math.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gdjax import losses, regularisers, strategies
from gdjax.schedule import Schedule, add_noise
from gdjax.strategies import StrategyConfig


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree; `step` counts over all experiences)."""

    step: jnp.ndarray  # int32 scalar
    experience: jnp.ndarray  # int32 scalar, 0-based index of the experience being learned
    params: Any
    opt_state: Any
    skipped: jnp.ndarray  # int32 scalar: updates dropped so far (train.on_nan="skip")
    ema: Any = None  # train.ema_decay > 0: the exponential moving average of `params`
    reg: Any = None  # strategy.regulariser: its anchor and importance (gdjax/regularisers.py)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Adam after global-norm clipping, the baseline's (REFERENCE §4)."""

    learning_rate: float = 2e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # global norm; <= 0 disables

    def __post_init__(self):
        for name in ("learning_rate", "b1", "b2", "eps", "grad_clip"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value)):
                key = f"train.{name}" if name in ("learning_rate", "grad_clip") else name
                raise ValueError(f"{key}={value!r} must be a finite number.")
        if self.learning_rate <= 0:
            raise ValueError(f"train.learning_rate={self.learning_rate} must be > 0.")


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Adam without weight decay or schedule, after global-norm clipping (the baseline's)."""
    adam = optax.adam(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adam)
    return adam


def init_state(params, optimizer: optax.GradientTransformation, experience: int = 0, *,
               ema: bool = False, reg: Any = None) -> TrainState:
    """A fresh train state; with `ema`, its moving average starts at `params`; `reg`: the
    regulariser's state (`regularisers.init`)."""
    return TrainState(jnp.int32(0), jnp.int32(experience), params, optimizer.init(params),
                      jnp.int32(0), jax.tree.map(jnp.copy, params) if ema else None, reg)


def _distill_loss(params, apply_fn, schedule, criterion, replay, replay_rows_mask):
    """IID distillation: the student regresses onto the teacher on replay rows alone."""
    pred = strategies.conditioned(apply_fn, params, replay.x, replay.t, replay.labels)
    loss = losses.criterion(criterion, pred, replay.target, replay.t, schedule,
                            replay_rows_mask)
    return loss, (jnp.float32(0.0), loss)


def _student_loss(params, apply_fn, schedule, criterion, cfg, experience, x_t, t, eps, replay,
                  mask, replay_rows_mask, labels=None):
    """Loss over the real rows and the replay rows in one forward pass, plus its parts.

    `mask` / `replay_rows_mask`: which real and replay rows count (None: all). `labels`:
    the real rows' conditioning labels (None: an unconditional model)."""
    batch = x_t.shape[0]
    if replay is None or replay.x is None:
        pred = strategies.conditioned(apply_fn, params, x_t, t, labels)
    else:
        both = None if labels is None else jnp.concatenate([labels, replay.labels])
        pred = strategies.conditioned(apply_fn, params, jnp.concatenate([x_t, replay.x]),
                                      jnp.concatenate([t, replay.t]), both)
    data_loss = losses.criterion(criterion, pred[:batch], eps, t, schedule, mask)
    if replay is None:
        return data_loss, (data_loss, jnp.float32(0.0))
    if replay.x is None:  # LwF: a second target for the real rows themselves
        replay_pred, replay_rows_mask = pred[:batch], mask
    else:
        replay_pred = pred[batch:]
    replay_loss = losses.criterion(criterion, replay_pred, replay.target, replay.t, schedule,
                                   replay_rows_mask)
    if cfg.name == strategies.ER:
        # The baseline's ER (avalanche ReplayPlugin) takes one criterion over all rows.
        targets = jnp.concatenate([eps, replay.target])
        both = None if mask is None else jnp.concatenate([mask, replay_rows_mask])
        loss = losses.criterion(criterion, pred, targets, jnp.concatenate([t, replay.t]),
                                schedule, both)
    else:
        loss = losses.combine(data_loss, replay_loss, experience=experience, lambd=cfg.lambd,
                              weight_replay_loss=cfg.weight_replay_loss)
    return loss, (data_loss, replay_loss)


def _select(ok, new, old):
    """`new` where `ok` holds, else `old`, leaf by leaf (a select: no host round trip)."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


class _Spec(NamedTuple):
    """The static parts of a train step (hashable; closed over, never traced)."""

    apply_fn: Callable
    schedule: Schedule
    strategy: StrategyConfig
    criterion: str
    use_replay: bool
    distill_only: bool
    constrain: Callable
    regulariser: regularisers.RegConfig
    null_label: int | None  # a class-conditional denoiser's null label; None: unconditional
    label_dropout: float


def _penalised(loss_fn: Callable, weight: float, reg) -> Callable:
    """`loss_fn` plus weight * the regulariser's penalty; its parts gain the added term."""

    def fn(params, *args):
        loss, parts = loss_fn(params, *args)
        if reg is None:
            return loss, parts
        added = weight * regularisers.penalty(params, reg)
        return loss + added, (*parts, added)

    return fn


def _loss_and_grads(spec: _Spec, state: TrainState, teacher_params, batch, rng):
    """((loss, (data loss, replay loss)), gradients) of one step's batch."""
    step_key = jax.random.fold_in(rng, state.step)
    k_eps, k_t, k_replay = jax.random.split(step_key, 3)
    x0, mask = batch["image"], batch.get("mask")  # no mask: every row is real
    eps = spec.constrain(jax.random.normal(k_eps, x0.shape, x0.dtype))
    t = spec.constrain(jax.random.randint(k_t, x0.shape[:1], 0,
                                          spec.schedule.num_train_timesteps))
    x_t = add_noise(spec.schedule, x0, noise=eps, t=t)
    labels = replay_labels = cond_replay = None
    if spec.null_label is not None:
        # Classifier-free guidance's training: each label (real and replay rows alike)
        # becomes the null label with probability label_dropout. A key of its own, folded
        # apart from the three above, so that unconditional runs draw what they always did.
        k_drop, k_drop_replay = jax.random.split(jax.random.fold_in(step_key, _LABEL_DROP))
        labels = _drop_labels(k_drop, batch["label"], spec)
        replay_labels = batch.get("replay_label")
        if replay_labels is not None:
            cond_replay = _drop_labels(k_drop_replay, replay_labels, spec)
        elif spec.use_replay and spec.strategy.name != strategies.LWF:
            raise ValueError(
                f"a class-conditional {spec.strategy.name} step needs the batch's "
                "'replay_label' (the replay rows' classes, gdjax.data.memory.replay_labels; "
                "ER: memory_labels), and this batch has none")
    replay, rows_mask = None, None
    if spec.use_replay:
        rows = spec.strategy.replay_size or x0.shape[0]
        rows_mask = None if mask is None else spec.constrain(losses.replay_mask(mask, rows))
        replay = strategies.replay_rows(
            spec.strategy, apply_fn=spec.apply_fn, teacher_params=teacher_params,
            schedule=spec.schedule, rng=k_replay, image_shape=(rows,) + x0.shape[1:],
            data_x_t=x_t, data_t=t, memory_x0=batch.get("memory"), constrain=spec.constrain,
            labels=replay_labels, cond_labels=cond_replay, data_labels=labels,
            null_label=spec.null_label)
    if spec.distill_only:
        return jax.value_and_grad(_distill_loss, has_aux=True)(
            state.params, spec.apply_fn, spec.schedule, spec.criterion, replay, rows_mask)
    loss_fn = _penalised(_student_loss, spec.regulariser.scale, state.reg)
    return jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, spec.apply_fn, spec.schedule, spec.criterion, spec.strategy,
        state.experience, x_t, t, eps, replay, mask, rows_mask, labels)


_LABEL_DROP = 0x1ab  # folded into a step's key for the label dropout's draws


def _drop_labels(key, labels, spec: _Spec):
    """`labels` with each one replaced by the null label with probability label_dropout."""
    if spec.label_dropout <= 0:
        return labels
    drop = jax.random.bernoulli(key, spec.label_dropout, labels.shape)
    return spec.constrain(jnp.where(drop, spec.null_label, labels).astype(jnp.int32))


def make_train_step(*, apply_fn: Callable, schedule: Schedule, strategy: StrategyConfig,
                    optimizer: optax.GradientTransformation, criterion: str = "mse",
                    with_replay: bool = True, mesh: Mesh | None = None,
                    distill_only: bool = False, on_nan: str = "stop", steps: int = 1,
                    ema_decay: float = 0.0,
                    regulariser: regularisers.RegConfig = regularisers.RegConfig(),
                    null_label: int | None = None, label_dropout: float = 0.0):
    """Builds the jitted step. `with_replay=False` gives the plain step (first experience).

    `steps` = k > 1 (train.steps_per_call) gives `(state, teacher_params, batches, count,
    rng) -> (state, metrics)` instead: the first `count` (<= k, traced) of k batches stacked
    on a leading axis ([k, B, ...]; with a `mesh`, split over 'data' on the second axis) are
    trained on one after the other in a `lax.fori_loop`, with the random numbers of single
    steps, and the metrics come back stacked ([k]; rows past `count` are 0). One function
    for every count: a run compiles it once per experience, and any k > 1, any split of the
    steps into calls, gives the same run bit for bit. A loop body is compiled apart from a
    top-level step, so against k = 1 the results agree to float32 rounding, not bitwise;
    and on XLA:CPU a loop body of this model runs about 15x slower than the plain step
    (BENCHMARKS.md), so k > 1 is for accelerators, where dispatch is the bound.

    `on_nan="skip"` keeps the old params and optimizer state when the loss or the gradient
    norm is not finite and counts the dropped update in `state.skipped`; "stop" applies
    every update and leaves the check to the caller. The settings are checked where they
    are built (gdjax/run.py), not here.

    `ema_decay` (train.ema_decay): a state carrying `ema` (init_state(..., ema=True)) has it
    updated after every step to ema_decay * ema + (1 - ema_decay) * params, inside the step.

    `regulariser` (strategy.regulariser): a state carrying `reg` (`regularisers.init`) adds
    its weight (`RegConfig.scale`) * its penalty to the loss (metric "reg_loss") and, for SI, adds the step's share
    of the path integral to it, inside the step.

    `distill_only` (IID distillation into a fresh student) drops the real rows: the batch's
    images only give the shape of the replay rows.

    `null_label` (a class-conditional `apply_fn(params, x, t, labels)`, model.
    class_conditional): the real rows are conditioned on the batch's "label" [B] and the
    replay rows on its "replay_label" [R] (their classes, balanced over the teacher's;
    ER: the memory images' own), each dropped to `null_label` with probability
    `label_dropout` (train.label_dropout), the teacher's targets conditioned alike
    (`strategies.replay_rows`).

    The step's batch is {"image": [B, H, W, C]} plus {"memory": [R, H, W, C]} for ER and
    optionally {"mask": [B]}: 1 for a real row, 0 for the padding of an epoch's short last
    batch; the means are taken over the real rows, and over the first
    ceil(R * real / B) replay rows (`losses.replay_mask`).
    `rng` is one fixed key per run; the step folds in `state.step`, so a resumed run draws
    the same numbers. The train state is donated. With a `mesh`, the batch is split over
    its 'data' axis and everything else replicated, as declared shardings: an input placed
    otherwise is an error.
    """
    rows_sharding = NamedSharding(mesh, P("data")) if mesh is not None else None
    spec = _Spec(apply_fn, schedule, strategy, criterion,
                 with_replay and strategy.name not in (strategies.NAIVE, strategies.CUMULATIVE),
                 distill_only, (lambda x: jax.lax.with_sharding_constraint(x, rows_sharding))
                 if mesh is not None else (lambda x: x), regulariser, null_label,
                 float(label_dropout))

    def train_step(state: TrainState, teacher_params, batch, rng):
        (loss, parts), grads = _loss_and_grads(spec, state, teacher_params, batch, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        reg = state.reg
        if reg is not None:
            reg = regularisers.accumulate(regulariser, reg, grads, state.params, params)
        skipped = state.skipped
        if on_nan == "skip":
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            params, opt_state, reg = _select(ok, (params, opt_state, reg),
                                             (state.params, state.opt_state, state.reg))
            skipped = skipped + (~ok).astype(jnp.int32)
        metrics = {"loss": loss, "data_loss": parts[0], "replay_loss": parts[1],
                   "grad_norm": grad_norm}
        if reg is not None:
            metrics["reg_loss"] = parts[2]
        if on_nan == "skip":
            metrics["skipped"] = skipped  # updates dropped so far, this one included
        ema = state.ema
        if ema is not None:  # ema_decay * ema + (1 - ema_decay) * params (a dropped update:
            # params unchanged, so the average still moves towards them)
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
        return TrainState(state.step + 1, state.experience, params, opt_state, skipped,
                          ema, reg), metrics

    fn, shardings = train_step, (rows_sharding,)
    if steps > 1:
        fn = _stepper(train_step)
        shardings = (NamedSharding(mesh, P(None, "data")) if mesh is not None else None,
                     NamedSharding(mesh, P()) if mesh is not None else None)
    if mesh is None:
        return jax.jit(fn, donate_argnums=(0,))
    same = NamedSharding(mesh, P())
    return jax.jit(fn, donate_argnums=(0,), in_shardings=(same, same, *shardings, same),
                   out_shardings=(same, same))


def _stepper(train_step: Callable) -> Callable:
    """`train_step` run `count` times over stacked batches (see `make_train_step`)."""

    def train_steps(state: TrainState, teacher_params, batches, count, rng):
        k = jax.tree.leaves(batches)[0].shape[0]
        first = jax.tree.map(lambda v: v[0], batches)
        shapes = jax.eval_shape(lambda: train_step(state, teacher_params, first, rng)[1])
        stacked = jax.tree.map(lambda a: jnp.zeros((k,) + a.shape, a.dtype), shapes)

        def body(i, carry):
            state, stacked = carry
            batch = jax.tree.map(lambda v: jax.lax.dynamic_index_in_dim(v, i, keepdims=False),
                                 batches)
            state, metrics = train_step(state, teacher_params, batch, rng)
            return state, jax.tree.map(lambda a, v: a.at[i].set(v), stacked, metrics)

        return jax.lax.fori_loop(0, count, body, (state, stacked))

    return train_steps
