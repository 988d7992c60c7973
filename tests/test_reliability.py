"""Reliability of the experience loop: kills, corrupt checkpoints, NaNs, a full disk, reruns.

Each test ends by comparing against an uninterrupted run of the same config: parameters
bit for bit, metric rows exactly (none missing, none duplicated).
"""

import errno
import glob
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gdjax import continual
from gdjax.checkpoint import CheckpointWarning, CheckpointWriteError
from gdjax.convert import restore_params
from gdjax.logs import read_metrics
from tests.test_continual import leaves, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Orbax's asyncio loop may be closed under its last task; Python reports that as an
# unraisable exception. Harmless noise (as in test_checkpoint.py).
_ignore_closed_loop = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


def assert_same_run(workdir, reference, state=None):
    """Same train and experience rows as the reference run and, given, the same params."""
    for stream in ("train", "experience"):
        assert read_metrics(workdir, stream) == read_metrics(reference.workdir, stream)
    if state is not None:
        for a, b in zip(leaves(state), leaves(reference.state)):
            np.testing.assert_array_equal(a, b)


class Reference:
    def __init__(self, workdir, state):
        self.workdir, self.state = workdir, state


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted tiny run (8 steps over 2 experiences, checkpoints at 3 and 4, 7, 8)."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    return Reference(workdir, continual.train(tiny_config(), workdir))


# ----------------------------------------------------------------------------- kills

def _digits_command(workdir, data_dir, *extra):
    return [sys.executable, "-m", "launch.train",
            "--config=configs/split_digits.py:generative_distillation",
            "--config.model.name=tiny", "--config.data.n_experiences=2",
            "--config.train.steps_per_experience=6", "--config.train.batch_size=8",
            "--config.train.checkpoint_every=2", "--config.train.log_every=1",
            "--config.eval.steps=2", "--config.eval.num_samples=16",
            "--config.eval.batch_size=16", "--config.eval.grid_samples=4",
            "--config.solver.epochs=1", "--config.solver.batch_size=32",
            "--config.eval.classifier=simple_cnn",
            "--config.log.tensorboard=False", f"--config.data.data_dir={data_dir}",
            f"--workdir={workdir}", *extra]


def _last_train_step(workdir):
    try:
        rows = read_metrics(workdir, "train")
    except ValueError:  # caught mid-rewrite: look again next poll
        return 0
    return rows[-1]["step"] if rows else 0


def _experience_rows(workdir):
    try:
        return len(read_metrics(workdir, "experience"))
    except (ValueError, FileNotFoundError):
        return 0


def _run_and_kill(command, env, log, moment, delay, timeout=120.0):
    """Starts the run, SIGKILLs it `delay` s after `moment()` holds; False if it ended first."""
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    log.write(f"[test] started at {time.monotonic():.1f}\n".encode())
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if moment():
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                log.write(f"[test] killed at {time.monotonic():.1f}\n".encode())
                return True
            time.sleep(0.01)
        assert proc.poll() is not None, "the run hung"
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@_ignore_closed_loop
def test_sigkilled_subprocess_run_ends_equal_to_an_uninterrupted_one(tmp_path):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    data_dir, whole, killed = (str(tmp_path / name) for name in ("data", "whole", "killed"))
    log = open(tmp_path / "log.txt", "wb")
    started = time.monotonic()
    # The evaluation classifier, trained for one epoch where the hook looks for it (its
    # default 20 epochs would add 18 s). The reference run fills the compile cache, so
    # each restart below costs a process start, not a compilation. --overwrite on a fresh
    # workdir is a no-op.
    from configs import split_digits
    from gdjax.eval import classifier
    config = split_digits.get_config()
    config.data.data_dir, config.eval.classifier = data_dir, "simple_cnn"
    classifier.train_for_config(config, epochs=1)
    subprocess.run(_digits_command(whole, data_dir, "--overwrite"), cwd=ROOT, env=env,
                   stdout=log, stderr=subprocess.STDOUT, check=True, timeout=180)

    rng = random.Random(5)
    moments = [  # (what is going on, when it holds), in the order the run reaches them
        ("a step before the first checkpoint", lambda: _last_train_step(killed) >= 1),
        ("the checkpoint of step 4 being written",
         lambda: glob.glob(os.path.join(killed, "checkpoints", "4*"))),
        ("evaluation of experience 0",
         lambda: os.path.exists(os.path.join(killed, "samples", "experience_0.png"))),
        ("the classifier learning experience 1", lambda: _experience_rows(killed) >= 1),
    ]  # then experience 1 resumes from the boundary checkpoint, with its restored teacher
    kills = 0
    for what, moment in moments:
        kills += _run_and_kill(_digits_command(killed, data_dir), env, log, moment,
                               delay=rng.uniform(0.0, 0.3))
    log.write(f"[test] final run at {time.monotonic():.1f}\n".encode())
    log.flush()
    subprocess.run(_digits_command(killed, data_dir), cwd=ROOT, env=env, stdout=log,
                   stderr=subprocess.STDOUT, check=True, timeout=180)
    log.write(f"[test] done at {time.monotonic():.1f}\n".encode())
    log.close()

    assert kills == len(moments), open(tmp_path / "log.txt").read()[-3000:]
    print(f"\nsurvived {kills} SIGKILLs in {time.monotonic() - started:.0f} s")
    rows = read_metrics(killed, "train")
    assert [r["step"] for r in rows] == list(range(1, 13))  # none lost, none twice
    for stream in ("train", "experience"):
        assert read_metrics(killed, stream) == read_metrics(whole, stream)
    for a, b in zip(leaves(restore_params(os.path.join(killed, "final_params"))[1]),
                    leaves(restore_params(os.path.join(whole, "final_params"))[1])):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- checkpoints

def _kill_at_train_step(monkeypatch, step):
    real_write = continual.MetricLogger.write

    def dying_write(self, stream, at, metrics):
        real_write(self, stream, at, metrics)
        if stream == "train" and at == step:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(continual.MetricLogger, "write", dying_write)


@_ignore_closed_loop
@pytest.mark.filterwarnings("ignore:deleting unusable checkpoint:UserWarning")  # expected
def test_truncated_newest_checkpoint_is_skipped_and_the_run_still_ends_equal(
        tmp_path, monkeypatch, reference):
    workdir = str(tmp_path / "run")
    with monkeypatch.context() as patch:
        _kill_at_train_step(patch, 6)
        with pytest.raises(KeyboardInterrupt):
            continual.train(tiny_config(), workdir)
    # Half of the newest checkpoint's (step 4) largest data file, as a dying disk leaves it.
    files = glob.glob(os.path.join(workdir, "checkpoints", "4", "state", "**", "*"),
                      recursive=True)
    biggest = max((f for f in files if os.path.isfile(f)), key=os.path.getsize)
    data = open(biggest, "rb").read()
    open(biggest, "wb").write(data[:len(data) // 2])
    with pytest.warns(CheckpointWarning, match="skipping checkpoint .*/4"):
        state = continual.train(tiny_config(), workdir)
    assert_same_run(workdir, reference, state)


@_ignore_closed_loop
def test_disk_full_while_checkpointing_stops_clearly_and_the_rerun_ends_equal(
        tmp_path, monkeypatch, reference):
    workdir = str(tmp_path / "run")
    real_save = ocp.handlers.StandardCheckpointHandler.async_save
    calls = {"n": 0}

    async def full_after_first(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_save(self, *args, **kwargs)

    config = tiny_config()
    # Only the checkpoints write through orbax here (not the per-experience params).
    config.eval.save_experience_params = False
    with monkeypatch.context() as patch:
        patch.setattr(ocp.handlers.StandardCheckpointHandler, "async_save", full_after_first)
        with pytest.raises(CheckpointWriteError,
                           match=r"step 4 .*No space left on device; the previous "
                                 r"checkpoint \(step 3\) is still usable"):
            continual.train(config, workdir)
    state = continual.train(config, workdir)  # room again: resumes from step 3
    assert_same_run(workdir, reference, state)


# ----------------------------------------------------------------------------- configs

@_ignore_closed_loop
def test_workdir_of_another_config_needs_overwrite(tmp_path, reference):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference.workdir, workdir)
    other = tiny_config()
    other.seed = 7  # another config, the same compiled step
    with pytest.raises(ValueError, match="different config.*--overwrite"):
        continual.train(other, workdir)
    continual.train(other, workdir, overwrite=True)
    rows = read_metrics(workdir, "train")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows != read_metrics(reference.workdir, "train")  # the new config's rows only


@_ignore_closed_loop
def test_run_killed_before_its_first_checkpoint_restarts(tmp_path, monkeypatch, reference):
    workdir = str(tmp_path / "run")
    with monkeypatch.context() as patch:
        _kill_at_train_step(patch, 2)  # the first checkpoint is at step 3
        with pytest.raises(KeyboardInterrupt):
            continual.train(tiny_config(), workdir)
    with pytest.raises(ValueError, match="different config"):
        continual.train(tiny_config(learning_rate=0.5), workdir)
    assert_same_run(workdir, reference, continual.train(tiny_config(), workdir))


# ----------------------------------------------------------------------------- NaN

def _poison_batch(monkeypatch, at_step):
    """Makes the batch of 0-based step `at_step` all NaN."""
    real = continual.gdata.batch_iterator

    class Poisoned:
        def __init__(self, inner, start):
            self.inner, self.s = inner, start

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def __next__(self):
            batch = next(self.inner)
            self.s += 1
            if self.s - 1 == at_step:
                batch = {**batch, "image": batch["image"] * np.nan}
            return batch

    def batch_iterator(*args, start_step, experience, **kwargs):
        inner = real(*args, start_step=start_step, experience=experience, **kwargs)
        return Poisoned(inner, start_step) if experience == 0 else inner

    monkeypatch.setattr(continual.gdata, "batch_iterator", batch_iterator)


@_ignore_closed_loop
def test_nan_stops_with_experience_and_step_and_keeps_good_checkpoints(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    # NaN at step 1, next logged at step 3: the check before the step-2 checkpoint catches it.
    config = tiny_config(log_every=4, checkpoint_every=2)
    _poison_batch(monkeypatch, at_step=1)
    with pytest.raises(continual.NonFiniteLossError,
                       match=r"experience 0, step 1 \(global step 2; it first appeared at step 0..1"):
        continual.train(config, workdir)
    checkpoints = os.listdir(os.path.join(workdir, "checkpoints"))
    assert checkpoints == []  # nothing good yet to keep, and nothing bad saved
    monkeypatch.undo()
    state = continual.train(config, workdir)  # restarts cleanly
    assert all(np.isfinite(x).all() for x in leaves(state.params))


@_ignore_closed_loop
def test_nan_after_a_checkpoint_keeps_it_and_the_rerun_resumes_from_it(tmp_path, monkeypatch):
    config = tiny_config(log_every=4, checkpoint_every=2)
    whole_dir = str(tmp_path / "whole")
    whole = continual.train(config, whole_dir)
    workdir = str(tmp_path / "run")
    # Checkpoint after step 2 (good), NaN in step 4's batch, seen at its logging step.
    _poison_batch(monkeypatch, at_step=3)
    with pytest.raises(continual.NonFiniteLossError, match=r"experience 0, step 3 \(global step 4; "
                                                          r"it first appeared at step 2..3"):
        continual.train(config, workdir)
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
    assert [r["step"] for r in read_metrics(workdir, "train")] == []  # the NaN row is not written
    monkeypatch.undo()
    state = continual.train(config, workdir)  # resumes at step 2
    for a, b in zip(leaves(state), leaves(whole)):
        np.testing.assert_array_equal(a, b)
    assert read_metrics(workdir, "train") == read_metrics(whole_dir, "train")


@_ignore_closed_loop
def test_nan_skip_drops_only_the_bad_update(tmp_path, monkeypatch):
    config = tiny_config(on_nan="skip", log_every=2)
    _poison_batch(monkeypatch, at_step=2)
    state = continual.train(config, str(tmp_path / "run"))
    rows = read_metrics(str(tmp_path / "run"), "train")
    assert [r["skipped"] for r in rows] == [0, 1, 0, 0]  # steps 1-2, 3-4 (NaN at 3), ...
    assert np.isfinite(rows[1]["loss"]) and rows[1]["step"] == 4
    assert all(np.isfinite(x).all() for x in leaves(state.params))
    assert int(state.step) == 8


def test_skipped_update_leaves_params_and_optimizer_state_bitwise_unchanged(tmp_path):
    run = continual.build(tiny_config(on_nan="skip"), str(tmp_path))
    state, teacher = continual.initial_state(run)
    step = continual.Trainer(run, None, None, None, None, None).step_fn(False)
    image = np.full((8, 16, 16, 1), np.nan, np.float32)
    before = leaves((state.params, state.opt_state))  # host copies: the state is donated
    new, metrics = step(state, teacher, {"image": jax.device_put(image, run.sharding)},
                        jax.random.key(0))
    assert int(metrics["skipped"]) == 1 and not np.isfinite(float(metrics["loss"]))
    for a, b in zip(before, leaves((new.params, new.opt_state))):
        np.testing.assert_array_equal(a, b)
    assert int(new.step) == 1


def test_on_nan_is_validated():
    from gdjax.config import validate_config
    with pytest.raises(ValueError, match="train.on_nan='ignore' is unknown"):
        validate_config(tiny_config(on_nan="ignore"))


# ----------------------------------------------------------------------------- determinism

@_ignore_closed_loop
def test_same_seed_same_run_and_one_compilation_per_step_function(
        tmp_path, monkeypatch, reference):
    workdir = str(tmp_path / "again")
    assert_same_run(workdir, reference, continual.train(tiny_config(), workdir))
    workdir = str(tmp_path / "resumed")
    with monkeypatch.context() as patch:
        _kill_at_train_step(patch, 6)
        with pytest.raises(KeyboardInterrupt):
            continual.train(tiny_config(), workdir)
    assert_same_run(workdir, reference, continual.train(tiny_config(), workdir))
    # Every run of this config in this process, fresh or resumed, used the same two
    # compiled steps, each traced once.
    run = continual.build(tiny_config(), workdir)
    trainer = continual.Trainer(run, None, None, None, None, None)
    assert [trainer.step_fn(replay)._cache_size() for replay in (False, True)] == [1, 1]
