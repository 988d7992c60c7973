"""A network over many images, a padded batch at a time, on a device mesh.

`map_batches(fn, params, images, batch_size=..., sharding=...)` runs the jitted
`fn(params, batch)` over `images` in batches of one shape (the last padded with zeros and
cut after), so it compiles once per batch size; with a `sharding` every batch is split over
the mesh's 'data' axis (the batch size rounded up to a multiple of its devices) and the
params are replicated, so each device computes its share; the results are gathered and come
back to every process as numpy arrays (a tuple when `fn` returns one).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from gdjax import data as gdata
from gdjax import hosts


def batch_for(n: int, batch_size: int, sharding=None) -> int:
    """The batch to run `n` images in: `batch_size`, or fewer (the next power of two above
    n) for a small set, rounded up to a multiple of the devices `sharding` splits over."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch = min(batch_size, 1 << max(n - 1, 0).bit_length())
    devices = 1 if sharding is None else sharding.mesh.shape["data"]
    return -(-batch // devices) * devices


@functools.lru_cache(maxsize=64)
def _placed(fn: Callable, sharding):
    if sharding is None:
        return jax.jit(fn)
    same = NamedSharding(sharding.mesh, P())
    # Gathered on every device at the end: each process then reads the whole batch.
    return jax.jit(fn, in_shardings=(same, sharding), out_shardings=same)


def map_batches(fn: Callable, params, images: np.ndarray, *, batch_size: int, sharding=None,
                progress=None):
    """`fn(params, batch)` over `images` [N, ...] (see the module docstring); `fn` must be a
    stable function (module level) for the compilation cache to hit; `progress`, if given,
    is advanced by each batch's images."""
    images = np.asarray(images)
    n = len(images)
    if n == 0:
        raise ValueError("no images to run the network on")
    batch = batch_for(n, batch_size, sharding)
    run = _placed(fn, sharding)
    outputs = []
    for start in range(0, n, batch):
        chunk = images[start:start + batch]
        real = len(chunk)
        if real < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - real,) + chunk.shape[1:],
                                                    chunk.dtype)])
        if sharding is not None:  # every process holds the whole batch
            chunk = gdata.global_rows(chunk, sharding)
        out = run(params, chunk)
        outputs.append(jax.tree.map(lambda a, r=real: hosts.host_copy(a)[:r], out))
        if progress is not None:
            progress.update(real)
    if isinstance(outputs[0], tuple):
        return tuple(np.concatenate(parts) for parts in zip(*outputs))
    return np.concatenate(outputs)
