"""Tests of gdjax.checkpoint and gdjax.manifest: exact round trips, recovery from damaged
checkpoints, one read per resume, clear errors on config changes and write failures, and
sharded restores."""

import errno
import os
import re
import subprocess
import sys
import textwrap
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gdjax import manifest, rundir
from gdjax.checkpoint import (
    CheckpointError,
    Checkpointer,
    CheckpointWarning,
    CheckpointWriteError,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class AdamLike(NamedTuple):
    count: Any
    mu: Any
    nu: Any


def _state(seed: int = 0):
    """A train-state-like pytree: every dtype the loop stores, None leaves, an empty array."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    w[0, :4] = [np.nan, -0.0, np.inf, np.float32(1e-45)]  # bit patterns must survive
    params = {"dense": {"w": jnp.asarray(w), "b": jnp.zeros((128,), jnp.float32)}}
    return {
        "params": params,
        "opt": AdamLike(jnp.int32(seed), jax.tree.map(jnp.ones_like, params), None),
        "teacher": None,
        "key": jax.random.key_data(jax.random.key(seed)),
        "step": np.int32(1000 + seed),
        "replay_idx": rng.integers(0, 100, size=(7,)).astype(np.int32),
        "empty_idx": np.zeros((0,), np.int32),
        "seen": np.array([True, False, bool(seed % 2)]),
        "half": jnp.arange(4, dtype=jnp.bfloat16) * seed,
    }


def _assert_bitwise_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g), np.asarray(w)
        assert (g.shape, g.dtype) == (w.shape, w.dtype)
        assert g.tobytes() == w.tobytes()


def _saved(tmp_path, steps, **kwargs) -> Checkpointer:
    ckpt = Checkpointer(tmp_path / "ckpt", **kwargs)
    for s in steps:
        ckpt.save(s, _state(s), {"experience": s, "note": "x"})
    ckpt.wait()
    return ckpt


def _finished_steps(directory) -> list[int]:
    """The finished step directories on disk, ascending (an unfinished one has a tmp suffix)."""
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _largest_file(directory) -> str:
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


def test_round_trip_is_bitwise_exact(tmp_path):
    state = _state(3)
    meta = {"experience": 2, "step_in_experience": 17, "fingerprint": "ab" * 32}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(5, state, meta)
        # Templates of three kinds: the live state, abstract structs, and numpy arrays.
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), state)
        for template in (state, abstract, jax.tree.map(np.asarray, state)):
            got, got_meta = ckpt.restore(template)
            _assert_bitwise_equal(got, jax.tree.map(np.asarray, state))
            assert got_meta == meta
        got, _ = ckpt.restore(state)
        assert isinstance(got["params"]["dense"]["w"], jax.Array)
        assert isinstance(got["replay_idx"], np.ndarray)
        assert isinstance(got["opt"], AdamLike) and got["opt"].nu is None
        # The restored key data continues the same random stream.
        key = jax.random.wrap_key_data(got["key"])
        want = jax.random.normal(jax.random.key(3), (3,))
        assert jnp.array_equal(jax.random.normal(key, (3,)), want)


def test_restored_dtype_follows_template(tmp_path):
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, {"w": np.arange(4, dtype=np.float32)}, {})
        got, _ = ckpt.restore({"w": jax.ShapeDtypeStruct((4,), jnp.bfloat16)})
    assert got["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got["w"], np.float32), np.arange(4))


def test_latest_step_and_max_to_keep(tmp_path):
    ckpt = _saved(tmp_path, [10, 20, 30, 40, 50], max_to_keep=2)
    assert _finished_steps(tmp_path / "ckpt") == [40, 50]
    assert ckpt.latest_step() == 50
    ckpt.close()
    # A fresh process sees the same, and restores the newest.
    again = Checkpointer(tmp_path / "ckpt", max_to_keep=2)
    assert again.latest_step() == 50
    got, meta = again.restore(_state(0))
    _assert_bitwise_equal(got, jax.tree.map(np.asarray, _state(50)))
    assert meta["experience"] == 50
    again.close()
    assert Checkpointer(tmp_path / "empty").latest_step() is None
    assert Checkpointer(tmp_path / "empty").restore(_state(0)) is None


# When one array read fails, tensorstore completes the others after orbax has closed
# its event loop; Python reports that as an unraisable exception. Harmless noise.
_ignore_closed_loop = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


def _corrupt(step_dir, kind):
    if kind == "tmp_leftover":  # a save killed before its atomic rename
        os.rename(step_dir, f"{step_dir}{ocp.path.atomicity.TMP_DIR_SUFFIX}")
        return
    if kind == "no_commit_marker":
        os.remove(step_dir / "commit_success.txt")
        return
    if kind == "manifest_deleted":
        os.remove(step_dir / "manifest" / "metadata")
        return
    path = _largest_file(step_dir / "state")  # the array data
    data = open(path, "rb").read()
    if kind == "data_deleted":
        os.remove(path)
    elif kind == "data_garbage":
        open(path, "wb").write(os.urandom(len(data)))
    elif kind == "data_truncated":
        open(path, "wb").write(data[: len(data) // 2])
    elif kind == "one_byte_flipped":  # orbax itself restores this silently
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x01
        open(path, "wb").write(bytes(flipped))


@_ignore_closed_loop
@pytest.mark.parametrize("kind", [
    "tmp_leftover", "no_commit_marker", "manifest_deleted", "data_deleted",
    "data_garbage", "data_truncated", "one_byte_flipped",
])
def test_damaged_newest_checkpoint_is_skipped(tmp_path, kind):
    _saved(tmp_path, [1, 2, 3]).close()
    bad_dir = tmp_path / "ckpt" / "3"
    _corrupt(bad_dir, kind)
    ckpt = Checkpointer(tmp_path / "ckpt")
    with pytest.warns(CheckpointWarning, match=re.escape(str(bad_dir))):
        assert ckpt.latest_step() == 2
    got, meta = ckpt.restore(_state(0))
    _assert_bitwise_equal(got, jax.tree.map(np.asarray, _state(2)))
    assert meta["experience"] == 2
    # The resumed run saves step 3 again: the damaged one makes way, the new one reads back.
    with pytest.warns(CheckpointWarning) if kind != "tmp_leftover" else _no_op():
        ckpt.save(3, _state(33), {"experience": 33}, wait=True)
    assert ckpt.latest_step() == 3
    _assert_bitwise_equal(ckpt.restore(_state(0))[0], jax.tree.map(np.asarray, _state(33)))
    assert not _tmp_dirs(tmp_path / "ckpt")
    ckpt.close()


class _no_op:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@_ignore_closed_loop
def test_crc_failure_is_named_and_the_step_before_restores(tmp_path):
    ckpt = _saved(tmp_path, [1, 2])
    _corrupt(tmp_path / "ckpt" / "2", "one_byte_flipped")
    with pytest.warns(CheckpointWarning, match=r"ckpt/2: leaf .* fails its CRC-32 check"):
        got, meta = ckpt.restore(_state(0))
    _assert_bitwise_equal(got, jax.tree.map(np.asarray, _state(1)))
    assert meta["experience"] == 1
    ckpt.close()


@_ignore_closed_loop
@pytest.mark.parametrize("damaged", [False, True])
def test_resume_reads_each_step_once(tmp_path, monkeypatch, damaged):
    _saved(tmp_path, [1, 2, 3]).close()
    if damaged:
        _corrupt(tmp_path / "ckpt" / "3", "one_byte_flipped")
    state_reads = []
    real_restore = ocp.CheckpointManager.restore

    def counting_restore(self, step, *args, **kwargs):
        if "state" in kwargs["args"]:
            state_reads.append(step)
        return real_restore(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", counting_restore)
    ckpt = Checkpointer(tmp_path / "ckpt")
    with pytest.warns(CheckpointWarning) if damaged else _no_op():
        got, meta = ckpt.restore(_state(0))  # a resume: the newest good step, read once
    newest = 2 if damaged else 3
    _assert_bitwise_equal(got, jax.tree.map(np.asarray, _state(newest)))
    assert meta["experience"] == newest
    assert ckpt.latest_step() == newest  # asked again later: the verdict is cached
    assert state_reads == ([3, 2] if damaged else [3])
    ckpt.close()


@_ignore_closed_loop
def test_all_corrupt_raises_clear_error(tmp_path):
    _saved(tmp_path, [1]).close()
    _corrupt(tmp_path / "ckpt" / "1", "data_garbage")
    ckpt = Checkpointer(tmp_path / "ckpt")
    with pytest.warns(CheckpointWarning):
        assert ckpt.latest_step() is None
    with pytest.raises(CheckpointError, match="start fresh") as info:
        ckpt.restore(_state(0))
    assert str(tmp_path / "ckpt") in str(info.value)
    # No finished step at all is not an error: there is nothing to resume.
    assert Checkpointer(tmp_path / "empty").restore(_state(0)) is None
    _saved(tmp_path / "killed", [1]).close()
    _corrupt(tmp_path / "killed" / "ckpt" / "1", "tmp_leftover")
    with pytest.warns(CheckpointWarning, match="unfinished"):
        assert Checkpointer(tmp_path / "killed" / "ckpt").restore(_state(0)) is None


def test_template_mismatch_names_key_and_shapes(tmp_path):
    ckpt = _saved(tmp_path, [1])
    template = _state(0)
    template["params"]["dense"]["w"] = jnp.zeros((64, 64))
    with pytest.raises(ValueError, match=r"'params/dense/w'.*\(64, 128\).*\(64, 64\)") as info:
        ckpt.restore(template)
    assert "config" in str(info.value)
    template = _state(0)
    template["teacher"] = {"w": jnp.zeros((2,))}
    with pytest.raises(ValueError, match=r"'teacher/w'.*not in the checkpoint"):
        ckpt.restore(template)
    ckpt.close()


async def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _tmp_dirs(directory):
    return list(directory.glob(f"*{ocp.path.atomicity.TMP_DIR_SUFFIX}*"))


@pytest.mark.parametrize("where, wait", [
    ("while_starting", True),  # the array writer fails before save() returns
    ("in_background", True),  # the JSON writer fails in orbax's commit thread
    ("in_background", False),  # ... and surfaces from the next call that waits
])
def test_write_failure_keeps_previous_checkpoint(tmp_path, monkeypatch, where, wait):
    ckpt = _saved(tmp_path, [1])
    with monkeypatch.context() as patch:
        if where == "while_starting":
            patch.setattr(ocp.handlers.StandardCheckpointHandler, "async_save", _disk_full)
        else:
            patch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", _disk_full)
        expected = (r"could not write checkpoint at step 2 to .*ckpt: .*No space left on device; "
                    r"the previous checkpoint \(step 1\) is still usable")
        with pytest.raises(CheckpointWriteError, match=expected):
            ckpt.save(2, _state(2), {"experience": 2}, wait=wait)
            ckpt.wait()
    assert not _tmp_dirs(tmp_path / "ckpt")  # the partial write is cleaned up
    assert _finished_steps(tmp_path / "ckpt") == [1]
    assert ckpt.latest_step() == 1
    _assert_bitwise_equal(ckpt.restore(_state(0))[0], jax.tree.map(np.asarray, _state(1)))
    ckpt.save(2, _state(2), {"experience": 2}, wait=True)  # the disk has room again
    assert ckpt.latest_step() == 2
    ckpt.close()


def test_bad_inputs_fail_before_writing(tmp_path):
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        with pytest.raises(TypeError, match="JSON"):
            ckpt.save(1, _state(0), {"step": np.int64(3)})
        with pytest.raises(TypeError, match="key_data"):
            ckpt.save(1, {"key": jax.random.key(0)}, {})
        with pytest.raises(ValueError, match="empty"):
            ckpt.save(1, {}, {})
        ckpt.save(2, _state(0), {}, wait=True)
        with pytest.raises(ValueError, match="refusing to overwrite"):
            ckpt.save(1, _state(0), {})
        assert _finished_steps(tmp_path / "ckpt") == [2]


def test_a_teacher_that_appears_later_restores_from_the_newest_step(tmp_path):
    # A teacher that is None during the first experience and a params copy afterwards.
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, _state(1), {"experience": 0})
        later = {**_state(2), "teacher": _state(7)["params"]}
        ckpt.save(2, later, {"experience": 1})
        got, got_meta = ckpt.restore({**_state(0), "teacher": _state(0)["params"]})
        assert got_meta == {"experience": 1}
        _assert_bitwise_equal(got, jax.tree.map(np.asarray, later))
        # A template without it is a config change, not a reason to fall back to step 1.
        with pytest.raises(ValueError, match=r"'teacher/dense/w'.*not in the template"):
            ckpt.restore(_state(0))


def test_manifest_catches_a_flipped_bit_and_rebuilds_empty_leaves():
    state = _state(4)
    host_tree, record = manifest.snapshot(state)
    assert host_tree["empty_idx"] is None  # orbax cannot save it; the manifest carries it
    arrays = {name: x for name, x in manifest.named_leaves(host_tree)}
    checked = manifest.verify(arrays, record)
    assert checked["empty_idx"].shape == (0,) and checked["empty_idx"].dtype == np.int32
    _assert_bitwise_equal(manifest.place(checked, state), jax.tree.map(np.asarray, state))
    flipped = arrays["params/dense/b"].copy()
    flipped.view(np.uint8)[5] ^= 0x10
    with pytest.raises(manifest.CorruptError, match="'params/dense/b' fails its CRC-32"):
        manifest.verify({**arrays, "params/dense/b": flipped}, record)
    with pytest.raises(manifest.CorruptError, match=r"not in the manifest: \['extra'\]"):
        manifest.verify({**arrays, "extra": flipped}, record)
    manifest.check_template(state, record, "here")  # matches: returns quietly


def test_config_fingerprint():  # gdjax/rundir.py
    config = {"model": {"channels": [32, 64], "dropout": 0.1}, "seed": 0}
    reordered = {"seed": 0, "model": {"dropout": 0.1, "channels": [32, 64]}}
    fp = rundir.fingerprint(config)
    assert fp == rundir.fingerprint(reordered)
    assert re.fullmatch(r"[0-9a-f]{64}", fp)
    # Pinned: a fingerprint must not drift between processes or releases.
    assert rundir.fingerprint({"a": 1}) == (
        "015abd7f5cc57a2dd94b7590f04ad8084273905ee33ec5cebeae62276a97f862")
    assert fp != rundir.fingerprint({**config, "seed": 1})
    assert fp != rundir.fingerprint({**config, "model": {"channels": [32, 64], "dropout": 0.2}})


_SHARDED_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from gdjax.checkpoint import Checkpointer
    assert len(jax.devices()) == 8, jax.devices()
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    rows = NamedSharding(mesh, P("data", "model"))
    repl = NamedSharding(mesh, P())
    state = {"w": jax.device_put(jnp.arange(64.0).reshape(8, 8), rows),
             "c": jax.device_put(jnp.int32(7), repl)}
    ckpt = Checkpointer(sys.argv[1])
    ckpt.save(1, state, {"ok": True}, wait=True)
    template = {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=rows),
                "c": jax.ShapeDtypeStruct((), jnp.int32, sharding=repl)}
    for tmpl in (template, state):
        got, meta = ckpt.restore(tmpl)
        assert got["w"].sharding == rows and got["c"].sharding == repl, got
        assert len(got["w"].addressable_shards) == 8
        np.testing.assert_array_equal(got["w"], np.arange(64.0).reshape(8, 8))
        assert int(got["c"]) == 7 and meta == {"ok": True}
    ckpt.close()
    print("sharded-ok")
""")


def test_sharded_restore_on_eight_cpu_devices(tmp_path):
    # A fresh process: the device count is fixed when jax starts.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    run = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, str(tmp_path / "ckpt")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "sharded-ok" in run.stdout, run.stderr[-3000:]
