"""The state of a run in progress: one value, `LoopState`, that is also the checkpoint tree.

`LoopState` holds what changes while a run trains: the student's train state (params, Adam,
step and experience counters, the count of dropped updates), the frozen teacher, the
solver's state and its accuracy history, and the key the train step folds its step into.
The experience loop (gdjax/continual.py) takes it and returns the next one.
`initial_state(run)` makes a fresh run's; `checkpoint_tree` is what the checkpointer
stores; `restore` reads the newest good checkpoint back, placed as the compiled steps
expect (`on_mesh`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gdjax import regularisers, rng, rundir, unet
from gdjax.checkpoint import Checkpointer
from gdjax.convert import restore_params
from gdjax.eval import solver as solver_lib
from gdjax.run import Run
from gdjax.train_step import TrainState, init_state


class LoopState(NamedTuple):
    """Everything that changes during a run; `checkpoint_tree` is what a resume needs."""

    train: TrainState
    teacher: Any  # the frozen previous model (a copy of the params before experience 1)
    solver: solver_lib.SolverState | None
    accuracy: np.ndarray | None  # float64 [n, n]: the solver on experience j after i
    key: jax.Array  # the train step's key (it folds in the global step)
    solver_reg: Any = None  # the solver's EWC or SI state (gdjax/eval/regularisers.py)


def initial_state(run: Run) -> LoopState:
    """A fresh run's state, on the mesh: the student, a teacher slot (a copy of the params
    until one is frozen, or the given teacher of train.mode="iid_distill"), the solver."""
    s = run.settings
    params = unet.init_params(s.unet, rng.key(s.seed, "unet_init"))
    teacher = jax.tree.map(jnp.copy, params)  # its own buffers: the state is donated
    if s.train.mode == "iid_distill":
        teacher = load_teacher(run)
    solver, accuracy, reg = None, None, None
    if s.solver is not None:
        solver = solver_lib.init_state(s.solver, rng.key(s.seed, "solver_init"),
                                       run.image_shape)
        accuracy = np.zeros((len(run.experiences),) * 2)
        reg = solver_lib.init_reg(s.solver, solver, len(run.experiences))
    state = init_state(params, run.optimizer, ema=s.train.ema_decay > 0,
                       reg=regularisers.init(s.regulariser, params))
    return LoopState(*on_mesh(run, (state, teacher)), solver, accuracy,
                     rng.key(s.seed, "train_step"), reg)


def on_mesh(run: Run, tree):
    """`tree` replicated on the run's mesh, as the compiled steps return their state.

    Every array the loop makes on the host (a fresh optimizer state, the experience index,
    a restored checkpoint) goes through here before a step sees it: an array placed
    otherwise has another type and would make the step compile a second time."""
    return jax.device_put(tree, run.replicated)


def load_teacher(run: Run):
    """The trained teacher of train.mode="iid_distill" (train.teacher_dir)."""
    s = run.settings
    teacher_dir = s.train.teacher_dir
    if not teacher_dir or not os.path.isdir(teacher_dir):
        raise FileNotFoundError(
            f"train.teacher_dir={teacher_dir!r} is not a directory: iid_distill needs a trained "
            f"teacher saved with `python -m launch.convert` or a finished gdjax run's params.")
    teacher_config, params = restore_params(teacher_dir)
    if dataclasses.replace(teacher_config, dtype=s.unet.dtype) != s.unet:
        raise ValueError(f"the teacher in {teacher_dir} has UNet config {teacher_config}, but "
                         f"model.name={s.config['model']['name']!r} is {s.unet}.")
    return params


def checkpoint_tree(ls: LoopState) -> dict:
    """The loop state as the checkpointer stores it (the key as its uint32 data)."""
    tree = {"state": ls.train, "teacher": ls.teacher, "rng": jax.random.key_data(ls.key)}
    if ls.solver is not None:
        tree.update(solver=ls.solver, solver_accuracy=ls.accuracy)
    if ls.solver_reg is not None:  # absent otherwise: older checkpoints keep their layout
        tree.update(solver_reg=ls.solver_reg)
    return tree


def restore(ckpt: Checkpointer, run: Run, template: LoopState):
    """(loop state, experience, step within it) of the newest good checkpoint, or None."""
    restored = ckpt.restore(checkpoint_tree(template))
    if restored is None:
        return None
    tree, meta = restored
    if meta.get("fingerprint") != rundir.run_fingerprint(run.workdir, run.settings.config):
        raise ValueError(
            f"{run.workdir} holds a run of a different config: use another --workdir, the "
            f"same config to resume it, or --overwrite to start over.")
    key = jax.random.wrap_key_data(np.asarray(tree["rng"]))
    ls = LoopState(*on_mesh(run, (tree["state"], tree["teacher"])), tree.get("solver"),
                   None if template.accuracy is None else np.asarray(tree["solver_accuracy"]),
                   key, tree.get("solver_reg"))
    return ls, meta["experience"], meta["step_in_experience"]
