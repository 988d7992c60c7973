"""Checkpoints that let a continual-learning run stop anywhere and resume bit for bit.

`Checkpointer` wraps `orbax.checkpoint.CheckpointManager`. Each step directory holds
three orbax items:

- `state`: the caller's array pytree, written from a host copy taken when `save` is
  called (gdjax/continual.py saves {"state", "teacher", "rng", "solver"}: the train
  state, the frozen teacher, the PRNG key data and, when the run has one, the solver);
- `meta`: the caller's small JSON dict (experience index, step within it, config
  fingerprint, ...);
- `manifest`: every leaf's name, shape, dtype and CRC-32 (gdjax/manifest.py, which
  says why).

Reading is defensive: `restore` and `latest_step` walk from the newest step down, skip
(with a `CheckpointWarning` naming the directory) anything unfinished, unreadable or
failing its checksums, and use the newest good one. Writing is asynchronous; every public
method first waits for the save in flight, so none of them can observe a half-written
checkpoint, and a failed write raises `CheckpointWriteError` naming the step still usable.

Scope: a single writer, process 0 (gdjax/hosts.py); every process reads. Arrays are
restored on the host and then placed with the template's sharding.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import threading
import time
import warnings
from typing import Any, Mapping

import orbax.checkpoint as ocp
from etils import epath

from gdjax import hosts
from gdjax.manifest import (
    CorruptError,
    check_format,
    check_template,
    named_leaves,
    place,
    snapshot,
    verify,
)

_STATE, _META, _MANIFEST = "state", "meta", "manifest"
_TMP_SUFFIX = ocp.path.atomicity.TMP_DIR_SUFFIX
_COMMIT_FILE = ocp.path.atomicity.COMMIT_SUCCESS_FILE
_WRITER_JOIN_SECS = 60.0

logger = logging.getLogger(__name__)


class CheckpointWarning(UserWarning):
    """A checkpoint on disk was skipped or removed because it is unusable."""


class CheckpointError(RuntimeError):
    """Checkpoints exist but none of them can be read."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; earlier checkpoints are untouched."""


def _check_json(meta) -> dict:
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise TypeError(f"meta must be JSON-able: {e}") from None
    return dict(meta)


def _new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before]


def _guarded(fn, *args):
    """Runs a read; any failure other than running out of memory means corrupt."""
    try:
        return fn(*args)
    except (CorruptError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types
        raise CorruptError(f"{type(e).__name__}: {str(e)[:300]}") from e


class Checkpointer:
    """Saves and restores (state pytree, meta dict) pairs under `directory/<step>/`.

    Keeps the newest `max_to_keep` steps. Not thread-safe; one writer per directory.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        directory = os.fspath(directory)
        if "://" not in directory:  # orbax wants absolute local paths
            directory = os.path.abspath(directory)
        self.directory = epath.Path(directory)
        self._max_to_keep = max_to_keep
        self._pending: int | None = None
        self._writers: list[threading.Thread] = []  # threads started by the last save
        # Verdicts of full reads in this process, so that no step is read twice for them.
        self._good: set[int] = set()
        self._bad: set[int] = set()  # (already warned about)
        self._warned_tmp: set[str] = set()
        self._closed = False
        self._mgr = self._new_manager()

    def _new_manager(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(self._max_to_keep),
            enable_async_checkpointing=True,
            # Blocking-phase mkdir: with orbax's default (asynchronous creation),
            # a failure before save() returns orphans commit threads that wait for a
            # "directory created" signal and hold the interpreter open at exit.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
            # Several hosts: process 0 writes alone, the others only read (gdjax/hosts.py).
            # Orbax then leaves creating the root directory to us.
            multiprocessing_options=hosts.local_orbax_options(),
            create=False,
        )
        self.directory.mkdir(parents=True, exist_ok=True)
        handlers = {
            _STATE: ocp.handlers.StandardCheckpointHandler(),
            _META: ocp.handlers.JsonCheckpointHandler(),
            _MANIFEST: ocp.handlers.JsonCheckpointHandler(),
        }
        return ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    # ---- writing ---------------------------------------------------------------

    def save(self, step: int, state, meta: dict, *, wait: bool = False) -> None:
        """Starts writing `state` and `meta` as checkpoint `step`.

        Returns once a host copy is taken (the caller may then donate or mutate its
        arrays); the files are written in the background unless `wait`. Raises
        `CheckpointWriteError` if the write fails (here or, when not waiting, from the
        next call that waits).
        """
        self._check_open()
        step = operator.index(step)
        if not hosts.is_writer():
            return  # process 0 writes the checkpoint every process reads
        self.wait()
        meta = _check_json(meta)
        host_tree, manifest = snapshot(state)
        self._clear_way(step)
        args = ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(host_tree),
            _META: ocp.args.JsonSave(meta),
            _MANIFEST: ocp.args.JsonSave(manifest),
        })
        before = set(threading.enumerate())
        try:
            # force: orbax's own save-interval policy must not silently drop a save.
            self._mgr.save(step, args=args, force=True)
        except Exception as e:  # noqa: BLE001 - any writer failure is reported the same way
            self._writers = _new_threads(before)
            self._write_failed(step, e)
        self._writers = _new_threads(before)
        self._pending = step
        if wait:
            self.wait()

    def wait(self) -> None:
        """Blocks until the save in flight is on disk; raises CheckpointWriteError if it failed."""
        if self._closed:
            return
        step, self._pending = self._pending, None
        try:
            self._mgr.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._write_failed(step, e)

    def close(self) -> None:
        """Waits for the save in flight, then releases orbax's threads. Idempotent."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._mgr.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _clear_way(self, step: int) -> None:
        """Makes room for `step`: drops leftovers and unusable steps at or after it.

        After resuming from an older checkpoint because the newer ones were corrupt,
        the run saves those step numbers again; the corrupt directories are in the way.
        A *good* checkpoint at or after `step` is never overwritten.
        """
        self._remove_tmp_dirs()
        for s in sorted(self._finalized_steps()):
            if s < step:
                continue
            if self._is_good(s):
                raise ValueError(
                    f"checkpoint step {s} in {self.directory} is good and not older than "
                    f"step {step}; refusing to overwrite it (restore it, or delete it first)"
                )
            warnings.warn(
                f"deleting unusable checkpoint {self._step_dir(s)} to save step {step}",
                CheckpointWarning, stacklevel=3,
            )
            self._mgr.delete(s)
            self._bad.discard(s)

    def _write_failed(self, step: int | None, err: Exception):
        """Resets orbax, removes the partial write, and raises CheckpointWriteError."""
        try:
            self._mgr.close()
        except Exception:  # noqa: BLE001 - the manager is being replaced anyway
            pass
        self._mgr = self._new_manager()
        self._remove_partial_write()
        where = f"step {step}" if step is not None else "a step"
        prev = self._newest_good(below=step)
        fallback = (f"the previous checkpoint (step {prev}) is still usable"
                    if prev is not None else "there is no earlier usable checkpoint")
        raise CheckpointWriteError(
            f"could not write checkpoint at {where} to {self.directory}: "
            f"{type(err).__name__}: {err}; {fallback}"
        ) from err

    def _remove_partial_write(self) -> None:
        """Deletes the failed save's tmp directory once its writer threads are done.

        Orbax reports the first failing item while the other items' threads may still
        be writing into that directory; deleting under them would race.
        """
        deadline = time.monotonic() + _WRITER_JOIN_SECS
        for thread in self._writers:
            try:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - orbax's threads re-raise the error on join
                pass
        writers_alive = any(t.is_alive() for t in self._writers)
        self._writers = []
        if writers_alive:
            logger.warning("writer threads still running; leaving the partial checkpoint "
                           "for the next save to remove")
            return
        self._remove_tmp_dirs()

    def _remove_tmp_dirs(self) -> None:
        # Called only by the writer with nothing in flight, so every tmp dir is stale.
        for path in self._tmp_dirs():
            try:
                path.rmtree(missing_ok=True)
            except OSError as e:  # best effort: a leftover is skipped and retried later
                logger.warning("could not remove %s: %s", path, e)

    # ---- reading ---------------------------------------------------------------

    def latest_step(self) -> int | None:
        """Returns the newest step that is finished and reads back with valid checksums.

        None if there is none. Each step is read in full at most once per process (by
        this or by `restore`); the verdict is cached.
        """
        self._check_open()
        self.wait()
        return self._newest_good()

    def restore(self, template) -> tuple[Any, dict] | None:
        """Returns (state, meta) of the newest good step, or None if there is no finished step.

        Reads that step once (a later `latest_step` reuses the verdict). `template` has
        the saved structure; its leaves (numpy/jax arrays or `jax.ShapeDtypeStruct`)
        give each restored leaf's dtype and placement: numpy leaves give numpy arrays,
        jax leaves give jax arrays with their sharding. Raises ValueError if the
        template's keys or shapes differ from the newest readable manifest, and
        CheckpointError if finished steps exist but none is usable.
        """
        self._check_open()
        self.wait()
        return self._restore_newest(template)

    def _restore_newest(self, template) -> tuple[Any, dict] | None:
        self._warn_tmp_dirs()
        steps = sorted(self._finalized_steps(), reverse=True)
        if not steps:
            return None  # a fresh directory, or only saves that never finished
        for s in steps:
            if s in self._bad:
                continue
            try:
                arrays, meta = self._read(s, template)
            except CorruptError as e:
                self._mark_bad(s, e)
                continue
            self._good.add(s)
            return place(arrays, template), meta
        raise CheckpointError(
            f"no usable checkpoint in {self.directory}: steps {sorted(steps)} are all "
            f"unusable (see warnings above). To start fresh, move or delete "
            f"{self.directory}, or give the run a new checkpoint directory."
        )

    def _newest_good(self, below: int | None = None) -> int | None:
        self._warn_tmp_dirs()
        for s in sorted(self._finalized_steps(), reverse=True):
            if (below is None or s < below) and self._is_good(s):
                return s
        return None

    def _is_good(self, step: int) -> bool:
        if step in self._good:
            return True
        if step in self._bad:
            return False
        try:
            self._read(step, template=None)
        except CorruptError as e:
            self._mark_bad(step, e)
            return False
        self._good.add(step)
        return True

    def _read(self, step: int, template) -> tuple[dict, dict]:
        """Returns ({leaf name: verified host array}, meta) of one step.

        Raises CorruptError if the step is unusable, ValueError if `template` (None:
        no check) does not match its manifest; the latter before any array is read.
        """
        manifest, meta = _guarded(self._read_small, step)
        if template is not None:
            check_template(template, manifest, self._step_dir(step))
        state = _guarded(self._read_state, step)
        return verify(dict(named_leaves(state)), manifest), meta

    def _read_small(self, step: int) -> tuple[dict, dict]:
        if not (self._step_dir(step) / _COMMIT_FILE).exists():
            raise CorruptError(f"no {_COMMIT_FILE}: the save never finished")
        out = self._mgr.restore(step, args=ocp.args.Composite(**{
            _META: ocp.args.JsonRestore(), _MANIFEST: ocp.args.JsonRestore(),
        }))
        return check_format(out[_MANIFEST]), out[_META]

    def _read_state(self, step: int):
        # No item: orbax returns the saved structure as dicts/lists of host arrays;
        # the template is applied afterwards, by leaf name.
        out = self._mgr.restore(step, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(),
        }))
        return out[_STATE]

    def _mark_bad(self, step: int, err: Exception) -> None:
        self._bad.add(step)
        warnings.warn(
            f"skipping checkpoint {self._step_dir(step)}: {err}", CheckpointWarning,
            stacklevel=4,
        )

    def _warn_tmp_dirs(self) -> None:
        for path in self._tmp_dirs():
            if path.name not in self._warned_tmp:
                self._warned_tmp.add(path.name)
                warnings.warn(
                    f"skipping unfinished checkpoint {path}: a save was interrupted "
                    "(the next save removes it)", CheckpointWarning, stacklevel=4,
                )

    # ---- paths -----------------------------------------------------------------

    def _finalized_steps(self) -> list[int]:
        self._mgr.reload()  # another process (or a crash) may have changed the directory
        return list(self._mgr.all_steps())

    def _tmp_dirs(self) -> list[epath.Path]:
        if not self.directory.exists():
            return []
        return sorted(self.directory.glob(f"*{_TMP_SUFFIX}*"))

    def _step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"Checkpointer for {self.directory} is closed")
