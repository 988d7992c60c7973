"""Batched image generation with the compiled DDIM sampler: sample grids and evaluation.

`generate(...)` draws `num` images a batch at a time. Row i of the whole draw starts from
the noise of `fold_in(split(key)[0], i)`, whatever the batch size or the number of devices, so the
samples are the same on one device and on eight (with eta = 0; the noise DDIM adds at
eta > 0 depends on the batch). With a `sharding` the batch axis is split over the mesh's
'data' axis and the generator's params are replicated: every device samples its share.

A class-conditional generator is asked for labels with `SampleLabels`: row i of the draw
gets the (i mod n)-th of its n classes (so any n consecutive rows hold every class once)
and is sampled with classifier-free guidance at its scale (gdjax/guidance.py).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from gdjax import data as gdata
from gdjax import ddim, guidance, hosts
from gdjax.schedule import Schedule


def padded_batch(batch_size: int, sharding) -> int:
    """`batch_size` rounded up to a multiple of the devices `sharding` splits rows over."""
    devices = 1 if sharding is None else sharding.mesh.shape["data"]
    return -(-batch_size // devices) * devices


class SampleLabels(NamedTuple):
    """What a class-conditional generator is asked for: row i of a draw gets label
    classes[i mod len(classes)], guided at `scale` against `null_label` (1: unguided)."""

    classes: tuple[int, ...]
    null_label: int
    scale: float = 1.0

    def of_rows(self, rows) -> np.ndarray:
        """The labels of draw rows `rows` (ints)."""
        return np.asarray(self.classes, np.int32)[np.asarray(rows) % len(self.classes)]


@functools.lru_cache(maxsize=32)
def _sampler(apply_fn: Callable, image_shape: tuple, num_steps: int, eta: float, sharding,
             labels: SampleLabels | None = None):
    def sample(params, schedule: Schedule, key, rows):
        k_rows, k_eta = jax.random.split(key)
        x_init = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(k_rows, i),
                                                      image_shape))(rows)
        if labels is None:
            denoise = lambda x, t: apply_fn(params, x, t)  # noqa: E731
        else:
            classes = jnp.asarray(labels.classes, jnp.int32)
            denoise = guidance.guided_denoise(apply_fn, params, classes[rows % len(classes)],
                                              labels.null_label, labels.scale)
        x = ddim.reverse_process(denoise, schedule, x_init,
                                 num_steps=num_steps, eta=eta, rng=k_eta)
        return ddim.to_unit_interval(x)

    if sharding is None:
        return jax.jit(sample)
    same = NamedSharding(sharding.mesh, P())
    # Gathered on every device at the end: each process then reads the whole batch.
    return jax.jit(sample, in_shardings=(same, same, same, sharding), out_shardings=same)


def generate(apply_fn: Callable, params, schedule: Schedule, key: jax.Array, *, num: int,
             image_shape: tuple, num_steps: int, eta: float = 0.0, batch_size: int = 500,
             sharding: NamedSharding | None = None, first_row: int = 0,
             labels: SampleLabels | None = None) -> np.ndarray:
    """`num` samples as float32 numpy [num, H, W, C] in [0, 1], `batch_size` at a time:
    rows first_row..first_row + num - 1 of the draw of `key` (draws of disjoint row ranges
    start from disjoint noise); `labels`: a class-conditional generator's (row i's label is
    `labels.of_rows(i)`).

    Every batch has the same shape (the last is cut after generation), so the sampler
    compiles once per (batch size, image shape, steps, eta); `apply_fn` must be hashable
    and stable (a module-level function or a cached partial) for that cache to hit.
    """
    if num < 1:
        raise ValueError(f"number of samples must be >= 1, got {num}")
    batch = padded_batch(min(batch_size, num), sharding)
    fn = _sampler(apply_fn, tuple(image_shape), num_steps, float(eta), sharding, labels)
    out = []
    for start in range(0, num, batch):
        rows = np.arange(first_row + start, first_row + start + batch, dtype=np.uint32)
        if sharding is not None:  # every process samples its devices' rows of the batch
            rows = gdata.global_rows(rows, sharding)
        out.append(hosts.host_copy(fn(params, schedule, key, rows)))
    return np.concatenate(out)[:num]
