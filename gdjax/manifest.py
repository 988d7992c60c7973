"""The manifest of a checkpointed pytree: every leaf's name, shape, dtype and CRC-32.

Pure functions beside Orbax (gdjax/checkpoint.py calls them). `snapshot` takes the host
copy that is written and its manifest; on the way back, `check_template` compares a
template with the manifest before any array is read, `verify` checks the arrays read
against it, and `place` gives them the template's dtypes and shardings.

Why a manifest: Orbax marks a finished save, but a bit flipped inside a data file
afterwards restores silently with wrong values; the CRCs make that a detected error. The
recorded shapes let a config change be reported by key name, and the manifest carries
zero-size arrays, which Orbax 0.12.8 refuses to save.

A manifest is the JSON-able dict `{"format": FORMAT, "leaves": {name: [shape, dtype, crc]}}`.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gdjax import hosts

FORMAT = 1
_SHOWN_PROBLEMS = 8


class CorruptError(Exception):
    """Stored arrays, or a manifest, that cannot be trusted."""


def leaf_name(path) -> str:
    """Returns the "/"-joined name of the leaf at key path `path`, e.g. "params/dense/w".

    Orbax restores NamedTuples and dataclasses as dicts, so attribute, dict and sequence
    keys all map to the same plain name: the name survives the round trip.
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


def named_leaves(tree) -> list[tuple[str, Any]]:
    """Returns the (name, leaf) pairs of `tree` in flattening order, None leaves dropped.

    Raises ValueError if two leaves get the same name.
    """
    named = [(leaf_name(path), leaf)
             for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
    names = [name for name, _ in named]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"pytree leaf names collide after flattening: {dup}")
    return named


def crc32(x: np.ndarray) -> int:
    """Returns the CRC-32 of the bytes of `x` in C order."""
    return zlib.crc32(np.ascontiguousarray(x).view(np.uint8))


def host_copy(name: str, leaf) -> np.ndarray:
    """Returns an owned numpy copy of `leaf` (named `name` in errors).

    Owned, so that the caller may donate or mutate `leaf` while the copy is written.
    Raises TypeError for typed PRNG keys and leaves that are not arrays or scalars,
    NotImplementedError for arrays sharded across processes.
    """
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


def snapshot(state) -> tuple[Any, dict]:
    """Returns (host tree, manifest) of the pytree `state`.

    The host tree has `state`'s structure with owned numpy leaves, except that zero-size
    leaves become None (Orbax cannot save them; the manifest alone carries them). Raises
    ValueError for an empty pytree, which Orbax cannot save either.
    """
    if not jax.tree.leaves(state, is_leaf=lambda x: x is None):
        raise ValueError("state is an empty pytree; orbax cannot save an empty item")
    named = [(name, host_copy(name, leaf)) for name, leaf in named_leaves(state)]
    leaves = {name: [list(x.shape), x.dtype.name, crc32(x)] for name, x in named}
    host_tree = jax.tree.unflatten(jax.tree.structure(state),
                                   [x if x.size else None for _, x in named])
    return host_tree, {"format": FORMAT, "leaves": leaves}


def check_format(manifest) -> dict:
    """Returns `manifest` if it is a manifest of this format; raises CorruptError if not."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptError("manifest missing or of an unknown format")
    return manifest


def _template_spec(leaf) -> tuple[tuple[int, ...], np.dtype]:
    dtype = jnp.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        raise TypeError("template holds a typed PRNG key; use its key_data (uint32)")
    return tuple(np.shape(leaf)), dtype


def check_template(template, manifest: dict, where) -> None:
    """Returns None if `template` has the manifest's leaf names and shapes.

    Otherwise raises ValueError naming checkpoint `where` and every key that is missing
    on either side or differs in shape (dtypes may differ: `place` casts).
    """
    stored = {name: tuple(spec[0]) for name, spec in manifest["leaves"].items()}
    wanted = {name: _template_spec(leaf)[0] for name, leaf in named_leaves(template)}
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
        shown = "; ".join(problems[:_SHOWN_PROBLEMS])
        more = "; ..." if len(problems) > _SHOWN_PROBLEMS else ""
        raise ValueError(
            f"checkpoint {where} does not match the template (did the config change?): "
            f"{shown}{more}"
        )


def verify(arrays: dict, manifest: dict) -> dict:
    """Returns {name: numpy array} for every leaf of `manifest`, checked against it.

    `arrays` maps names to the arrays read back; the zero-size leaves, never written,
    are rebuilt from the manifest. Raises CorruptError naming the first leaf that is
    missing, of another shape or dtype, or failing its CRC-32, and any leaf the manifest
    does not list.
    """
    leaves = manifest["leaves"]
    out = {}
    for name, (shape, dtype_name, crc) in leaves.items():
        dtype = jnp.dtype(dtype_name)
        x = arrays.get(name)
        if x is None:
            if int(np.prod(shape)) != 0:
                raise CorruptError(f"leaf {name!r} is missing")
            x = np.zeros(shape, dtype)
        x = np.asarray(x)
        if list(x.shape) != list(shape) or x.dtype != dtype:
            raise CorruptError(f"leaf {name!r} reads as {x.dtype}{x.shape}, "
                               f"manifest says {dtype_name}{tuple(shape)}")
        if crc32(x) != crc:
            raise CorruptError(f"leaf {name!r} fails its CRC-32 check")
        out[name] = x
    if extra := sorted(arrays.keys() - leaves.keys()):
        raise CorruptError(f"leaves not in the manifest: {extra}")
    return out


def _place_leaf(x: np.ndarray, leaf):
    x = x.astype(_template_spec(leaf)[1], copy=False)
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        # A ShapeDtypeStruct without a sharding has None: the default device.
        return jax.device_put(x, leaf.sharding)
    return x


def place(arrays: dict, template):
    """Returns `template`'s pytree with its leaves replaced by `arrays[name]`.

    Each array is cast to its template leaf's dtype; a jax.Array or ShapeDtypeStruct
    leaf gives a jax.Array with that leaf's sharding, a numpy leaf a numpy array.
    `arrays` must hold every name of the template (`check_template` ensures it).
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    placed = [_place_leaf(arrays[leaf_name(path)], leaf) for path, leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, placed)
