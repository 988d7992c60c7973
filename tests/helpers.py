"""What several test modules share: the tiny run config and array helpers (not tests)."""

import jax
import numpy as np
import pytest

from configs import split_digits


def tiny_config(strategy="full_generation_distillation", solver=False, **train):
    """Split Digits shrunk to seconds: the tiny UNet, 2 experiences of 4 steps of 8 rows.

    The classifier trained alongside (`solver`) is off unless asked for: it has its own
    tests (test_solver.py), the runs that enable it, and the SIGKILL test.
    """
    c = split_digits.get_config()
    c.strategy.name = strategy
    c.model.name = "tiny"
    c.data.n_experiences = 2
    c.train.batch_size = 8
    c.train.steps_per_experience = 4
    c.train.log_every = 1
    c.train.checkpoint_every = 3
    c.eval.steps = 2
    c.eval.grid_samples = 4
    c.log.tensorboard = False
    c.strategy.er_buffer_size = 20
    c.solver.enabled = solver
    c.solver.epochs = 1
    c.solver.batch_size = 32
    for key, value in train.items():
        setattr(c.train, key, value)
    return c


def leaves(tree):
    """The pytree's leaves as numpy arrays."""
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def killed_then_resumed(config, workdir, monkeypatch, *, at):
    """Trains `config` in `workdir` until the checkpoint save of (experience, step) `at`,
    kills it there (KeyboardInterrupt after the save), then resumes it to the end; returns
    the resumed run's final train state."""
    from gdjax import continual

    real_save = continual.save

    def dying(loop, ls, *, experience, step):
        real_save(loop, ls, experience=experience, step=step)
        if (experience, step) == at:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(continual, "save", dying)
        with pytest.raises(KeyboardInterrupt):
            continual.train(config, workdir)
    return continual.train(config, workdir)
