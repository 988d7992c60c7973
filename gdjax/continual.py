"""The experience loop: learn the experiences one after another, resumably.

config -> data + model + schedule -> compiled steps -> this loop -> checkpoints, metric
rows, sample grids, and an evaluation hook after each experience. A run killed at any
moment and restarted with the same workdir resumes from its last checkpoint and ends
with the same parameters and metrics: batches, noise and replay are pure functions of
(seed, experience, step). A full disk while writing metric rows, sample grids or params
stops the run with `DiskFullError`, naming what failed and the checkpoint a rerun resumes
from (checkpoint writes raise `CheckpointWriteError` the same way).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import logging
import os
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from gdjax import data as gdata
from gdjax.data import memory
from gdjax import generate, hosts, rng, strategies, unet
from gdjax.checkpoint import Checkpointer, CheckpointWriteError, config_fingerprint, pause_point
from gdjax.config import validate_config
from gdjax.convert import restore_params, save_params
from gdjax.eval import metrics as eval_metrics
from gdjax.eval import solver as solver_lib
from gdjax.grid import save_image_grid
from gdjax.logs import MetricLogger, Progress, read_metrics
from gdjax.schedule import make_schedule
from gdjax.strategies import StrategyConfig
from gdjax.train_step import OptimConfig, TrainState, init_state, make_optimizer, make_train_step

log = logging.getLogger(__name__)

# eval_hook(run, experience_index, params) -> {metric name: value}, logged per experience.
EvalHook = Callable[["Run", int, Any], dict]


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN or inf."""


class DiskFullError(RuntimeError):
    """A metric row, sample grid or params file could not be written: the disk is full.

    The checkpoints are untouched; the message names the one a rerun resumes from.
    """


@functools.lru_cache(maxsize=None)
def model_apply_fn(config: unet.UNetConfig) -> Callable:
    """apply_fn(params, x, t) for a UNet config; one stable function per config (jit cache)."""
    model = unet.UNet(config)

    def apply_fn(params, x, t):
        return model.apply({"params": params}, x, t)

    return apply_fn


@dataclasses.dataclass
class Run:
    """What a run is made of, built once from its config."""

    config: Any
    workdir: str
    unet_config: unet.UNetConfig
    apply_fn: Callable
    schedule: Any
    strategy: StrategyConfig
    optimizer: Any
    train: gdata.ImageSplit
    test: gdata.ImageSplit
    experiences: list
    sharding: NamedSharding  # the batch sharding; its mesh holds every device
    solver: solver_lib.SolverConfig | None = None  # the classifier trained alongside

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.sharding.mesh, P())

    @functools.cached_property
    def test_uint8(self) -> gdata.ImageSplit:
        """The test split as the reference's FID sees its real images: uint8, resized by
        PIL (`gdata.load_uint8_split`); read on first use."""
        d = self.config.data
        return gdata.load_uint8_split(d.name, source=d.source, data_dir=d.data_dir or None,
                                      image_size=d.image_size, channels=d.channels)

    @property
    def image_shape(self) -> tuple:
        c = self.unet_config
        return (c.sample_size, c.sample_size, c.in_channels)


def build(config, workdir: str) -> Run:
    """Validates the config and loads data, model, schedule and optimizer (no compilation)."""
    validate_config(config)
    d, t = config.data, config.train
    unet_config = unet.get_unet_config(config.model.name, dtype=config.model.dtype)
    if (unet_config.sample_size, unet_config.in_channels) != (d.image_size, d.channels):
        raise ValueError(
            f"model.name={config.model.name!r} takes {unet_config.sample_size}px images with "
            f"{unet_config.in_channels} channel(s), but data.image_size={d.image_size}, "
            f"data.channels={d.channels}: make them agree.")
    sharding = gdata.data_sharding()
    devices = sharding.mesh.shape["data"]
    gdata.check_batch_size(t.batch_size, devices, "train.batch_size")
    if config.strategy.replay_size:  # the replay rows are sharded like the batch
        gdata.check_batch_size(config.strategy.replay_size, devices, "strategy.replay_size")
    train, test = gdata.load_dataset(d.name, source=d.source, data_dir=d.data_dir or None,
                                     image_size=d.image_size, channels=d.channels)
    order = gdata.resolve_class_order(len(train.classes), seed=config.seed,
                                      fixed_order=tuple(d.class_order) or None)
    n_exp = 1 if t.mode != "continual" else d.n_experiences
    experiences = gdata.make_experiences(order, n_exp)
    return Run(config=config, workdir=workdir, unet_config=unet_config,
               apply_fn=model_apply_fn(unet_config),
               schedule=_schedule(tuple(config.diffusion.items())),
               strategy=strategy_config(config), optimizer=make_optimizer(OptimConfig(
                   learning_rate=t.learning_rate, grad_clip=t.grad_clip)),
               train=train, test=test, experiences=experiences, sharding=sharding,
               solver=solver_config(config, num_classes=max(train.classes) + 1))


# The solver's strategy under solver.strategy="auto": the classifier baselines follow the
# generator's; every other generator strategy replays from its previous generator.
AUTO_SOLVER = {strategies.NAIVE: "naive", strategies.CUMULATIVE: "cumulative"}


def solver_config(config, num_classes: int) -> solver_lib.SolverConfig | None:
    """The solver's settings, or None when it is off (and outside train.mode="continual")."""
    s = config.solver
    if not s.enabled or config.train.mode != "continual":
        return None
    strategy = s.strategy
    if strategy == "auto":
        strategy = AUTO_SOLVER.get(config.strategy.name, "generative_replay")
    cfg = solver_lib.SolverConfig(
        strategy=strategy, epochs=s.epochs, batch_size=s.batch_size,
        learning_rate=s.learning_rate, temperature=s.temperature, gen_steps=config.eval.steps,
        replay_size=s.replay_size, num_classes=num_classes)
    cfg.validate()
    return cfg


def strategy_config(config) -> StrategyConfig:
    s = config.strategy
    return StrategyConfig(name=s.name, lambd=s.lambd, weight_replay_loss=s.weight_replay_loss,
                          replay_start_timestep=s.replay_start_timestep,
                          teacher_steps=s.teacher_steps, teacher_eta=s.teacher_eta,
                          replay_size=s.replay_size)


# ----------------------------------------------------------------------------- data per step

def experience_data(run: Run, k: int) -> gdata.ImageSplit:
    """The training data of experience k (all experiences so far for `cumulative`)."""
    if run.strategy.name == strategies.CUMULATIVE:
        return run.train.select(gdata.seen_classes(run.experiences, k))
    return run.train.select(run.experiences[k])


def num_steps(run: Run, k: int) -> int:
    t = run.config.train
    if t.steps_per_experience > 0:
        return t.steps_per_experience
    return t.epochs_per_experience * gdata.steps_per_epoch(
        len(experience_data(run, k)), t.batch_size, drop_last=run.config.data.drop_last)


def er_buffer(run: Run, k: int) -> np.ndarray:
    """Train-set indices in the ER buffer while learning experience k (gdjax/data/memory.py)."""
    return memory.buffer_indices(run.train.labels, run.experiences, k,
                                 size=run.config.strategy.er_buffer_size, seed=run.config.seed)


def memory_batch(run: Run, buffer: np.ndarray, k: int, step: int, rows: int) -> np.ndarray:
    """ER's memory rows of `step` of experience k, flipped like the real rows."""
    return memory.memory_rows(run.train.images, buffer, rows=rows, seed=run.config.seed,
                              experience=k, step=step, flip=run.config.data.flip)


# ----------------------------------------------------------------------------- state and checkpoints

def initial_state(run: Run) -> tuple[TrainState, Any]:
    """Fresh student state and a teacher slot (a copy of the params until one is frozen)."""
    params = unet.init_params(run.unet_config, rng.key(run.config.seed, "unet_init"))
    teacher = jax.tree.map(jnp.copy, params)  # its own buffers: the state is donated
    if run.config.train.mode == "iid_distill":
        teacher = load_teacher(run)
    state = init_state(params, run.optimizer)
    return jax.device_put((state, teacher), run.replicated)


def initial_solver(run: Run) -> solver_lib.SolverState | None:
    """A fresh solver state (None when the run has no solver)."""
    if run.solver is None:
        return None
    return solver_lib.init_state(run.solver, rng.key(run.config.seed, "solver_init"),
                                 run.image_shape)


def load_teacher(run: Run):
    teacher_dir = run.config.train.teacher_dir
    if not teacher_dir or not os.path.isdir(teacher_dir):
        raise FileNotFoundError(
            f"train.teacher_dir={teacher_dir!r} is not a directory: iid_distill needs a trained "
            f"teacher saved with `python -m launch.convert` or a finished gdjax run's params.")
    teacher_config, params = restore_params(teacher_dir)
    if dataclasses.replace(teacher_config, dtype=run.unet_config.dtype) != run.unet_config:
        raise ValueError(f"the teacher in {teacher_dir} has UNet config {teacher_config}, but "
                         f"model.name={run.config.model.name!r} is {run.unet_config}.")
    return params


def _checkpoint_tree(state, teacher, key, solver) -> dict:
    tree = {"state": state, "teacher": teacher, "rng": jax.random.key_data(key)}
    if solver is not None:
        tree["solver"] = solver
    return tree


def save(tr: "Trainer", *, experience: int, step: int, skipped: int = 0) -> None:
    """Checkpoints everything a resume needs, as the start of (experience, step).

    `skipped`: updates dropped (train.on_nan="skip") since the last train row, which the
    next row counts; a resumed run takes them from here.
    """
    meta = {"experience": experience, "step_in_experience": step, "skipped": skipped,
            "fingerprint": config_fingerprint(tr.run.config.to_dict())}
    tr.ckpt.save(int(tr.state.step), _checkpoint_tree(tr.state, tr.teacher, tr.rng, tr.solver),
                 meta)


def restore(ckpt: Checkpointer, run: Run, template_state, template_teacher,
            template_solver=None):
    """(state, teacher, rng, solver, meta) of the newest good checkpoint, or None."""
    if ckpt.latest_step() is None:
        return None
    template = _checkpoint_tree(template_state, template_teacher, jax.random.key(0),
                                template_solver)
    tree, meta = ckpt.restore(template)
    if meta.get("fingerprint") != config_fingerprint(run.config.to_dict()):
        raise ValueError(
            f"{run.workdir} holds a run of a different config: use another --workdir, the "
            f"same config to resume it, or --overwrite to start over.")
    state, teacher = jax.device_put((tree["state"], tree["teacher"]), run.replicated)
    # From the host, uncommitted like a fresh run's key: a committed key made the first
    # step after every resume compile again.
    return (state, teacher, jax.random.wrap_key_data(np.asarray(tree["rng"])),
            tree.get("solver"), meta)


# ----------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class Trainer:
    """The mutable parts of a run in progress, threaded through the experience loop."""

    run: Run
    ckpt: Checkpointer
    logger: MetricLogger
    state: TrainState
    teacher: Any
    rng: jax.Array
    solver: solver_lib.SolverState | None = None

    def step_fn(self, with_replay: bool):
        """The compiled step: plain (first experience) or with the strategy's replay half."""
        run, t = self.run, self.run.config.train
        # The plain step is the same for every strategy: share its compilation.
        strategy = run.strategy if with_replay else StrategyConfig(strategies.NAIVE)
        return _compiled_step(run.unet_config, tuple(run.config.diffusion.items()), strategy,
                              OptimConfig(learning_rate=t.learning_rate, grad_clip=t.grad_clip),
                              t.criterion, with_replay, run.sharding.mesh,
                              t.mode == "iid_distill", t.on_nan)


@functools.lru_cache(maxsize=16)
def _compiled_step(unet_config, diffusion, strategy, optim, criterion, with_replay, mesh,
                   distill_only, on_nan="stop"):
    """One jitted step per distinct setting, kept across runs in a process (sweeps, tests)."""
    return make_train_step(apply_fn=model_apply_fn(unet_config), schedule=_schedule(diffusion),
                           strategy=strategy, optimizer=make_optimizer(optim),
                           criterion=criterion, with_replay=with_replay, mesh=mesh,
                           distill_only=distill_only, on_nan=on_nan)


@functools.lru_cache(maxsize=8)
def _schedule(diffusion: tuple):
    d = dict(diffusion)
    return make_schedule(d["beta_schedule"], num_train_timesteps=d["num_train_timesteps"],
                         beta_start=d["beta_start"], beta_end=d["beta_end"],
                         rescale_zero_snr=d["rescale_zero_snr"])


def _uses_replay(run: Run, k: int) -> bool:
    if run.config.train.mode == "iid_distill":
        return True
    return k > 0 and run.strategy.name not in (strategies.NAIVE, strategies.CUMULATIVE)


def _check_finite(metrics: dict, k: int, step: int, global_step: int, since: int) -> None:
    """Raises NonFiniteLossError if a metric is NaN or inf (train.on_nan="stop").

    `since`: the 0-based step of the previous (finite) check in this experience, or -1.
    """
    bad = [name for name, v in metrics.items() if not np.isfinite(v)]
    if not bad:
        return
    first = step if since == step - 1 else f"{since + 1}..{step}"
    raise NonFiniteLossError(
        f"non-finite {', '.join(bad)} at experience {k}, step {step} (global step {global_step}; "
        f"it first appeared at step {first}: metrics are checked at logging and checkpoint "
        f"steps); the last good checkpoint is kept. Lower train.learning_rate, check the data, "
        f"or set train.on_nan='skip' to drop such updates.")


def train_experience(tr: Trainer, k: int, start: int, skipped: int = 0) -> None:
    """Steps start..end of experience k, with logging and periodic checkpoints.

    `skipped`: updates dropped since the last train row before `start` (from the checkpoint).
    """
    run, t = tr.run, tr.run.config.train
    data, total = experience_data(run, k), num_steps(run, k)
    with_replay = _uses_replay(run, k)
    step_fn = tr.step_fn(with_replay)
    extra = None
    if run.strategy.name == strategies.ER and with_replay:
        buffer, rows = er_buffer(run, k), run.strategy.replay_size or t.batch_size
        extra = lambda s: {"memory": memory_batch(run, buffer, k, s, rows)}  # noqa: E731
    batches = gdata.batch_iterator(data.images, data.labels, batch_size=t.batch_size,
                                   seed=run.config.seed, experience=k, start_step=start,
                                   num_steps=total, flip=run.config.data.flip,
                                   drop_last=run.config.data.drop_last, sharding=run.sharding,
                                   prefetch=run.config.data.prefetch, extra=extra)
    progress = Progress(total - start, f"exp {k + 1}/{len(run.experiences)}")
    reported, checked, skipped = start, start - 1, jnp.int32(skipped)
    with batches:
        for s in range(start, total):
            batch = next(batches)
            batch.pop("label")  # the generator is unconditional
            tr.state, metrics = step_fn(tr.state, tr.teacher, batch, tr.rng)
            pause_point("train_step", k, s)  # test-only; the update exists only in memory
            if t.on_nan == "skip":
                skipped = skipped + metrics.pop("skipped")  # stays on device until logged
            logs, saves = (s + 1) % t.log_every == 0 or s + 1 == total, _saves_at(t, s, total)
            if not (logs or saves):
                continue
            values = {name: float(v) for name, v in jax.device_get(metrics).items()}
            if t.on_nan == "stop":
                # Also before a checkpoint: a NaN between logging steps must never be saved.
                _check_finite(values, k, s, int(tr.state.step), since=checked)
                checked = s
            if logs:
                if t.on_nan == "skip":
                    values["skipped"], skipped = int(skipped), jnp.int32(0)
                log_row(tr, "train", int(tr.state.step), {"experience": k, **values})
                progress.update(s + 1 - reported, loss=values["loss"])
                reported = s + 1
            if saves:
                save(tr, experience=k, step=s + 1,
                     skipped=int(skipped) if t.on_nan == "skip" else 0)
    progress.close()


def _saves_at(t, s: int, total: int) -> bool:
    """Whether step s (0-based) ends with a mid-experience checkpoint."""
    return (s + 1) % t.checkpoint_every == 0 and s + 1 < total


def end_experience(tr: Trainer, k: int, eval_hook: EvalHook | None) -> None:
    """Sample grid, evaluation, and the boundary checkpoint (which resumes at k + 1)."""
    run = tr.run
    params = tr.state.params
    e = run.config.eval
    images = generate.generate(run.apply_fn, params, run.schedule,
                               rng.key(run.config.seed, "sample_grid", k),
                               num=e.grid_samples, image_shape=run.image_shape,
                               num_steps=e.steps, eta=e.eta, batch_size=e.grid_samples)
    if hosts.is_writer():
        path = os.path.join(run.workdir, "samples", f"experience_{k}.png")
        with writing(tr.ckpt, f"the sample grid of experience {k} to {path}"):
            save_image_grid(images, path, upscale=max(1, 64 // run.image_shape[0]))
    if e.save_experience_params and hosts.is_writer():
        # Before the row is logged: a run killed in between saves them again on resume.
        path = experience_params_dir(run.workdir, k)
        with writing(tr.ckpt, f"the params of experience {k} to {path}"):
            save_params(path, params, run.unet_config)
    row = {"experience": k, "classes_seen": len(gdata.seen_classes(run.experiences, k))}
    if tr.solver is not None:
        row.update(solver_metrics(tr, k))
    if eval_hook is not None:
        pause_point("evaluation", k)  # test-only
        row.update(eval_hook(run, k, params))
    log_row(tr, "experience", int(tr.state.step), row)
    with writing(tr.ckpt, f"the metric rows to {os.path.join(run.workdir, 'metrics')} (fsync)"):
        tr.logger.flush()
    save(tr, experience=k + 1, step=0)
    tr.ckpt.wait()


def log_row(tr: Trainer, stream: str, step: int, row: dict) -> None:
    """Appends one metric row; a full disk raises DiskFullError."""
    path = os.path.join(tr.run.workdir, "metrics", f"{stream}.jsonl")
    with writing(tr.ckpt, f"the {stream!r} metric row of step {step} to {path}"):
        tr.logger.write(stream, step, row)


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(err: BaseException | None) -> bool:
    """Whether `err`, or an error it was raised from, says the disk (or quota) is full."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _DISK_FULL:
            return True
        # Orbax and tensorstore re-raise OS errors as their own types, with the text kept.
        if any(os.strerror(code) in str(err) for code in _DISK_FULL):
            return True
        err = err.__cause__ or err.__context__
    return False


@contextlib.contextmanager
def writing(ckpt: Checkpointer, what: str):
    """Runs a write of a run output; a full disk raises DiskFullError naming `what` and the
    checkpoint that a rerun resumes from (other errors pass through)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - orbax raises many types; only a full disk is ours
        if isinstance(e, (DiskFullError, CheckpointWriteError)) or not _disk_full(e):
            raise
        raise DiskFullError(f"could not write {what}: the disk is full ({type(e).__name__}: "
                            f"{e}); {_resume_note(ckpt)}") from e


def _resume_note(ckpt: Checkpointer) -> str:
    try:
        ckpt.wait()
    except CheckpointWriteError:
        pass  # the checkpoint in flight hit the full disk too: the newest good one is older
    step = ckpt.latest_step()
    if step is None:
        return "no checkpoint was written yet: free some space and rerun to start over"
    return (f"the last checkpoint (step {step}) is intact: free some space and rerun with the "
            f"same workdir to resume from it")


def experience_params_dir(workdir: str, k: int) -> str:
    """Where the generator's params after experience k are kept (`eval.save_experience_params`)."""
    return os.path.join(workdir, "experience_params", f"experience_{k}")


# ----------------------------------------------------------------------------- the solver

def solver_data(run: Run, k: int) -> gdata.ImageSplit:
    """The solver's real images for experience k (every experience so far if cumulative)."""
    if run.solver.strategy == "cumulative":
        return run.train.select(gdata.seen_classes(run.experiences, k))
    return run.train.select(run.experiences[k])


def train_solver(tr: Trainer, k: int) -> solver_lib.SolverState:
    """Freezes the previous solver, then trains the solver on experience k (before the
    generator learns it); replay comes from the frozen previous generator `tr.teacher`."""
    run, cfg = tr.run, tr.run.solver
    state = tr.solver._replace(teacher=jax.tree.map(jnp.copy, tr.solver.params))
    data = solver_data(run, k)
    with_replay = cfg.strategy == "generative_replay" and k > 0
    progress = Progress(cfg.epochs, f"solver {k + 1}/{len(run.experiences)} (epochs)")
    pause_point("solver", k)  # test-only
    state = solver_lib.train_experience(
        cfg, state, images=data.images, labels=data.labels, experience=k,
        seed=run.config.seed, with_replay=with_replay, gen_apply=run.apply_fn,
        gen_params=tr.teacher, schedule=run.schedule, flip=run.config.data.flip,
        drop_last=run.config.data.drop_last, progress=progress)
    progress.close()
    return state


def solver_metrics(tr: Trainer, k: int) -> dict[str, float]:
    """The solver's test accuracy on experiences 0..k, per experience and overall, and its
    forgetting (avalanche's: mean over j < k of acc_j right after learning j minus now)."""
    run, cfg = tr.run, tr.run.solver
    seen = run.test.select(gdata.seen_classes(run.experiences, k))
    predictions = solver_lib.predict(tr.solver.params, seen.images, num_classes=cfg.num_classes)
    out = {"classifier_accuracy": eval_metrics.accuracy(predictions, seen.labels)}
    for j in range(k + 1):
        mask = np.isin(seen.labels, run.experiences[j])
        out[f"classifier_acc_exp_{j}"] = eval_metrics.accuracy(predictions[mask],
                                                               seen.labels[mask])
    # acc[i, j] from the rows of earlier experiences (exactly once across resumes).
    acc = np.zeros((k + 1, k + 1))
    for row in read_metrics(run.workdir, "experience"):
        i = int(row["experience"])
        if i < k:
            acc[i, :i + 1] = [row[f"classifier_acc_exp_{j}"] for j in range(i + 1)]
    acc[k] = [out[f"classifier_acc_exp_{j}"] for j in range(k + 1)]
    out["classifier_forgetting"] = eval_metrics.forgetting(acc)
    return out


def train(config, workdir: str, *, eval_hook: EvalHook | None = None,
          overwrite: bool = False) -> TrainState:
    """Runs (or resumes) the whole experience sequence in `workdir`; returns the final state.

    `overwrite` first deletes what an earlier run left in `workdir` (checkpoints, metrics,
    samples, final params), so a workdir of another config can be reused. Raises
    NonFiniteLossError (train.on_nan="stop"), and DiskFullError or CheckpointWriteError
    when the disk fills up; in every case the last checkpoint stays usable.
    """
    run = build(config, workdir)
    if overwrite and hosts.is_writer():
        wipe_workdir(workdir)
    os.makedirs(workdir, exist_ok=True)
    hosts.barrier("gdjax: workdir ready")
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.train.max_to_keep)
    state, teacher = initial_state(run)
    solver = initial_solver(run)
    key = rng.key(config.seed, "train_step")
    restored = restore(ckpt, run, state, teacher, solver)
    k, start, skipped = 0, 0, 0
    if restored is not None:
        state, teacher, key, solver, meta = restored
        k, start = meta["experience"], meta["step_in_experience"]
        skipped = meta.get("skipped", 0)
        log.info("resuming %s at experience %d, step %d", workdir, k, start)
    # Every process has read the checkpoint before process 0 writes (and prunes) any.
    hosts.barrier("gdjax: restored")
    logger = _NullLogger()
    if hosts.is_writer():
        with writing(ckpt, f"the metric rows to {os.path.join(workdir, 'metrics')}"):
            logger = MetricLogger(workdir, resume_step=_resume_step(run, restored, state),
                                  tensorboard=config.log.tensorboard, wandb=config.log.wandb,
                                  config=config.to_dict())
    tr = Trainer(run, ckpt, logger, state, teacher, key, solver)
    try:
        for k in range(k, len(run.experiences)):
            if start == 0 and k > 0 and config.train.mode == "continual":
                # Freeze the model as it ended experience k - 1, in buffers of its own
                # (the state's are donated to the next step).
                tr.teacher = jax.tree.map(jnp.copy, tr.state.params)
            if start == 0 and tr.solver is not None:
                # The classifier learns experience k first (REFERENCE §6). A run killed
                # before the next checkpoint redoes this deterministically.
                tr.solver = train_solver(tr, k)
            if start == 0 and k > 0 and config.train.reset_optimizer:
                # Adam starts afresh each experience, as avalanche resets the reference's
                # optimizer; inside an experience the checkpoint carries its state.
                tr.state = tr.state._replace(opt_state=jax.device_put(
                    run.optimizer.init(tr.state.params), run.replicated))
            # Placed like the step's output: an uncommitted scalar here made the second
            # step of every experience compile the step again.
            tr.state = tr.state._replace(
                experience=jax.device_put(np.int32(k), run.replicated))
            train_experience(tr, k, start, skipped)
            end_experience(tr, k, eval_hook)
            start, skipped = 0, 0
        # The final model on its own, in the format launch/convert.py writes: a teacher for
        # train.mode="iid_distill" or for evaluation.
        if hosts.is_writer():
            path = os.path.join(workdir, "final_params")
            with writing(ckpt, f"the final params to {path}"):
                save_params(path, tr.state.params, run.unet_config)
    finally:
        try:
            with writing(ckpt, f"the metric rows to {os.path.join(workdir, 'metrics')} (closing)"):
                logger.close()
        finally:
            ckpt.close()
    return tr.state


class _NullLogger:
    """The logger of processes other than 0 in a multi-host run: process 0 writes the rows."""

    def write(self, stream, step, metrics) -> None:
        del stream, step, metrics

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


# What a run writes into its workdir; `overwrite` deletes exactly these.
RUN_OUTPUTS = ("checkpoints", "metrics", "samples", "tensorboard", "final_params",
               "experience_params", "config.json", "wandb_run_id")


def wipe_workdir(workdir: str) -> None:
    """Deletes a run's outputs from `workdir` (other files stay)."""
    for name in RUN_OUTPUTS:
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _resume_step(run: Run, restored, state) -> int | None:
    """The MetricLogger's resume_step: the checkpoint's step; -1 for a run of this config
    killed before its first checkpoint (its rows are dropped); None for a fresh workdir.

    config.json is written first of all, so its presence marks a started run.
    """
    if restored is not None:
        return int(state.step)
    path = os.path.join(run.workdir, "config.json")
    if not os.path.exists(path):
        _write_config(run.workdir, run.config)
        return None
    with open(path) as f:
        written = json.load(f)
    if config_fingerprint(written) != config_fingerprint(_json_config(run.config)):
        raise ValueError(
            f"{run.workdir} holds a run of a different config (see its config.json): use "
            f"another --workdir, the same config to resume it, or --overwrite to start over.")
    return -1


def _json_config(config) -> dict:
    return json.loads(json.dumps(config.to_dict(), default=str))


def _write_config(workdir: str, config) -> None:
    # Atomic: a kill mid-write must not leave a torn config.json that blocks the restart.
    path = os.path.join(workdir, "config.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(_json_config(config), f, indent=2)
    os.replace(tmp, path)
