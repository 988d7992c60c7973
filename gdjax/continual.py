"""The experience loop: learn the experiences one after another, resumably.

settings -> run (gdjax/run.py) -> compiled steps -> this loop -> checkpoints, metric rows,
sample grids, and an evaluation hook after each experience (and every eval.every_steps
steps within one, each such evaluation checkpointed; metrics/eval.jsonl), with the wall
time of each phase in metrics/timing.jsonl and the generator's model FLOPs per experience
in metrics/compute.jsonl (gdjax/compute.py). What changes as the loop goes
is one value, `LoopState` (the train state, the frozen teacher, the solver's state and its
accuracies, the run's key): each loop function takes it and returns the next one, and as
it stands it is the checkpoint tree. A run killed at any moment and restarted with the same
workdir resumes from its last checkpoint and ends with the same parameters and metrics:
batches, noise and replay are pure functions of (seed, experience, step). The workdir's
paths and its guarded writes are gdjax/rundir.py's; a full disk stops the run with
`rundir.DiskFullError`, naming what failed and the checkpoint a rerun resumes from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gdjax import data as gdata
from gdjax import compute, hosts, regularisers, rng, rundir
from gdjax.checkpoint import Checkpointer, CheckpointWriteError
from gdjax.convert import save_params
from gdjax.eval import sampling
from gdjax.eval import solver as solver_lib
from gdjax.grid import save_image_grid
from gdjax.logs import MetricLogger, NullLogger, Progress
from gdjax.run import Run, build
from gdjax.state import LoopState, checkpoint_tree, initial_state, on_mesh, restore
from gdjax.train_step import TrainState

log = logging.getLogger(__name__)

# eval_hook(run, experience_index, params) -> {metric name: value}, logged per experience.
EvalHook = Callable[[Run, int, Any], dict]


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN or inf."""


@dataclasses.dataclass(frozen=True)
class Callbacks:
    """Calls at the loop's boundaries, for monitoring, profiling or tests (each optional):
    `after_step(experience, step)` once step `step` (0-based, within the experience) is
    dispatched, `before_solver(experience)` as the solver starts an experience,
    `before_evaluation(experience)` after the grid and params of an experience are written,
    before its evaluation hook and metric row."""

    after_step: Callable[[int, int], None] | None = None
    before_solver: Callable[[int], None] | None = None
    before_evaluation: Callable[[int], None] | None = None


# ----------------------------------------------------------------------------- the loop

class Timer:
    """Wall seconds by phase since the last `split` (the timing rows): time inside
    `phase(name)` counts as `name`, the rest as `train_s` (the generator's steps, their
    compilation, data and checkpoints)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._start = clock()
        self._phases: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        start = self._clock()
        try:
            yield
        finally:
            self._phases[name] = self._phases.get(name, 0.0) + self._clock() - start

    def split(self) -> dict[str, float]:
        """{"wall_s", "train_s", and each phase's seconds} since the last split; resets."""
        now = self._clock()
        wall = now - self._start
        out = {"wall_s": wall, "train_s": wall - sum(self._phases.values()), **self._phases}
        self._start, self._phases = now, {}
        return out


class Loop(NamedTuple):
    """What stays fixed while a run trains."""

    run: Run
    ckpt: Checkpointer
    logger: Any  # MetricLogger, or NullLogger on processes other than 0
    eval_hook: EvalHook | None
    callbacks: Callbacks
    timer: Timer
    flops: compute.GeneratorFlops


def save(loop: Loop, ls: LoopState, *, experience: int, step: int) -> None:
    """Checkpoints `ls` as the start of (experience, step)."""
    meta = {"experience": experience, "step_in_experience": step,
            "fingerprint": rundir.run_fingerprint(loop.run.workdir, loop.run.settings.config)}
    loop.ckpt.save(int(ls.train.step), checkpoint_tree(ls), meta)


# ----------------------------------------------------------------------------- writing

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


def writing(loop: Loop, what: str):
    """`rundir.writing` with this run's resume note (checkpoint errors pass through)."""
    return rundir.writing(what, functools.partial(_resume_note, loop.ckpt),
                          passes=(CheckpointWriteError,))


def log_row(loop: Loop, stream: str, step: int, row: dict) -> None:
    """Appends one metric row; a full disk raises DiskFullError."""
    path = os.path.join(rundir.metrics_dir(loop.run.workdir), f"{stream}.jsonl")
    with writing(loop, f"the {stream!r} metric row of step {step} to {path}"):
        loop.logger.write(stream, step, row)


def _save_outputs(loop: Loop, k: int, params) -> None:
    """Experience k's sample grid and (eval.save_experience_params) generator params."""
    run, e = loop.run, loop.run.settings.eval
    images = sampling.generate(run.apply_fn, params, run.schedule,
                               rng.key(run.settings.seed, "sample_grid", k), num=e.grid_samples,
                               image_shape=run.image_shape, num_steps=e.steps, eta=e.eta,
                               batch_size=e.grid_samples, sharding=run.sharding,
                               labels=run.sample_labels(k))
    if not hosts.is_writer():
        return
    path = rundir.sample_grid(run.workdir, k)
    with writing(loop, f"the sample grid of experience {k} to {path}"):
        save_image_grid(images, path, upscale=max(1, 64 // run.image_shape[0]))
    if e.save_experience_params:
        # Before the row is logged: a run killed in between saves them again on resume.
        path = rundir.experience_params_dir(run.workdir, k)
        with writing(loop, f"the params of experience {k} to {path}"):
            save_params(path, params, run.settings.unet)


# ----------------------------------------------------------------------------- the loop

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


def evaluated_params(train: TrainState):
    """The params that are scored, shown and saved: the moving average when the run keeps
    one (train.ema_decay > 0), else the params."""
    return train.params if train.ema is None else train.ema


def begin_experience(loop: Loop, ls: LoopState, k: int) -> LoopState:
    """The state that starts experience k: the teacher frozen as the model ended k - 1,
    Adam afresh (train.reset_optimizer, as the reference), the solver trained on k."""
    run, s = loop.run, loop.run.settings
    if k > 0 and s.train.mode == "continual":
        # In buffers of its own: the state's are donated to the next step.
        frozen = ls.train.ema if s.train.ema_teacher else ls.train.params
        ls = ls._replace(teacher=jax.tree.map(jnp.copy, frozen))
    if k > 0 and s.train.reset_optimizer:
        ls = ls._replace(train=ls.train._replace(
            opt_state=on_mesh(run, run.optimizer.init(ls.train.params))))
    if ls.solver is not None:
        ls = train_solver(loop, ls, k)
    return ls


def train_solver(loop: Loop, ls: LoopState, k: int) -> LoopState:
    """The solver learns experience k before the generator does (REFERENCE §6), replaying
    from the frozen previous generator `ls.teacher` (a class-conditional one asked for the
    classes it has learned, `Run.solver_replay_labels`). A run killed before the next
    checkpoint redoes this deterministically."""
    run, s = loop.run, loop.run.settings
    if loop.callbacks.before_solver is not None:
        loop.callbacks.before_solver(k)
    progress = Progress(s.solver.epochs, f"solver {k + 1}/{len(run.experiences)}",
                        unit="epoch")
    with loop.timer.phase("solver_s"):
        solver, reg = solver_lib.learn_experience(
            s.solver, ls.solver, train=run.train, experiences=run.experiences, experience=k,
            seed=s.seed, gen_apply=run.apply_fn, gen_params=ls.teacher, schedule=run.schedule,
            flip=s.data.flip, drop_last=s.data.drop_last, progress=progress,
            reg=ls.solver_reg, gen_labels=run.solver_replay_labels(k))
    progress.close()
    return ls._replace(solver=solver, solver_reg=reg)


def call_groups(start: int, total: int, steps_per_call: int, *every: int) -> list:
    """How steps start..total-1 are dispatched (train.steps_per_call): runs of at most
    `steps_per_call` steps, none across a multiple of any of `every` (the checkpoint and
    evaluation intervals; 0 for none)."""
    groups, s = [], start
    while s < total:
        end = min([s + steps_per_call, total] + [(s // n + 1) * n for n in every if n > 0])
        groups.append(end - s)
        s = end
    return groups


def train_experience(loop: Loop, ls: LoopState, k: int, start: int) -> LoopState:
    """Steps start..end of experience k, with logging and periodic checkpoints; with
    train.steps_per_call = n > 1, up to n steps per dispatch (`call_groups`), logged,
    checked and checkpointed at the same steps as one by one."""
    run, t = loop.run, loop.run.settings.train
    total = run.num_steps(k)
    per_call, every = t.steps_per_call, loop.run.settings.eval.every_steps
    groups = (call_groups(start, total, per_call, t.checkpoint_every, every)
              if per_call > 1 else None)
    step = run.step(run.uses_replay(k), *([per_call] if per_call > 1 else []))
    progress = Progress(total - start, f"exp {k + 1}/{len(run.experiences)}")
    reported, checked, first = start, start - 1, start
    with run.batches(k, start, total, groups=groups) as batches:
        for n in groups or [1] * (total - start):
            batch = next(batches)
            if not run.settings.class_conditional:
                batch.pop("label")  # an unconditional generator reads no labels
            if groups is None:
                train, stacked = step(ls.train, ls.teacher, batch, ls.key)
            else:
                train, stacked = step(ls.train, ls.teacher, batch, np.int32(n), ls.key)
            ls = ls._replace(train=train)
            for j in range(n):
                s = first + j
                if loop.callbacks.after_step is not None:  # the update exists only in memory
                    loop.callbacks.after_step(k, s)
                logs = (s + 1) % t.log_every == 0 or s + 1 == total
                evaluates = every > 0 and (s + 1) % every == 0 and s + 1 < total
                # An evaluation is checkpointed, so that a resume never redoes or skips one.
                saves = ((s + 1) % t.checkpoint_every == 0 or evaluates) and s + 1 < total
                if not (logs or saves):
                    continue
                values = jax.device_get(stacked if groups is None else
                                        jax.tree.map(lambda v, j=j: v[j], stacked))
                values = {name: float(v) for name, v in values.items()}
                done = int(train.step) - n + 1 + j  # the global step count after step s
                if t.on_nan == "stop":
                    # Also before a checkpoint: a NaN between logging steps must never be saved.
                    _check_finite(values, k, s, done, since=checked)
                    checked = s
                if logs:
                    if t.on_nan == "skip":  # updates dropped so far, as of this step
                        values["skipped"] = int(values["skipped"])
                    log_row(loop, "train", done, {"experience": k, **values})
                    progress.update(s + 1 - reported, loss=values["loss"])
                    reported = s + 1
                if evaluates:  # before the checkpoint: a kill in between redoes it
                    evaluate_within(loop, ls, k, s + 1, done)
                if saves:  # only at the end of a call (`call_groups`)
                    save(loop, ls, experience=k, step=s + 1)
            first += n
    progress.close()
    return ls


def evaluate_within(loop: Loop, ls: LoopState, k: int, steps_done: int,
                    global_step: int) -> None:
    """eval.every_steps: the evaluation hook on the params after `steps_done` steps of
    experience k, its row in metrics/eval.jsonl, and the time since the last timing row."""
    row = {"experience": k, "step_in_experience": steps_done}
    if loop.eval_hook is not None:
        with loop.timer.phase("eval_s"):
            row.update(loop.eval_hook(loop.run, k, evaluated_params(ls.train)))
    log_row(loop, "eval", global_step, row)
    log_timing(loop, k, global_step)


def log_timing(loop: Loop, k: int, global_step: int) -> None:
    """The seconds spent since the last timing row (or this process's start, or resume),
    by phase: metrics/timing.jsonl."""
    log_row(loop, "timing", global_step, {"experience": k, **loop.timer.split()})


def _evaluate_end(loop: Loop, ls: LoopState, k: int, params) -> tuple[LoopState, dict]:
    """Experience k's sample grid, saved params, solver accuracies and evaluation: (the
    loop state with the accuracies, the experience's metric row)."""
    run = loop.run
    _save_outputs(loop, k, params)
    row = {"experience": k, "classes_seen": len(gdata.seen_classes(run.experiences, k))}
    if ls.solver is not None:
        overall, per = solver_lib.accuracies(ls.solver.params, run.test, run.experiences, k,
                                             num_classes=run.settings.solver.num_classes)
        accuracy = ls.accuracy.copy()
        accuracy[k, :k + 1] = per
        ls = ls._replace(accuracy=accuracy)
        row.update(solver_lib.metrics_row(overall, accuracy, k))
    if loop.eval_hook is not None:
        if loop.callbacks.before_evaluation is not None:
            loop.callbacks.before_evaluation(k)
        row.update(loop.eval_hook(run, k, params))
    return ls, row


def consolidate_regulariser(loop: Loop, ls: LoopState, k: int) -> LoopState:
    """strategy.regulariser: experience k's importance added (EWC / MAS measure theirs on
    its data here, in jitted code), the anchor moved to the params it ended with. Nothing
    after the last experience, which no later one is held to."""
    run, cfg = loop.run, loop.run.settings.regulariser
    if ls.train.reg is None or k + 1 >= len(run.experiences):
        return ls
    importance = None
    with loop.timer.phase("regulariser_s"):
        if cfg.name in regularisers.DATA_IMPORTANCE:
            n = run.regulariser_batches(k)
            fn = run.importance_fn()
            progress = Progress(n, f"{regularisers.LABELS[cfg.name]} importance {k + 1}/"
                                   f"{len(run.experiences)}")
            with run.batches(k, 0, n) as batches:
                rows = ({"image": b["image"], "mask": b["mask"]} for b in batches)
                importance = regularisers.mean_importance(
                    fn, ls.train.params, rows, rng.key(run.settings.seed,
                                                       "generator_importance", k), progress)
            progress.close()
        reg = jax.jit(functools.partial(regularisers.consolidate, cfg))(
            ls.train.reg, ls.train.params, importance)
    return ls._replace(train=ls.train._replace(reg=reg))


def end_experience(loop: Loop, ls: LoopState, k: int) -> LoopState:
    """The regulariser's consolidation, sample grid, solver metrics, evaluation, and the
    boundary checkpoint (which resumes at k + 1)."""
    run = loop.run
    ls = consolidate_regulariser(loop, ls, k)
    params = evaluated_params(ls.train)
    with loop.timer.phase("eval_s"):
        ls, row = _evaluate_end(loop, ls, k, params)
    log_row(loop, "experience", int(ls.train.step), row)
    log_timing(loop, k, int(ls.train.step))
    log_row(loop, "compute", int(ls.train.step), loop.flops.experience_row(ls, k))
    with writing(loop, f"the metric rows to {rundir.metrics_dir(run.workdir)} (fsync)"):
        loop.logger.flush()
    save(loop, ls, experience=k + 1, step=0)
    loop.ckpt.wait()
    return ls


def run_experiences(loop: Loop, ls: LoopState, first: int, start: int) -> LoopState:
    """Experiences first.. of the run, the first from step `start` (a resume)."""
    run = loop.run
    for k in range(first, len(run.experiences)):
        if start == 0:
            ls = begin_experience(loop, ls, k)
        # Placed like the step's output (see `on_mesh`).
        ls = ls._replace(train=ls.train._replace(experience=on_mesh(run, np.int32(k))))
        ls = train_experience(loop, ls, k, start)
        ls = end_experience(loop, ls, k)
        start = 0
    return ls


# ----------------------------------------------------------------------------- a whole run

def _open_logger(run: Run, resumed_step: int | None, ckpt: Checkpointer):
    """The MetricLogger of process 0 (a NullLogger elsewhere), its streams cut back to the
    restored step. A fresh workdir gets config.json first of all; a run of this config
    killed before its first checkpoint starts over (its rows are dropped); a workdir of
    another config is refused."""
    if not hosts.is_writer():
        return NullLogger()
    s = run.settings
    with rundir.writing(f"the metric rows to {rundir.metrics_dir(run.workdir)}",
                        functools.partial(_resume_note, ckpt)):
        return MetricLogger(run.workdir, resume_step=_resume_step(run, resumed_step),
                            tensorboard=s.log.tensorboard, wandb=s.log.wandb, config=s.config)


def _resume_step(run: Run, resumed_step: int | None) -> int | None:
    if resumed_step is not None:
        return resumed_step
    if not os.path.exists(rundir.config_path(run.workdir)):
        rundir.write_config(run.workdir, run.settings.config)
        return None
    if rundir.fingerprint(rundir.read_config(run.workdir)) != rundir.run_fingerprint(
            run.workdir, run.settings.config):
        raise ValueError(
            f"{run.workdir} holds a run of a different config (see its config.json): use "
            f"another --workdir, the same config to resume it, or --overwrite to start over.")
    return -1


def _start(run: Run, ckpt: Checkpointer) -> tuple[LoopState, int, int, int | None]:
    """(loop state, experience, step within it, restored global step or None) to start
    from: the newest checkpoint's, or a fresh run's."""
    fresh = initial_state(run)
    restored = restore(ckpt, run, fresh)
    if restored is None:
        return fresh, 0, 0, None
    ls, k, start = restored
    log.info("resuming %s at experience %d, step %d", run.workdir, k, start)
    return ls, k, start, int(ls.train.step)


def train(config, workdir: str, *, eval_hook: EvalHook | None = None,
          overwrite: bool = False, callbacks: Callbacks | None = None) -> TrainState:
    """Runs (or resumes) the whole experience sequence in `workdir`; returns the final state.

    `config`: a ConfigDict (configs/*.py) or its `run.Settings`. `overwrite` first deletes
    what an earlier run left in `workdir` (rundir.RUN_OUTPUTS), so a workdir of another
    config can be reused. Raises NonFiniteLossError (train.on_nan="stop"), and
    DiskFullError or CheckpointWriteError when the disk fills up; in every case the last
    checkpoint stays usable.
    """
    run = build(config, workdir)
    if overwrite and hosts.is_writer():
        rundir.wipe(workdir)
    os.makedirs(workdir, exist_ok=True)
    hosts.barrier("gdjax: workdir ready")
    ckpt = Checkpointer(rundir.checkpoints_dir(workdir),
                        max_to_keep=run.settings.train.max_to_keep)
    ls, first, start, resumed = _start(run, ckpt)
    # Every process has read the checkpoint before process 0 writes (and prunes) any.
    hosts.barrier("gdjax: restored")
    logger = _open_logger(run, resumed, ckpt)
    loop = Loop(run, ckpt, logger, eval_hook, callbacks or Callbacks(), Timer(),
                compute.GeneratorFlops(run))
    try:
        ls = run_experiences(loop, ls, first, start)
        # The final model on its own, in the format launch/convert.py writes: a teacher for
        # train.mode="iid_distill" or for evaluation.
        if hosts.is_writer():
            path = rundir.final_params_dir(workdir)
            with writing(loop, f"the final params to {path}"):
                save_params(path, evaluated_params(ls.train), run.settings.unet)
    finally:
        try:
            with writing(loop, f"the metric rows to {rundir.metrics_dir(workdir)} (closing)"):
                logger.close()
        finally:
            ckpt.close()
    return ls.train
