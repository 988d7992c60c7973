"""Batched image generation with the compiled DDIM sampler (sample grids and evaluation)."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gdjax import ddim
from gdjax.schedule import Schedule


@functools.partial(jax.jit, static_argnames=("apply_fn", "shape", "num_steps", "eta"))
def _sample_batch(params, schedule: Schedule, rng, *, apply_fn, shape, num_steps, eta):
    k_init, k_eta = jax.random.split(rng)
    x_init = jax.random.normal(k_init, shape)
    x = ddim.reverse_process(lambda x, t: apply_fn(params, x, t), schedule, x_init,
                             num_steps=num_steps, eta=eta, rng=k_eta)
    return ddim.to_unit_interval(x)


def generate(apply_fn: Callable, params, schedule: Schedule, rng: jax.Array, *, num: int,
             image_shape: tuple, num_steps: int, eta: float = 0.0,
             batch_size: int = 500) -> np.ndarray:
    """`num` samples as float32 numpy [num, H, W, C] in [0, 1], made `batch_size` at a time.

    Every batch has the same shape (the last is cut after generation), so the sampler
    compiles once; batch i uses `fold_in(rng, i)`. `apply_fn` must be hashable and stable
    (a module-level function or a cached partial) for the compilation cache to hit.
    """
    if num < 1:
        raise ValueError(f"number of samples must be >= 1, got {num}")
    batch_size = min(batch_size, num)
    shape = (batch_size,) + tuple(image_shape)
    out = []
    for i in range(-(-num // batch_size)):
        out.append(np.asarray(_sample_batch(params, schedule, jax.random.fold_in(rng, i),
                                            apply_fn=apply_fn, shape=shape, num_steps=num_steps,
                                            eta=eta)))
    return np.concatenate(out)[:num]
