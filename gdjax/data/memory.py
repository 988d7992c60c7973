"""Experience replay's memory: the buffer of real images kept from earlier experiences.

Like avalanche's experience-balanced buffer (the ReplayPlugin of the reference's ER): while
experience k is learned, each earlier experience j keeps `size // k` of its training images
(the first experiences take the remainder), a fixed random subset drawn from the named
stream "er_buffer" at j. Each step draws its memory rows from the buffer with the stream
"er_memory" at (k, step), with replacement only when the buffer holds fewer images than
rows, and flips them like the real rows when the data set is flipped (CIFAR-10).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gdjax import rng
from gdjax.data import pipeline, splits


def buffer_indices(labels: np.ndarray, experiences: Sequence[Sequence[int]], k: int, *,
                   size: int, seed: int, stream: str = "er_buffer") -> np.ndarray:
    """Training-set indices (int64) in the buffer while experience k (0-based) is learned:
    an equal share of `size` per earlier experience, each a random subset (the named
    random `stream` at that experience; the solver's ER draws its own)."""
    if k == 0:
        return np.zeros((0,), np.int64)
    quotas = [size // k + (1 if j < size % k else 0) for j in range(k)]
    parts = []
    for j, quota in enumerate(quotas):
        index = splits.experience_indices(labels, experiences[j])
        order = rng.numpy_rng(seed, stream, j).permutation(len(index))
        parts.append(index[order[:quota]])
    return np.concatenate(parts)


def memory_rows(images: np.ndarray, buffer: np.ndarray, *, rows: int, seed: int,
                experience: int, step: int, flip: bool = False) -> np.ndarray:
    """The `rows` memory images (float32 NHWC) of `step` of `experience`."""
    generator = rng.numpy_rng(seed, "er_memory", experience, step)
    pick = generator.choice(len(buffer), rows, replace=len(buffer) < rows)
    out = images[buffer[pick]]
    if flip:
        out = pipeline.flip_rows(out, pipeline.flip_mask(step, batch_size=rows, seed=seed,
                                                         experience=experience,
                                                         stream="er_memory_flip"))
    return out
