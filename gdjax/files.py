"""Writing files so that a reader never sees half of one, and arrays with a record of them.

- `atomic_write(path, data)`: bytes or text through a temporary file beside `path` and
  `os.replace` (atomic on one file system); the temporary file goes if the write fails.
- `write_json` / `read_json`: a JSON file written atomically; read back with an error that
  names the file when it is not JSON.
- `save_tree(path, tree, meta, ...)` / `load_tree(...)`: a pytree of arrays (Orbax, under
  `path/<tree_dir>`) with a JSON record of what it is (`path/<meta_file>`), the record
  written last: a directory without it is an unfinished save and reads as absent. The
  generator's params (gdjax/convert.py), the evaluation classifier and the Inception
  weights are saved this way.
- `shape_problems(found, expected)`: what differs between two {key: shape} maps, for
  every converter of foreign weights.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Callable, Mapping

import jax

PathLike = str | os.PathLike


def atomic_write(path: PathLike, data: bytes | str) -> pathlib.Path:
    """Writes `data` to `path` (parents created) through a temporary file and os.replace."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A per-process name in the same directory: os.replace is then atomic, and open()
    # (unlike mkstemp's 0600) gives the file the usual umask permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: PathLike, value: Any) -> pathlib.Path:
    return atomic_write(path, json.dumps(value, indent=2))


def read_json(path: PathLike, *, fix: str = "") -> Any:
    """The JSON value in `path`; ValueError naming the file (and `fix`) if it is not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}){'; ' + fix if fix else ''}") from e


def save_tree(path: PathLike, tree, meta: Mapping[str, Any], *, tree_dir: str, meta_file: str,
              multiprocessing_options=None) -> pathlib.Path:
    """Saves `tree` under `path/tree_dir` (Orbax) and then `meta` as `path/meta_file`."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    (path / meta_file).unlink(missing_ok=True)  # from here until the end: unfinished
    kwargs = {} if multiprocessing_options is None else {
        "multiprocessing_options": multiprocessing_options}
    with ocp.StandardCheckpointer(**kwargs) as checkpointer:
        checkpointer.save(path / tree_dir, tree, force=True)
        checkpointer.wait_until_finished()
    write_json(path / meta_file, dict(meta))
    return path


def saved_meta(path: PathLike, meta_file: str, *, missing: str) -> dict:
    """The record `save_tree` wrote in `path`; FileNotFoundError(`missing`) without one."""
    meta_path = pathlib.Path(path) / meta_file
    if not meta_path.is_file():
        raise FileNotFoundError(missing)
    meta = read_json(meta_path)
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} holds a {type(meta).__name__}, not a record")
    return meta


def load_tree(path: PathLike, template, *, tree_dir: str, multiprocessing_options=None):
    """The tree saved under `path/tree_dir`, restored into `template`'s shapes and dtypes
    (a pytree of jax.ShapeDtypeStruct; their shardings say where the arrays go)."""
    import orbax.checkpoint as ocp

    kwargs = {} if multiprocessing_options is None else {
        "multiprocessing_options": multiprocessing_options}
    with ocp.StandardCheckpointer(**kwargs) as checkpointer:
        return checkpointer.restore(pathlib.Path(path).absolute() / tree_dir, template)


def on_one_device(shapes) -> Any:
    """`shapes` (a pytree with .shape and .dtype leaves) as ShapeDtypeStructs placed on
    this process's first device: a restore template."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                        shapes)


def shape_problems(found: Mapping[Any, tuple], expected: Mapping[Any, tuple], *,
                   name: Callable[[Any], str] = str) -> list[str]:
    """Every key missing from `found`, not in `expected`, or of another shape, as text."""
    problems = [f"missing key {name(k)!r} (expected shape {tuple(expected[k])})"
                for k in sorted(set(expected) - set(found))]
    problems += [f"unexpected key {name(k)!r} (shape {tuple(found[k])})"
                 for k in sorted(set(found) - set(expected))]
    problems += [f"key {name(k)!r}: expected shape {tuple(expected[k])}, found {tuple(found[k])}"
                 for k in sorted(set(found) & set(expected))
                 if tuple(found[k]) != tuple(expected[k])]
    return problems
