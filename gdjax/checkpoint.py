"""Checkpoints that let a continual-learning run stop anywhere and resume bit for bit.

`Checkpointer` wraps `orbax.checkpoint.CheckpointManager`. Each step directory holds
three orbax items:

- `state`: the array pytree (params, optimizer state, teacher, PRNG key data, counters,
  replay-buffer indices), written from a host copy taken when `save` is called;
- `meta`: the caller's small JSON dict (experience index, step within it, config
  fingerprint, ...);
- `manifest`: our own JSON record of every leaf's name, shape, dtype and CRC-32.

Why the manifest: orbax marks a finished save (atomic rename of
`<step>.orbax-checkpoint-tmp` plus `commit_success.txt`), but a bit flipped inside a
data file afterwards restores silently with wrong values. The CRCs turn that into a
detected error, and the recorded shapes let a config change be reported by key name
before any data is read. The manifest also carries zero-size arrays (an empty replay
buffer at the first experience), which orbax 0.12.8 refuses to save.

Reading is defensive: `latest_step` and `restore(step=None)` walk from the newest
step down, skip (with a `CheckpointWarning` naming the directory) anything unfinished,
unreadable or failing its checksums, and use the newest good one. Writing is
asynchronous; every public method first waits for the save in flight, so none of them
can observe a half-written checkpoint, and a failed write raises `CheckpointWriteError`
naming the step still usable.

Scope: a single process (any number of local devices). Arrays are restored on the host
and then placed with the template's sharding.

Test-only hook: `pause_point` lets a test stop the process at a named point (for instance
in the middle of a checkpoint write) and SIGKILL it exactly there; see its docstring.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
import threading
import time
import warnings
import zlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from gdjax import hosts

_STATE, _META, _MANIFEST = "state", "meta", "manifest"
_MANIFEST_FORMAT = 1
_TMP_SUFFIX = ocp.path.atomicity.TMP_DIR_SUFFIX
_COMMIT_FILE = ocp.path.atomicity.COMMIT_SUCCESS_FILE
_WRITER_JOIN_SECS = 60.0
# Test-only (see `pause_point`): read once at import; never set them outside tests.
PAUSE_AT_ENV, PAUSE_FILE_ENV = "GDJAX_TEST_PAUSE_AT", "GDJAX_TEST_PAUSE_FILE"
_PAUSE_AT = os.environ.get(PAUSE_AT_ENV) or None

logger = logging.getLogger(__name__)


class CheckpointWarning(UserWarning):
    """A checkpoint on disk was skipped or removed because it is unusable."""


class CheckpointError(RuntimeError):
    """No usable checkpoint could be read."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; earlier checkpoints are untouched."""


class _Corrupt(Exception):
    """Internal: a step directory is unfinished, unreadable or fails its checksums."""


def pause_point(*where) -> None:
    """Test-only: stops this process for good if `where` is the point the tests asked for.

    The points are named by their parts joined with "/", such as "checkpoint/4" (orbax has
    written every item of checkpoint step 4 into its tmp directory but not committed it;
    the thread that called `save` waits for it). With `GDJAX_TEST_PAUSE_AT` set to that
    name, the process writes the name into the file `GDJAX_TEST_PAUSE_FILE` and sleeps
    until killed, so that a test can SIGKILL it exactly there (tests/test_reliability.py).
    Unset (always, outside tests), a point costs one comparison.
    """
    if _PAUSE_AT is None or "/".join(map(str, where)) != _PAUSE_AT:
        return
    marker = os.environ[PAUSE_FILE_ENV]
    with open(f"{marker}.tmp", "w") as f:
        f.write(_PAUSE_AT)
    os.replace(f"{marker}.tmp", marker)  # the test never reads half a marker
    while True:
        time.sleep(60)


class _PausingTemporaryPath(ocp.path.atomicity.AtomicRenameTemporaryPath):
    """Orbax's tmp-dir-then-rename commit, with `pause_point("checkpoint", step)` before it.

    Used only while `GDJAX_TEST_PAUSE_AT` is set.
    """

    async def finalize(self):
        pause_point("checkpoint", self.get_final().name)
        await super().finalize()


def config_fingerprint(config_dict: Mapping[str, Any]) -> str:
    """Returns the sha256 hex digest of a JSON-able dict, independent of key order.

    A `ConfigDict` is accepted too (through its `to_dict`); numpy scalars count as
    the Python numbers they hold.
    """
    if hasattr(config_dict, "to_dict"):
        config_dict = config_dict.to_dict()
    blob = json.dumps(
        config_dict, sort_keys=True, separators=(",", ":"), default=_json_default
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{obj!r} (type {type(obj).__name__}) is not JSON-able")


def _leaf_name(path) -> str:
    """A name for a leaf that survives orbax's round trip.

    Orbax restores NamedTuples and dataclasses as dicts, so attribute, dict and
    sequence keys must all map to the same plain name.
    """
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _named_leaves(tree) -> list[tuple[str, Any]]:
    """Returns (name, leaf) pairs of `tree`, None leaves dropped; names must be unique."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    named = [(_leaf_name(path), leaf) for path, leaf in flat]
    names = [name for name, _ in named]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"pytree leaf names collide after flattening: {dup}")
    return named


def _crc32(x: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(x).view(np.uint8))


def _host_copy(name: str, leaf) -> np.ndarray:
    """An owned host copy: the caller may donate or mutate `leaf` once `save` returns."""
    if isinstance(leaf, jax.Array):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            raise TypeError(
                f"{name!r} is a typed PRNG key; save jax.random.key_data(key) instead"
            )
        if not (leaf.is_fully_addressable or leaf.is_fully_replicated):
            raise NotImplementedError(
                f"{name!r} is sharded across processes; this checkpointer saves replicated "
                f"or single-process arrays"
            )
    elif not isinstance(leaf, (np.ndarray, np.generic, bool, int, float)):
        raise TypeError(f"{name!r}: cannot checkpoint a leaf of type {type(leaf).__name__}")
    return hosts.host_copy(leaf)


def _snapshot(state) -> tuple[Any, dict]:
    """Returns (host tree for orbax, manifest). Zero-size leaves live only in the manifest."""
    if not jax.tree.leaves(state, is_leaf=lambda x: x is None):
        raise ValueError("state is an empty pytree; orbax cannot save an empty item")
    named = [(name, _host_copy(name, leaf)) for name, leaf in _named_leaves(state)]
    leaves = {name: [list(x.shape), x.dtype.name, _crc32(x)] for name, x in named}
    treedef = jax.tree.structure(state)
    orbax_tree = jax.tree.unflatten(treedef, [x if x.size else None for _, x in named])
    return orbax_tree, {"format": _MANIFEST_FORMAT, "leaves": leaves}


def _check_json(meta) -> dict:
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise TypeError(f"meta must be JSON-able: {e}") from None
    return dict(meta)


def _template_spec(leaf) -> tuple[tuple[int, ...], np.dtype]:
    dtype = jnp.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        raise TypeError("template holds a typed PRNG key; use its key_data (uint32)")
    return tuple(np.shape(leaf)), dtype


def _check_template(template, manifest: dict, where: epath.Path) -> None:
    """Raises ValueError naming every key whose presence or shape differs."""
    stored = {name: tuple(spec[0]) for name, spec in manifest["leaves"].items()}
    wanted = {name: _template_spec(leaf)[0] for name, leaf in _named_leaves(template)}
    problems = [
        f"{name!r}: checkpoint shape {stored[name]} vs template shape {wanted[name]}"
        for name in sorted(stored.keys() & wanted.keys())
        if stored[name] != wanted[name]
    ]
    problems += [f"{n!r}: in the template {wanted[n]} but not in the checkpoint"
                 for n in sorted(wanted.keys() - stored.keys())]
    problems += [f"{n!r}: in the checkpoint {stored[n]} but not in the template"
                 for n in sorted(stored.keys() - wanted.keys())]
    if problems:
        shown = "; ".join(problems[:8]) + ("; ..." if len(problems) > 8 else "")
        raise ValueError(
            f"checkpoint {where} does not match the template (did the config change?): "
            f"{shown}"
        )


def _place(x: np.ndarray, leaf):
    """Casts `x` to the template leaf's dtype and puts it where the template says."""
    _, dtype = _template_spec(leaf)
    x = x.astype(dtype, copy=False)
    if isinstance(leaf, jax.Array):
        return jax.device_put(x, leaf.sharding)
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.device_put(x, leaf.sharding)  # None -> the default device
    return x


def _verify(arrays: dict, manifest: dict) -> dict:
    """Checks every stored leaf against the manifest; adds the zero-size ones back."""
    leaves = manifest["leaves"]
    out = {}
    for name, (shape, dtype_name, crc) in leaves.items():
        dtype = jnp.dtype(dtype_name)
        x = arrays.get(name)
        if x is None:
            if int(np.prod(shape)) != 0:
                raise _Corrupt(f"leaf {name!r} is missing")
            x = np.zeros(shape, dtype)
        x = np.asarray(x)
        if list(x.shape) != list(shape) or x.dtype != dtype:
            raise _Corrupt(f"leaf {name!r} reads as {x.dtype}{x.shape}, "
                           f"manifest says {dtype_name}{tuple(shape)}")
        if _crc32(x) != crc:
            raise _Corrupt(f"leaf {name!r} fails its CRC-32 check")
        out[name] = x
    if extra := sorted(arrays.keys() - leaves.keys()):
        raise _Corrupt(f"leaves not in the manifest: {extra}")
    return out


def _new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before]


def _guarded(fn, *args):
    """Runs a read; any failure other than running out of memory means corrupt."""
    try:
        return fn(*args)
    except (_Corrupt, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types
        raise _Corrupt(f"{type(e).__name__}: {str(e)[:300]}") from e


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
        self._good: set[int] = set()  # steps verified by a full read in this process
        self._bad: set[int] = set()  # steps found unusable (already warned about)
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
            temporary_path_class=_PausingTemporaryPath if _PAUSE_AT else None,
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
        orbax_tree, manifest = _snapshot(state)
        self._clear_way(step)
        args = ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(orbax_tree),
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
        if wait or _PAUSE_AT == f"checkpoint/{step}":  # the test pause: stop the caller too
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
            if s not in self._bad and self._is_good(s):
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

    def all_steps(self) -> list[int]:
        """Returns the finished step directories on disk, ascending (not read or verified)."""
        self._check_open()
        self.wait()
        return sorted(self._finalized_steps())

    def latest_step(self) -> int | None:
        """Returns the newest step that is finished and reads back with valid checksums.

        The first call per step reads that checkpoint in full; the verdict is cached.
        """
        self._check_open()
        self.wait()
        return self._newest_good()

    def restore(self, template, step: int | None = None) -> tuple[Any, dict]:
        """Returns (state, meta) of `step`, or of the newest good step when None.

        `template` has the saved structure; its leaves (numpy/jax arrays or
        `jax.ShapeDtypeStruct`) give each restored leaf's dtype and placement: numpy
        leaves give numpy arrays, jax leaves give jax arrays with their sharding.
        Raises ValueError if the template's keys or shapes differ from the checkpoint,
        CheckpointError if no usable checkpoint exists.
        """
        self._check_open()
        self.wait()
        if step is not None:
            try:
                return self._read(operator.index(step), template)
            except _Corrupt as e:
                raise CheckpointError(
                    f"checkpoint {self._step_dir(step)} is unusable ({e}); "
                    "restore(step=None) picks the newest good one"
                ) from e
        return self._restore_newest(template)

    def _restore_newest(self, template) -> tuple[Any, dict]:
        self._warn_tmp_dirs()
        for s in sorted(self._finalized_steps(), reverse=True):
            if s in self._bad:
                continue
            try:
                out = self._read(s, template)
            except _Corrupt as e:
                self._mark_bad(s, e)
                continue
            self._good.add(s)
            return out
        raise CheckpointError(self._none_usable_message())

    def restore_meta(self, step: int | None = None) -> dict:
        """Returns only the meta dict of `step` (None: the newest good step).

        For templates whose structure depends on what was saved, e.g. a teacher that
        exists only after the first experience: read the meta, build the template, then
        `restore(template)` picks the same step.
        """
        self._check_open()
        self.wait()
        if step is None:
            step = self._newest_good()
            if step is None:
                raise CheckpointError(self._none_usable_message())
        try:
            return _guarded(self._read_small, operator.index(step))[1]
        except _Corrupt as e:
            raise CheckpointError(f"checkpoint {self._step_dir(step)} is unusable ({e})") from e

    def _none_usable_message(self) -> str:
        found = sorted(self._bad)
        what = (f"steps {found} are all unusable (see warnings above)" if found
                else "it holds no finished checkpoint")
        return (
            f"no usable checkpoint in {self.directory}: {what}. To start fresh, move or "
            f"delete {self.directory}, or give the run a new checkpoint directory."
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
        except _Corrupt as e:
            self._mark_bad(step, e)
            return False
        self._good.add(step)
        return True

    def _read(self, step: int, template) -> tuple[Any, dict]:
        """Reads and verifies one step; raises _Corrupt, or ValueError on a template mismatch.

        With `template=None` it only verifies (and returns the leaves by name).
        """
        step_dir = self._step_dir(step)
        manifest, meta = _guarded(self._read_small, step)
        if template is not None:
            _check_template(template, manifest, step_dir)
        state = _guarded(self._read_state, step)
        arrays = _verify({n: x for n, x in _named_leaves(state)}, manifest)
        if template is None:
            return arrays, meta
        leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
        placed = [_place(arrays[_leaf_name(path)], leaf) for path, leaf in leaves]
        return jax.tree_util.tree_unflatten(treedef, placed), meta

    def _read_small(self, step: int) -> tuple[dict, dict]:
        step_dir = self._step_dir(step)
        if not (step_dir / _COMMIT_FILE).exists():
            raise _Corrupt(f"no {_COMMIT_FILE}: the save never finished")
        out = self._mgr.restore(step, args=ocp.args.Composite(**{
            _META: ocp.args.JsonRestore(), _MANIFEST: ocp.args.JsonRestore(),
        }))
        manifest = out[_MANIFEST]
        if not isinstance(manifest, dict) or manifest.get("format") != _MANIFEST_FORMAT:
            raise _Corrupt("manifest missing or of an unknown format")
        return manifest, out[_META]

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
