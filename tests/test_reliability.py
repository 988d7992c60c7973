"""Reliability of the experience loop: kills, corrupt checkpoints, NaNs, a full disk, reruns.

Each test ends by comparing against an uninterrupted run of the same config: parameters
bit for bit, metric rows exactly (none missing, none duplicated).
"""

import errno
import functools
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from gdjax import continual, rundir, strategies
from gdjax.checkpoint import CheckpointWarning, CheckpointWriteError
from gdjax.convert import restore_params
from gdjax.logs import read_metrics
from gdjax import run as run_lib
from gdjax.run import Run, build, settings_from_config
from gdjax.state import initial_state
from gdjax.schedule import make_schedule
from gdjax.strategies import StrategyConfig
from gdjax.train_step import OptimConfig, init_state, make_optimizer, make_train_step
from tests.helpers import leaves, tiny_config

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

def _digits_command(workdir, data_dir, *extra, module="launch.train"):
    return [sys.executable, "-m", module,
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


def _run_until_paused(command, env, log, point, marker, timeout=120.0):
    """Starts the run held at `point` (tests/pausing_train.py) and SIGKILLs it once it
    stands there; False if it ended first."""
    env = dict(env, TEST_PAUSE_AT=point, TEST_PAUSE_FILE=marker)
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    log.write(f"[test] started at {time.monotonic():.1f}, to pause at {point}\n".encode())
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if os.path.exists(marker):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                os.remove(marker)
                log.write(f"[test] killed at {time.monotonic():.1f}\n".encode())
                return True
            time.sleep(0.01)
        assert proc.poll() is not None, "the run hung"
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _checkpoints(workdir):
    """(committed steps, names of uncommitted step directories) under workdir/checkpoints,
    told apart as gdjax/checkpoint.py does: orbax's commit file, its tmp suffix."""
    root = os.path.join(workdir, "checkpoints")
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    committed = sorted(int(n) for n in names if n.isdigit() and os.path.exists(
        os.path.join(root, n, ocp.path.atomicity.COMMIT_SUCCESS_FILE)))
    return committed, [n for n in names if ocp.path.atomicity.TMP_DIR_SUFFIX in n]


def _train_steps(workdir):
    return [r["step"] for r in read_metrics(workdir, "train")]


def _at_step_2(workdir):  # the step-2 update is only in memory: no row, no checkpoint
    assert _train_steps(workdir) == [1] and _checkpoints(workdir) == ([], [])


def _in_checkpoint_4(workdir):  # orbax wrote checkpoint 4 into its tmp dir, not committed
    assert _train_steps(workdir) == [1, 2, 3, 4]
    committed, tmp = _checkpoints(workdir)
    assert committed == [2] and [n.split(".")[0] for n in tmp] == ["4"]
    written = os.listdir(os.path.join(workdir, "checkpoints", tmp[0]))
    assert {"state", "meta", "manifest"} <= set(written)
    assert ocp.path.atomicity.COMMIT_SUCCESS_FILE not in written


def _in_evaluation_0(workdir):  # grid written, metrics not yet, boundary checkpoint not yet
    assert _train_steps(workdir) == [1, 2, 3, 4, 5, 6] and _checkpoints(workdir) == ([2, 4], [])
    assert os.path.exists(os.path.join(workdir, "samples", "experience_0.png"))
    assert os.path.exists(os.path.join(rundir.experience_params_dir(workdir, 0),
                                       "unet_config.json"))
    assert read_metrics(workdir, "experience") == []


def _in_solver_1(workdir):  # experience 0 done and checkpointed; experience 1 not begun
    assert _train_steps(workdir) == [1, 2, 3, 4, 5, 6] and _checkpoints(workdir) == ([4, 6], [])
    assert [r["experience"] for r in read_metrics(workdir, "experience")] == [0]


@pytest.mark.slow  # seven process starts: `python -m pytest -q -m slow tests`
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
    classifier.train_for_settings(settings_from_config(config), epochs=1)
    subprocess.run(_digits_command(whole, data_dir, "--overwrite"), cwd=ROOT, env=env,
                   stdout=log, stderr=subprocess.STDOUT, check=True, timeout=180)

    # Each run stops at a named point (tests/pausing_train.py: launch.train with the
    # library's callbacks and Orbax's commit wrapped) and is killed there; what it left on
    # disk shows where it was. In the order the run reaches them, each run resuming
    # from what the one before left:
    moments = [
        ("train_step/0/1", _at_step_2),  # inside step 2, before the first checkpoint
        ("checkpoint/4", _in_checkpoint_4),  # the checkpoint of step 4 being written
        ("evaluation/0", _in_evaluation_0),  # entering the evaluation hook of experience 0
        ("solver/1", _in_solver_1),  # the classifier starting to learn experience 1
    ]  # then experience 1 resumes from the boundary checkpoint, with its restored teacher
    marker = str(tmp_path / "paused")
    for point, where in moments:
        killed_there = _run_until_paused(
            _digits_command(killed, data_dir, module="tests.pausing_train"), env, log, point,
            marker)
        assert killed_there, (point, open(tmp_path / "log.txt").read()[-3000:])
        where(killed)
    log.write(f"[test] final run at {time.monotonic():.1f}\n".encode())
    log.flush()
    subprocess.run(_digits_command(killed, data_dir), cwd=ROOT, env=env, stdout=log,
                   stderr=subprocess.STDOUT, check=True, timeout=180)
    log.write(f"[test] done at {time.monotonic():.1f}\n".encode())
    log.close()

    print(f"\nsurvived {len(moments)} SIGKILLs in {time.monotonic() - started:.0f} s")
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


def _enospc():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FullDiskFile:
    """A file whose disk fills up at the first write for which `full(data)` holds: half of
    that write reaches the real file; the rest stays pending, and that write, every later
    one, flush and close raise ENOSPC, as a buffered file on a full disk does."""

    def __init__(self, real, full):
        self.real, self.full, self.pending = real, full, None

    def write(self, data):
        if self.pending is None and self.full(data):
            self.real.write(data[:len(data) // 2])
            self.real.flush()
            self.pending = data[len(data) // 2:]
        if self.pending is not None:
            raise _enospc()
        return self.real.write(data)

    def flush(self):
        if self.pending is not None:
            raise _enospc()
        self.real.flush()

    def fileno(self):
        return self.real.fileno()

    def close(self):
        self.real.close()
        if self.pending is not None:
            raise _enospc()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _disk_fills_in(patch, module, full):
    """Makes `module`'s open() give files on a disk that fills up as `full` says."""
    patch.setattr(module, "open", lambda *a, **k: _FullDiskFile(open(*a, **k), full),
                  raising=False)


@pytest.mark.slow  # two whole runs (the faulted one and its rerun), ~10 s on 2 cores
@_ignore_closed_loop
def test_disk_full_while_writing_outputs_stops_clearly_and_the_rerun_ends_equal(
        tmp_path, monkeypatch, reference):
    from gdjax import grid, logs
    workdir = str(tmp_path / "run")
    resume = r"the last checkpoint \(step {}\) is intact: free some space and rerun"
    # The disk fills up while writing, in turn: the sample grid of experience 0, its
    # params, the train row of step 6. Each time the run stops with our error, and the
    # next run resumes from the checkpoint it names.
    with monkeypatch.context() as patch:
        _disk_fills_in(patch, grid, lambda data: True)
        with pytest.raises(rundir.DiskFullError,
                           match=r"could not write the sample grid of experience 0 to "
                                 r".*experience_0.png: the disk is full \(OSError: \[Errno 28\] "
                                 r"No space left on device\); " + resume.format(3)):
            continual.train(tiny_config(), workdir)
    assert os.listdir(os.path.join(workdir, "samples")) == []  # no half PNG, no tmp file

    real_save = ocp.handlers.StandardCheckpointHandler.async_save

    async def full_for_params(self, directory, *args, **kwargs):
        if "experience_params" in str(directory):
            raise _enospc()
        return await real_save(self, directory, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(ocp.handlers.StandardCheckpointHandler, "async_save", full_for_params)
        with pytest.raises(rundir.DiskFullError,
                           match=r"could not write the params of experience 0 to .*"
                                 r"experience_0: the disk is full .*" + resume.format(3)):
            continual.train(tiny_config(), workdir)
    # No params without their unet_config.json: restore_params refuses the half write.
    assert not os.path.exists(os.path.join(rundir.experience_params_dir(workdir, 0),
                                           "unet_config.json"))

    with monkeypatch.context() as patch:
        _disk_fills_in(patch, logs, lambda data: data.startswith('{"step": 6,'))
        with pytest.raises(rundir.DiskFullError,
                           match=r"could not write the 'train' metric row of step 6 to "
                                 r".*train.jsonl: the disk is full .*" + resume.format(4)):
            continual.train(tiny_config(), workdir)
    # Rows 1..5 and half of row 6: the torn line is dropped when the run resumes.
    text = open(os.path.join(workdir, "metrics", "train.jsonl")).read()
    assert text.startswith('{"step": 1,') and not text.endswith("\n")
    assert _train_steps(workdir) == [1, 2, 3, 4, 5]

    state = continual.train(tiny_config(), workdir)  # room again
    assert_same_run(workdir, reference, state)
    for k in (0, 1):  # the grids and params the failed writes left out
        np.testing.assert_array_equal(
            np.asarray(Image.open(os.path.join(workdir, "samples", f"experience_{k}.png"))),
            np.asarray(Image.open(os.path.join(reference.workdir, "samples",
                                               f"experience_{k}.png"))))
        for a, b in zip(leaves(restore_params(rundir.experience_params_dir(workdir, k))[1]),
                        leaves(restore_params(rundir.experience_params_dir(
                            reference.workdir, k))[1])):
            np.testing.assert_array_equal(a, b)


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


def _kill_after_checkpoint(monkeypatch, step):
    real_save = continual.save

    def dying_save(loop, ls, **kwargs):
        real_save(loop, ls, **kwargs)
        if int(ls.train.step) == step:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(continual, "save", dying_save)


@_ignore_closed_loop
def test_nan_skip_drops_only_the_bad_update_and_a_resumed_run_still_counts_it(
        tmp_path, monkeypatch):
    config = tiny_config(on_nan="skip", log_every=2)  # checkpoints at steps 3, 4, 7, 8
    whole_dir, workdir = str(tmp_path / "whole"), str(tmp_path / "run")
    _poison_batch(monkeypatch, at_step=2)
    whole = continual.train(config, whole_dir)
    rows = read_metrics(whole_dir, "train")
    # Rows count the dropped updates so far (the train state's counter): none by step 2,
    # the NaN of step 3 from the row of step 4 on.
    assert [r["skipped"] for r in rows] == [0, 1, 1, 1]
    assert np.isfinite(rows[1]["loss"]) and rows[1]["step"] == 4
    assert all(np.isfinite(x).all() for x in leaves(whole.params))
    assert int(whole.step) == 8
    # Killed right after the checkpoint of step 3, which holds the skip its row has not
    # shown yet: the resumed run's row of step 4 must count it all the same.
    with monkeypatch.context() as patch:
        _kill_after_checkpoint(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            continual.train(config, workdir)
    assert _train_steps(workdir) == [2]
    monkeypatch.undo()
    state = continual.train(config, workdir)
    assert read_metrics(workdir, "train") == rows
    for a, b in zip(leaves(state), leaves(whole)):
        np.testing.assert_array_equal(a, b)


def test_skipped_update_leaves_params_and_optimizer_state_bitwise_unchanged(tmp_path):
    run = build(tiny_config(on_nan="skip"), str(tmp_path))
    ls = initial_state(run)
    state, teacher = ls.train, ls.teacher
    step = run.step(False)
    image = np.full((8, 16, 16, 1), np.nan, np.float32)
    before = leaves((state.params, state.opt_state))  # host copies: the state is donated
    new, metrics = step(state, teacher, {"image": jax.device_put(image, run.sharding)}, ls.key)
    assert int(new.skipped) == 1 and not np.isfinite(float(metrics["loss"]))
    for a, b in zip(before, leaves((new.params, new.opt_state))):
        np.testing.assert_array_equal(a, b)
    assert int(new.step) == 1


@jax.custom_vjp
def _inf_gradient(x):
    """The identity, with a gradient of +inf."""
    return x


_inf_gradient.defvjp(lambda x: (x, None), lambda _, g: (g + jnp.inf,))


def _toy_apply(params, x, t):
    """A per-pixel affine "denoiser": the step's logic without a UNet to compile."""
    del t
    return x * params["w"] + params["b"]


POISONS = {
    # One predicted pixel is +inf: the loss is +inf, the gradients finite (that pixel is a
    # constant, no gradient flows through it).
    "inf loss": lambda p, x, t: _toy_apply(p, x, t).at[0, 0, 0, 0].set(jnp.inf),
    # The forward pass untouched, the gradient of one leaf +inf: a finite loss.
    "inf gradient": lambda p, x, t: _toy_apply({**p, "b": _inf_gradient(p["b"])}, x, t),
}


@functools.lru_cache(maxsize=None)
def _toy_step(apply_fn, on_nan):
    return make_train_step(apply_fn=apply_fn, schedule=make_schedule("linear"),
                           strategy=StrategyConfig(strategies.NAIVE),
                           optimizer=make_optimizer(OptimConfig()), with_replay=False,
                           on_nan=on_nan)


@pytest.mark.parametrize("poison", POISONS)
def test_inf_loss_or_gradient_norm_is_skipped_or_stops_naming_experience_and_step(poison):
    params = {"w": jnp.full((1,), 0.5), "b": jnp.full((1,), 0.1)}
    batch = {"image": jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)),
                                  jnp.float32)}
    fresh = lambda: init_state(jax.tree.map(jnp.copy, params), make_optimizer(OptimConfig()))
    key = jax.random.key(0)
    counted, clean = _toy_step(_toy_apply, "skip")(fresh(), None, batch, key)
    assert int(counted.skipped) == 0 and np.isfinite(float(clean["grad_norm"]))
    state = fresh()
    before = leaves((state.params, state.opt_state))  # host copies: the state is donated
    new, metrics = _toy_step(POISONS[poison], "skip")(state, None, batch, key)
    values = {name: float(v) for name, v in metrics.items()}
    if poison == "inf loss":
        assert values["loss"] == np.inf and np.isfinite(values["grad_norm"])
    else:
        assert values["loss"] == float(clean["loss"]) and values["grad_norm"] == np.inf
    assert int(new.skipped) == 1 and int(new.step) == 1
    for a, b in zip(before, leaves((new.params, new.opt_state))):
        np.testing.assert_array_equal(a, b)
    # on_nan="stop": the step applies the update; the loop's check stops the run.
    applied, metrics = _toy_step(POISONS[poison], "stop")(fresh(), None, batch, key)
    assert int(applied.skipped) == 0
    bad = "data_loss, loss" if poison == "inf loss" else "grad_norm"
    with pytest.raises(continual.NonFiniteLossError,
                       match=rf"non-finite {bad} at experience 1, step 5 \(global step 10; it "
                             rf"first appeared at step 5: .* the last good checkpoint is kept"):
        continual._check_finite({name: float(v) for name, v in metrics.items()}, 1, 5, 10,
                                since=4)


@_ignore_closed_loop
def test_inf_gradient_norm_under_a_finite_loss_stops_and_keeps_the_good_checkpoint(
        tmp_path, monkeypatch):
    # The step's metrics as a +inf gradient leaves them (the test above): loss finite.
    real_step_fn = Run.step

    def step_fn(run, with_replay):
        real = real_step_fn(run, with_replay)

        def step(state, teacher, batch, rng):
            at = int(state.step)
            state, metrics = real(state, teacher, batch, rng)
            return state, ({**metrics, "grad_norm": jnp.float32(np.inf)} if at == 3 else metrics)

        return step

    monkeypatch.setattr(Run, "step", step_fn)
    workdir = str(tmp_path / "run")
    with pytest.raises(continual.NonFiniteLossError,
                       match=r"non-finite grad_norm at experience 0, step 3 \(global step 4; "
                             r"it first appeared at step 2..3"):
        continual.train(tiny_config(log_every=4, checkpoint_every=2), workdir)
    assert _checkpoints(workdir) == ([2], [])
    assert _train_steps(workdir) == []


def test_on_nan_is_validated():
    with pytest.raises(ValueError, match="train.on_nan='ignore' is unknown"):
        settings_from_config(tiny_config(on_nan="ignore"))


# ----------------------------------------------------------------------------- determinism

@_ignore_closed_loop
def test_same_seed_same_run_and_one_compilation_per_step_function(
        tmp_path, monkeypatch, reference, compilations):
    run_lib._compiled_step.cache_clear()  # steps of their own, compiled in this test
    workdir = str(tmp_path / "again")
    assert_same_run(workdir, reference, continual.train(tiny_config(), workdir))
    workdir = str(tmp_path / "resumed")
    with monkeypatch.context() as patch:
        _kill_at_train_step(patch, 6)
        with pytest.raises(KeyboardInterrupt):
            continual.train(tiny_config(), workdir)
    assert_same_run(workdir, reference, continual.train(tiny_config(), workdir))
    # Every run of this config in this process, fresh or resumed, used the same two
    # compiled steps (plain, and generative distillation's), each compiled once.
    assert compilations["train_step"] == 2
