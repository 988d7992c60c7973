"""The classifier trained beside the generator ("solver", REFERENCE §6).

In every experience the solver, a SimpleCNN, trains first, then the generator trains on the
same experience. Its strategy follows the generator's:

- "naive": cross-entropy on the experience's images only;
- "cumulative": cross-entropy on the images of every experience so far;
- "generative_replay": from the second experience on, each batch of B real images gets R
  replay images drawn by the previous experience's generator (DDIM, `gen_steps` steps,
  eta 0, raw sampler output in [-1, 1]) and labelled with the previous solver's logits. The
  loss is (1/(k+1)) * CE(real) + (1 - 1/(k+1)) * replay, where replay is the baseline's
  distillation term with temperature T, T^2 * mean_rows(-sum_c softmax(student/T)_c *
  log_softmax(teacher/T)_c): note the direction, as the baseline implements it.

The classifier's own baselines, without the generator (the authors ran them through
avalanche, configs/strategy/cnn_w_*.json; gdjax/eval/regularisers.py has the formulas):

- "er": each batch of B real images gets B memory rows, real images (and labels) of the
  previous experiences from a class-balanced buffer of `er_buffer_size` (avalanche's
  ExperienceBalancedBuffer: an equal share per experience), cross-entropy over all rows;
- "ewc", "si": cross-entropy plus the EWC or SI penalty (`ewc_lambda`, `si_lambda`);
- "lwf": cross-entropy plus alpha_k times the distillation from the previous solver on the
  batch's own images, over the classes seen before (`lwf_alpha`, `lwf_temperature`).

The replay images, the teacher's labels and the student's update run in one jitted step
whose frozen inputs (previous generator, previous solver) are explicit arguments. With
`replay_pool = N` (not the reference) the previous generator draws N replay images once per
experience instead, and every epoch visits them in a seeded order, R per step: the samples
cost N / (epochs * steps per epoch * R) of the reference's, so that a small machine can give
the solver the epochs it needs (their labels are the same frozen teacher's). Adam
starts afresh each experience (avalanche resets the optimizer), dropout is on in training,
and every epoch visits a seeded permutation in batches, the last one partial as in the
reference's loaders (padded to the batch size and masked, so the step compiles once). The losses of an epoch are fetched to the host once, at its end, and
a NaN or inf among them stops the run (`NonFiniteSolverLossError`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from gdjax import data as gdata
from gdjax.data import memory as gmemory
from gdjax import ddim, hosts, losses, rng
from gdjax import guidance as guidance_lib
from gdjax.eval import batching, metrics
from gdjax.eval import regularisers as reg_lib
from gdjax.eval import classifier as cls
from gdjax.schedule import Schedule

SOLVER_STRATEGIES = ("naive", "cumulative", "generative_replay", "er", "ewc", "si", "lwf")
# The baselines that need no generator, each with its own step (make_baseline_step).
BASELINES = ("er", "ewc", "si", "lwf")
# The replay term's direction: "forward" is knowledge distillation's cross-entropy of the
# teacher's soft labels, -sum_c p_teacher log p_student; "reference" is the authors' code,
# -sum_c p_student log p_teacher, whose gradient vanishes where the student is already
# confidently wrong (README: "The classifier trained with replay").
REPLAY_LOSSES = ("forward", "reference")


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """Static solver settings (hashable: the jitted step is cached per config)."""

    strategy: str = "generative_replay"
    epochs: int = 20
    batch_size: int = 128
    learning_rate: float = 1e-3
    temperature: float = 2.0
    gen_steps: int = 10
    replay_size: int = 0  # 0: the batch size
    num_classes: int = 10
    replay_loss: str = "forward"  # or "reference" (REPLAY_LOSSES)
    replay_pool: int = 0  # 0: fresh replay images every step (the reference); N: N per experience
    # The baselines (avalanche's, the authors' values):
    er_buffer_size: int = 300
    ewc_lambda: float = 1.0
    si_lambda: float = 1.0
    si_eps: float = 1e-7
    lwf_alpha: tuple = (0.0, 0.5, 1.33333, 2.25, 3.2)  # per experience; the last repeats
    lwf_temperature: float = 2.0

    def __post_init__(self):
        if self.replay_loss not in REPLAY_LOSSES:
            raise ValueError(f"solver.replay_loss={self.replay_loss!r} is unknown; use one of "
                             f"{REPLAY_LOSSES}.")
        if self.strategy not in SOLVER_STRATEGIES:
            raise ValueError(f"solver.strategy={self.strategy!r} is unknown; use one of "
                             f"{SOLVER_STRATEGIES} (or 'auto' in a run config).")
        for name in ("epochs", "batch_size", "gen_steps", "num_classes"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"solver.{name}={value!r} must be an integer >= 1.")
        for name, zero in (("replay_size", "the batch size"),
                           ("replay_pool", "fresh replay images every step")):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise ValueError(f"solver.{name}={value!r} must be an integer >= 0 (0: {zero}).")
        if not (isinstance(self.er_buffer_size, int) and self.er_buffer_size >= 1):
            raise ValueError(f"solver.er_buffer_size={self.er_buffer_size!r} must be an "
                             f"integer >= 1.")
        numbers = (self.ewc_lambda, self.si_lambda, self.si_eps, self.lwf_temperature,
                   *self.lwf_alpha)
        if (not self.lwf_alpha or not all(isinstance(v, (int, float)) and math.isfinite(v)
                                          and v >= 0 for v in numbers)
                or not self.si_eps > 0 or not self.lwf_temperature > 0):
            raise ValueError(
                f"solver.ewc_lambda={self.ewc_lambda}, si_lambda={self.si_lambda}, "
                f"lwf_alpha={self.lwf_alpha} must be finite and >= 0 (lwf_alpha not empty), "
                f"si_eps={self.si_eps} and lwf_temperature={self.lwf_temperature} > 0.")
        finite = all(isinstance(v, (int, float)) and math.isfinite(v)
                     for v in (self.temperature, self.learning_rate))
        if not finite or not self.temperature > 0 or not self.learning_rate > 0:
            raise ValueError(f"solver.temperature={self.temperature} and solver.learning_rate="
                             f"{self.learning_rate} must be > 0.")


class NonFiniteSolverLossError(FloatingPointError):
    """The solver's loss became NaN or inf."""


class SolverState(NamedTuple):
    """The solver being trained and the frozen copy that labels its replay images."""

    params: Any
    opt_state: Any
    teacher: Any


def replay_loss(student_logits, teacher_logits, temperature: float, mask=None, *,
                direction: str = "reference"):
    """T^2 * mean over rows (those whose `mask` is 1, when given) of, with p = softmax(./T):
    "reference" (the authors' code): -sum_c p(student)_c * log p(teacher)_c;
    "forward" (knowledge distillation's): -sum_c p(teacher)_c * log p(student)_c."""
    if direction not in REPLAY_LOSSES:
        raise ValueError(f"solver.replay_loss={direction!r} is unknown; use one of "
                         f"{REPLAY_LOSSES}.")
    weights, logs = student_logits, teacher_logits
    if direction == "forward":
        weights, logs = teacher_logits, student_logits
    p = jax.nn.softmax(weights / temperature, axis=-1)
    log_q = jax.nn.log_softmax(logs / temperature, axis=-1)
    return temperature**2 * _mean(-jnp.sum(p * log_q, axis=-1), mask)


def _mean(rows, mask):
    if mask is None:
        return jnp.mean(rows)
    return jnp.sum(rows * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def solver_loss(logits, labels, replay_logits, teacher_logits, *, experience, temperature,
                mask=None, replay_mask=None, direction: str = "reference"):
    """(1/(k+1)) CE(real rows) + (1 - 1/(k+1)) replay (`replay_loss` in `direction`); CE
    alone without replay rows. The masks (None: every row) pick the real rows of a padded
    last batch."""
    ce = _mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels), mask)
    if replay_logits is None:
        return ce
    w = 1.0 / (experience.astype(jnp.float32) + 1.0)
    return w * ce + (1.0 - w) * replay_loss(replay_logits, teacher_logits, temperature,
                                            replay_mask, direction=direction)


def make_optimizer(cfg: SolverConfig) -> optax.GradientTransformation:
    return optax.adam(cfg.learning_rate)


def init_state(cfg: SolverConfig, rng: jax.Array, image_shape: tuple) -> SolverState:
    """A fresh solver, replicated on the default mesh (`shardings`); its teacher slot holds
    a copy until the first boundary."""
    params = cls.init_classifier(rng, image_shape, cfg.num_classes)
    return jax.device_put(SolverState(params, make_optimizer(cfg).init(params),
                                      jax.tree.map(jnp.copy, params)), shardings()[1])


class ReplayLabels(NamedTuple):
    """What the solver asks a class-conditional previous generator for: labels balanced over
    `classes` (the generator's), guided at `guidance` against `null_label`
    (gdjax/guidance.py; 1: the conditional prediction alone)."""

    classes: tuple[int, ...]
    null_label: int
    guidance: float = 1.0

    def draw(self, rows: int, *, seed: int, experience: int, step: int) -> np.ndarray:
        """int32 [rows]: the balanced labels of `step` (`memory.replay_labels` on the stream
        "solver_replay_labels"; the pool's are step 0)."""
        return gmemory.replay_labels(self.classes, rows=rows, seed=seed, experience=experience,
                                     step=step, stream="solver_replay_labels")


def _traced(gen_labels: ReplayLabels | None) -> ReplayLabels | None:
    """What a compiled replay reads of `gen_labels`: the null label and the guidance (the
    labels come as an argument), so that one compilation serves every experience."""
    return None if gen_labels is None else gen_labels._replace(classes=())


def generate_replay(gen_apply: Callable, gen_params, schedule: Schedule, rng, *, shape,
                    num_steps: int, labels=None, gen_labels: ReplayLabels | None = None):
    """The previous generator's raw DDIM samples in [-1, 1] (eta 0), frozen; a conditional
    generator's (`gen_labels`) each for its row of `labels` [R]."""
    x_init = jax.random.normal(rng, shape)
    if gen_labels is None:
        denoise = lambda x, t: gen_apply(gen_params, x, t)  # noqa: E731
    else:
        denoise = guidance_lib.guided_denoise(gen_apply, gen_params, labels,
                                              gen_labels.null_label, gen_labels.guidance)
    x = ddim.reverse_process(denoise, schedule, x_init, num_steps=num_steps)
    return jax.lax.stop_gradient(x)


@functools.lru_cache(maxsize=8)
def _pool_chunk(gen_apply: Callable, rows: int, num_steps: int, mesh=None,
                gen_labels: ReplayLabels | None = None):
    """jit: (gen_params, schedule, key, x-shaped zeros, labels [rows] or None) -> `rows`
    replay images, sharded."""
    rows_sharding, same = shardings(mesh)

    def chunk(gen_params, schedule, key, like, labels):
        return generate_replay(gen_apply, gen_params, schedule, key, shape=like.shape,
                               num_steps=num_steps, labels=labels, gen_labels=gen_labels)

    return jax.jit(chunk, in_shardings=(same, same, same, rows_sharding, rows_sharding),
                   out_shardings=rows_sharding)


def replay_pool(cfg: SolverConfig, gen_apply: Callable, gen_params, schedule: Schedule, *,
                seed: int, experience: int, image_shape: tuple, batch_size: int,
                gen_labels: ReplayLabels | None = None) -> np.ndarray:
    """The `cfg.replay_pool` replay images [N, H, W, C] of an experience (solver.replay_pool),
    drawn by the previous generator as the fresh replay is (`generate_replay`), in chunks of
    the replay rows R: chunk i from the stream "solver_pool" at (experience, i); a
    conditional generator's for N labels balanced over its classes (`gen_labels.draw`,
    step 0), chunk i taking rows iR..(i+1)R-1 of them."""
    rows = cfg.replay_size or batch_size
    rows_sharding, _ = shardings()
    fn = _pool_chunk(gen_apply, rows, cfg.gen_steps, gen_labels=_traced(gen_labels))
    like = gdata.global_rows(np.zeros((rows,) + tuple(image_shape), np.float32), rows_sharding)
    base = rng.key(seed, "solver_pool", experience)
    num_chunks = -(-cfg.replay_pool // rows)
    labels = None
    if gen_labels is not None:  # balanced over the pool; the last chunk's extra rows dropped
        labels = np.resize(gen_labels.draw(cfg.replay_pool, seed=seed, experience=experience,
                                           step=0), num_chunks * rows)
    chunks = [hosts.host_copy(fn(
        gen_params, schedule, jax.random.fold_in(base, i), like,
        None if labels is None else gdata.global_rows(labels[i * rows:(i + 1) * rows],
                                                      rows_sharding)))
              for i in range(num_chunks)]
    return np.concatenate(chunks)[:cfg.replay_pool]


def pool_rows(pool: np.ndarray, *, seed: int, experience: int, epoch: int, step: int,
              rows: int) -> np.ndarray:
    """The replay rows of a step from the experience's pool: the epoch's order (stream
    "solver_pool_order" at (experience, epoch)) taken R at a time, wrapping around."""
    order = rng.numpy_rng(seed, "solver_pool_order", experience, epoch).permutation(len(pool))
    return pool[order[np.arange(step * rows, (step + 1) * rows) % len(pool)]]


@functools.lru_cache(maxsize=8)
def make_step(cfg: SolverConfig, gen_apply: Callable | None, with_replay: bool, mesh=None,
              pooled: bool = False, gen_labels: ReplayLabels | None = None):
    """The jitted step `(state, gen_params, schedule, images, labels, mask, experience, rng)
    -> (state, loss)`; `mask` [B] marks the real rows (1) of a padded batch; `gen_params`
    (the previous generator) and `schedule` are only read `with_replay` (pass None
    otherwise). `pooled` (solver.replay_pool): the step's replay rows [R, H, W, C] come
    ready in place of `gen_params`, and `schedule` is None. With `gen_labels` (a
    conditional generator's fresh replay) the step takes a ninth argument, the replay rows'
    labels [R] (`ReplayLabels.draw`). Cached per setting: `gen_apply` must be stable."""
    model, optimizer = cls.SimpleCNN(num_classes=cfg.num_classes), make_optimizer(cfg)

    def loss_fn(params, teacher, images, labels, mask, replay, experience, rng):
        inputs = images if replay is None else jnp.concatenate([images, replay])
        logits = model.apply({"params": params}, inputs, train=True, rngs={"dropout": rng})
        if replay is None:
            return solver_loss(logits, labels, None, None, experience=experience,
                               temperature=cfg.temperature, mask=mask)
        teacher_logits = jax.lax.stop_gradient(model.apply({"params": teacher}, replay))
        batch = images.shape[0]
        return solver_loss(logits[:batch], labels, logits[batch:], teacher_logits,
                           experience=experience, temperature=cfg.temperature, mask=mask,
                           replay_mask=losses.replay_mask(mask, replay.shape[0]),
                           direction=cfg.replay_loss)

    def solver_step(state: SolverState, gen_params, schedule, images, labels, mask, experience,
                    rng, replay_labels=None):
        k_gen, k_drop = jax.random.split(rng)
        replay = gen_params if pooled else None
        if with_replay and not pooled:
            rows = cfg.replay_size or images.shape[0]
            replay = generate_replay(gen_apply, gen_params, schedule, k_gen,
                                     shape=(rows,) + images.shape[1:], num_steps=cfg.gen_steps,
                                     labels=replay_labels, gen_labels=gen_labels)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, state.teacher, images, labels,
                                                  mask, replay, experience, k_drop)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return SolverState(optax.apply_updates(state.params, updates), opt_state,
                           state.teacher), loss

    # Declared shardings: the batch split over the mesh's 'data' axis, the rest replicated
    # (a misplaced input is an error, not a silent second compilation).
    rows, same = shardings(mesh)
    labelled = (rows,) if gen_labels is not None and with_replay and not pooled else ()
    return jax.jit(solver_step, donate_argnums=(0,),
                   in_shardings=(same, rows if pooled else same, same, rows, rows, rows, same,
                                 same) + labelled,
                   out_shardings=(same, same))


@functools.lru_cache(maxsize=8)
def make_baseline_step(cfg: SolverConfig, mesh=None):
    """The jitted step of a baseline (BASELINES) `(state, reg, memory_images, memory_labels,
    images, labels, mask, experience, active, rng) -> (state, reg, loss)`: `reg` the
    regulariser's state (EWC, SI; None otherwise), the memory rows ER's (None otherwise),
    `active` [C] the classes seen before this experience (LwF's distilled units)."""
    model, optimizer = cls.SimpleCNN(num_classes=cfg.num_classes), make_optimizer(cfg)
    name = cfg.strategy

    def loss_fn(params, teacher, reg, memory_images, memory_labels, images, labels, mask,
                experience, active, rng):
        inputs = images if memory_images is None else jnp.concatenate([images, memory_images])
        logits = model.apply({"params": params}, inputs, train=True, rngs={"dropout": rng})
        ce = optax.softmax_cross_entropy_with_integer_labels
        if memory_images is not None:  # ER: the mean over the real and the memory rows
            rows = jnp.concatenate([ce(logits[:images.shape[0]], labels) * mask,
                                    ce(logits[images.shape[0]:], memory_labels)])
            return jnp.sum(rows) / (jnp.sum(mask) + memory_images.shape[0])
        loss = _mean(ce(logits, labels), mask)
        if name == "ewc":
            loss += cfg.ewc_lambda * reg_lib.ewc_penalty(params, reg)
        elif name == "si":
            loss += cfg.si_lambda / 2 * reg_lib.si_penalty(params, reg)
        elif name == "lwf":
            teacher_logits = jax.lax.stop_gradient(model.apply({"params": teacher}, images))
            distil = reg_lib.lwf_loss(logits, teacher_logits, active, cfg.lwf_temperature, mask)
            loss += jnp.where(experience > 0, reg_lib.lwf_alpha(cfg.lwf_alpha, experience)
                              * distil, 0.0)
        return loss

    def step(state: SolverState, reg, memory_images, memory_labels, images, labels, mask,
             experience, active, rng):
        loss, grads = jax.value_and_grad(loss_fn)(
            state.params, state.teacher, reg, memory_images, memory_labels, images, labels,
            mask, experience, active, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if name == "si":
            reg = reg_lib.si_accumulate(reg, grads, state.params, params)
        return SolverState(params, opt_state, state.teacher), reg, loss

    rows, same = shardings(mesh)
    memory = rows if name == "er" else same
    return jax.jit(step, donate_argnums=(0, 1),
                   in_shardings=(same, same, memory, memory, rows, rows, rows, same, same,
                                 same),
                   out_shardings=(same, same, same))


@functools.lru_cache(maxsize=4)
def _fisher_batch(num_classes: int):
    """jit: (params, images, labels, mask) -> the squared gradient of the batch's mean
    cross-entropy over its real rows, the model in eval mode (EWC's importance)."""
    model = cls.SimpleCNN(num_classes=num_classes)

    def fisher(params, images, labels, mask):
        def loss(p):
            logits = model.apply({"params": p}, images)
            return _mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels), mask)
        return jax.tree.map(jnp.square, jax.grad(loss)(params))

    return jax.jit(fisher)


def ewc_importance(cfg: SolverConfig, params, images: np.ndarray, labels: np.ndarray):
    """EWC's importance of `params` on an experience's data: the mean over its minibatches
    (in order, cfg.batch_size rows, the last one partial) of the squared gradient of each
    minibatch's mean cross-entropy, dropout off (avalanche's compute_importances)."""
    batch = min(cfg.batch_size, len(images))
    rows_sharding, _ = shardings()
    place = functools.partial(gdata.global_rows, sharding=rows_sharding)
    fn = _fisher_batch(cfg.num_classes)
    n = gdata.steps_per_epoch(len(images), batch, drop_last=False)
    total = None
    for i in range(n):
        x, y = images[i * batch:(i + 1) * batch], labels[i * batch:(i + 1) * batch]
        real = (np.arange(batch) < len(x)).astype(np.float32)
        f = fn(params, place(gdata.pad_rows(x, batch)), place(gdata.pad_rows(y, batch)),
               place(real))
        total = f if total is None else jax.tree.map(jnp.add, total, f)
    return jax.tree.map(lambda t: t / n, total)


def shardings(mesh=None) -> tuple[NamedSharding, NamedSharding]:
    """(rows split over 'data', replicated) on `mesh` (default: every device, 1-D)."""
    mesh = mesh or gdata.data_sharding().mesh
    return NamedSharding(mesh, P("data")), NamedSharding(mesh, P())


def experience_data(strategy: str, train: gdata.ImageSplit, experiences, k: int):
    """The solver's real images for experience k (every experience so far if cumulative)."""
    if strategy == "cumulative":
        return train.select(gdata.seen_classes(experiences, k))
    return train.select(experiences[k])


def learn_experience(cfg: SolverConfig, state: SolverState, *, train: gdata.ImageSplit,
                     experiences, experience: int, seed: int, gen_apply: Callable,
                     gen_params, schedule: Schedule, flip: bool = False,
                     drop_last: bool = False, progress=None, reg=None,
                     gen_labels: ReplayLabels | None = None):
    """(the solver after experience k, its regulariser state): the previous solver frozen
    as the teacher of its replay (or of LwF), then trained on the experience's data
    (`train_experience`), replaying from `gen_params` (the previous generator; a
    conditional one asked for `gen_labels`) under "generative_replay" from k = 1 on, from
    ER's buffer of real images under "er"; EWC's importance and SI's consolidation follow
    the training (`reg`: `init_reg`'s state)."""
    state = state._replace(teacher=jax.tree.map(jnp.copy, state.params))
    data = experience_data(cfg.strategy, train, experiences, experience)
    memory, active = None, None
    if cfg.strategy == "er" and experience > 0:
        buffer = gmemory.buffer_indices(train.labels, experiences, experience,
                                        size=cfg.er_buffer_size, seed=seed,
                                        stream="solver_er_buffer")
        memory = (train.images[buffer], train.labels[buffer])
    if cfg.strategy == "lwf":
        active = np.zeros(cfg.num_classes, np.float32)
        if experience > 0:
            active[list(gdata.seen_classes(experiences, experience - 1))] = 1.0
    state, reg = train_experience(
        cfg, state, images=data.images, labels=data.labels, experience=experience, seed=seed,
        with_replay=cfg.strategy == "generative_replay" and experience > 0,
        gen_apply=gen_apply, gen_params=gen_params, schedule=schedule, flip=flip,
        drop_last=drop_last, progress=progress, reg=reg, memory=memory, active=active,
        gen_labels=gen_labels)
    if cfg.strategy == "ewc":
        importance = ewc_importance(cfg, state.params, data.images, data.labels)
        reg = reg_lib.ewc_store(reg, state.params, importance, experience)
    elif cfg.strategy == "si":
        reg = reg_lib.si_consolidate(reg, state.params, cfg.si_eps)
    return state, reg


def init_reg(cfg: SolverConfig, state: SolverState, num_experiences: int):
    """The regulariser state a solver strategy keeps (EWC, SI), replicated; None for the
    others."""
    reg = reg_lib.init(cfg.strategy, state.params, num_experiences)
    return None if reg is None else jax.device_put(reg, shardings()[1])


def _memory_rows(memory, *, seed: int, experience: int, epoch: int, step: int, rows: int,
                 flip: bool):
    """ER's memory rows (images, labels) of a solver step: `rows` drawn from the buffer
    (stream "solver_er_memory"), flipped like the real rows when `flip`."""
    images, labels = memory
    pick = rng.numpy_rng(seed, "solver_er_memory", experience, epoch, step).choice(
        len(images), rows, replace=len(images) < rows)
    x = images[pick]
    if flip:
        mask = rng.numpy_rng(seed, "solver_er_flip", experience, epoch, step).random(rows)
        x = gdata.flip_rows(x, mask < 0.5)
    return x, labels[pick]


def train_experience(cfg: SolverConfig, state: SolverState, *, images: np.ndarray,
                     labels: np.ndarray, experience: int, seed: int, with_replay: bool,
                     gen_apply: Callable | None = None, gen_params=None,
                     schedule: Schedule | None = None, flip: bool = False,
                     drop_last: bool = False, progress=None, reg=None, memory=None,
                     active=None, gen_labels: ReplayLabels | None = None):
    """Trains the solver on one experience's data (cfg.epochs epochs); returns (its state,
    the regulariser state `reg` as the steps left it).

    The previous solver (`state.teacher`) must already be frozen by the caller. Adam starts
    afresh. Each epoch visits the named stream "solver_order" permutation in batches of
    `cfg.batch_size`, the last one partial (padded and masked) unless `drop_last`; `flip`
    mirrors rows as the generator's batches are (stream "solver_flip"); dropout and replay
    keys come from the stream "solver_step" (with `cfg.replay_pool`, the replay rows from
    `replay_pool` and `pool_rows`). The baselines (BASELINES) take their own step:
    `memory` (images, labels) is ER's buffer, `active` [C] LwF's distilled classes. A
    class-conditional generator replays for `gen_labels` (`ReplayLabels`: the fresh
    replay's labels of step s of the experience are `gen_labels.draw` at s, the pool's at
    0). A rerun is identical.
    """
    batch = min(cfg.batch_size, len(images))
    if batch < 1:
        raise ValueError(f"experience {experience} has no training images for the solver")
    pooled = with_replay and cfg.replay_pool > 0
    baseline = cfg.strategy in BASELINES
    if baseline:
        step_fn = make_baseline_step(cfg)
    else:
        step_fn = make_step(cfg, gen_apply if with_replay and not pooled else None,
                            with_replay, pooled=pooled,
                            gen_labels=_traced(gen_labels) if with_replay and not pooled
                            else None)
    frozen = (gen_params, schedule) if with_replay else (None, None)
    fresh_labels = with_replay and not pooled and gen_labels is not None
    if pooled:
        pool = replay_pool(cfg, gen_apply, gen_params, schedule, seed=seed,
                           experience=experience, image_shape=images.shape[1:],
                           batch_size=batch, gen_labels=gen_labels)
    # On the mesh, like the step's outputs: arrays of another placement (a fresh optimizer
    # state) would make the second step of every experience compile again.
    rows_sharding, same = shardings()
    state = jax.device_put(state._replace(opt_state=make_optimizer(cfg).init(state.params)),
                           same)
    place = functools.partial(gdata.global_rows, sharding=rows_sharding)
    if active is not None:
        active = jax.device_put(jnp.asarray(active), same)
    key = rng.key(seed, "solver_step", experience)
    per_epoch = gdata.steps_per_epoch(len(images), batch, drop_last=drop_last)
    for epoch in range(cfg.epochs):
        order = rng.numpy_rng(seed, "solver_order", experience, epoch).permutation(len(images))
        losses = []  # stay on device until the epoch ends: one transfer per epoch
        for i in range(per_epoch):
            rows = order[i * batch:(i + 1) * batch]
            x = images[rows]
            if flip:
                mask = rng.numpy_rng(seed, "solver_flip", experience, epoch, i).random(len(rows))
                x = gdata.flip_rows(x, mask < 0.5)
            real = (np.arange(batch) < len(rows)).astype(np.float32)
            batch_in = (place(gdata.pad_rows(x, batch)),
                        place(gdata.pad_rows(labels[rows], batch)), place(real),
                        jnp.int32(experience))
            step_key = jax.random.fold_in(key, epoch * per_epoch + i)
            if baseline:
                mem = (None, None)
                if memory is not None:
                    mem = tuple(map(place, _memory_rows(memory, seed=seed,
                                                        experience=experience, epoch=epoch,
                                                        step=i, rows=batch, flip=flip)))
                state, reg, loss = step_fn(state, reg, *mem, *batch_in, active, step_key)
            else:
                if pooled:
                    frozen = (place(pool_rows(pool, seed=seed, experience=experience,
                                              epoch=epoch, step=i,
                                              rows=cfg.replay_size or batch)), None)
                asked = ()
                if fresh_labels:
                    asked = (place(gen_labels.draw(cfg.replay_size or batch, seed=seed,
                                                   experience=experience,
                                                   step=epoch * per_epoch + i)),)
                state, loss = step_fn(state, *frozen, *batch_in, step_key, *asked)
            losses.append(loss)
        check_finite([hosts.host_copy(loss) for loss in losses], experience=experience,
                     epoch=epoch, first_step=epoch * per_epoch)
        if progress is not None:
            progress.update(1)
    return state, reg


def accuracies(params, test: gdata.ImageSplit, experiences, k: int, *,
               num_classes: int) -> tuple[float, list[float]]:
    """(accuracy on the test images of experiences 0..k, [accuracy on each of them])."""
    seen = test.select(gdata.seen_classes(experiences, k))
    predictions = predict(params, seen.images, num_classes=num_classes)
    per = [metrics.accuracy(predictions[np.isin(seen.labels, experiences[j])],
                            seen.labels[np.isin(seen.labels, experiences[j])])
           for j in range(k + 1)]
    return metrics.accuracy(predictions, seen.labels), per


def metrics_row(overall: float, history: np.ndarray, k: int) -> dict[str, float]:
    """The experience row's solver metrics after experience k: accuracy on the classes
    seen, on each experience, and avalanche's forgetting (mean over j < k of the accuracy
    on j right after learning j minus now), from `history` [n, n] whose row i holds the
    per-experience accuracies after experience i (rows 0..k filled)."""
    row = {"classifier_accuracy": overall}
    row.update({f"classifier_acc_exp_{j}": float(history[k, j]) for j in range(k + 1)})
    row["classifier_forgetting"] = metrics.forgetting(history[:k + 1, :k + 1])
    return row


def check_finite(losses, *, experience: int, epoch: int, first_step: int) -> None:
    """Raises NonFiniteSolverLossError naming the first NaN or inf among an epoch's losses
    (`first_step`: the solver step of the experience at which the epoch began)."""
    losses = np.asarray(losses, np.float64)
    bad = np.flatnonzero(~np.isfinite(losses))
    if not len(bad):
        return
    i = int(bad[0])
    raise NonFiniteSolverLossError(
        f"non-finite solver loss ({losses[i]}) at experience {experience}, epoch {epoch}, "
        f"step {i} of the epoch (solver step {first_step + i} of the experience; "
        f"{len(bad)} of the epoch's {len(losses)} steps were non-finite); the run stops "
        f"before this solver is checkpointed. Lower solver.learning_rate, check the data, "
        f"or set solver.enabled=False to train the generator without the classifier.")


def steps_per_experience(cfg: SolverConfig, num_images: int, *, drop_last: bool = False) -> int:
    return cfg.epochs * gdata.steps_per_epoch(num_images, min(cfg.batch_size, num_images),
                                              drop_last=drop_last)


def _predictions(params, images):
    logits = cls.SimpleCNN(num_classes=cls.num_classes_of(params)).apply({"params": params},
                                                                       images)
    return jnp.argmax(logits, -1)


def predict(params, images: np.ndarray, *, num_classes: int, batch_size: int = 500,
            sharding=None) -> np.ndarray:
    """Class ids [N] of images [N, H, W, C] in [-1, 1] (dropout off), `batch_size` at a time
    (gdjax/eval/batching.py; with a `sharding`, split over its devices)."""
    del num_classes  # the head's width says it
    return batching.map_batches(_predictions, params, np.asarray(images, np.float32),
                                batch_size=batch_size, sharding=sharding)
