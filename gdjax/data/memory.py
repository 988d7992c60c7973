"""Experience replay's memory: the buffer of real images kept from earlier experiences.

Like avalanche's experience-balanced buffer (the ReplayPlugin of the reference's ER): while
experience k is learned, each earlier experience j keeps `size // k` of its training images
(the first experiences take the remainder), a fixed random subset drawn from the named
stream "er_buffer" at j. Each step draws its memory rows from the buffer with the stream
"er_memory" at (k, step), with replacement only when the buffer holds fewer images than
rows, and flips them like the real rows when the data set is flipped (CIFAR-10).

Conditional replay's labels (`replay_labels`) are made here too: the classes the teacher
has learned, balanced, one draw per step from the named stream "replay_labels".
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


def _memory_pick(buffer: np.ndarray, *, rows: int, seed: int, experience: int,
                 step: int) -> np.ndarray:
    generator = rng.numpy_rng(seed, "er_memory", experience, step)
    return buffer[generator.choice(len(buffer), rows, replace=len(buffer) < rows)]


def memory_rows(images: np.ndarray, buffer: np.ndarray, *, rows: int, seed: int,
                experience: int, step: int, flip: bool = False) -> np.ndarray:
    """The `rows` memory images (float32 NHWC) of `step` of `experience`."""
    out = images[_memory_pick(buffer, rows=rows, seed=seed, experience=experience, step=step)]
    if flip:
        out = pipeline.flip_rows(out, pipeline.flip_mask(step, batch_size=rows, seed=seed,
                                                         experience=experience,
                                                         stream="er_memory_flip"))
    return out


def memory_labels(labels: np.ndarray, buffer: np.ndarray, *, rows: int, seed: int,
                  experience: int, step: int) -> np.ndarray:
    """The int32 labels of `memory_rows`' images (same arguments, same draw)."""
    pick = _memory_pick(buffer, rows=rows, seed=seed, experience=experience, step=step)
    return labels[pick].astype(np.int32)


def replay_labels(classes: Sequence[int], *, rows: int, seed: int, experience: int,
                  step: int, stream: str = "replay_labels") -> np.ndarray:
    """Conditional replay's labels of `step` of `experience`: int32 [rows], balanced over
    `classes` (the teacher's; every class `rows // len(classes)` times, the remainder one
    more time each for distinct classes drawn at random), in a random order; the named
    `stream` ("replay_labels": the generator's; the solver's replay has its own) at
    (experience, step)."""
    classes = np.asarray(classes, np.int32)
    if classes.size == 0:
        raise ValueError("conditional replay needs the classes of at least one experience")
    generator = rng.numpy_rng(seed, stream, experience, step)
    labels = np.resize(generator.permutation(classes), rows)
    return generator.permutation(labels).astype(np.int32)
