"""Named random streams: every random number of a run comes from (seed, stream, indices).

Each consumer asks for its stream by name, with the indices that tell its draws apart
(experience, epoch, step, ...):

    order = rng.numpy_rng(seed, "epoch_order", experience, epoch).permutation(n)
    key = rng.key(seed, "train_step")          # the step folds in its own counter

A numpy stream is seeded with the words [seed, code, len(indices), *indices] and a JAX key
is `key(seed)` folded with the code and then each index. The code is fixed per name and the
number of indices is part of the seed, so two streams never share numbers: numpy's seed
sequences ignore trailing zeros ([s, 1, 2] and [s, 1, 2, 0] draw the same numbers), which is
how the ER buffer of experience j once drew the first images of epoch 7's order. Changing a
code changes every run's numbers; add new names with new codes.
"""

from __future__ import annotations

import numpy as np

# name -> code (never reuse or renumber one).
STREAMS = {
    # the generator
    "unet_init": 1,
    "train_step": 2,        # jax: the train step folds in the global step
    "generator_importance": 28,  # jax (experience): EWC / MAS importance, folded per batch
    "epoch_order": 3,       # numpy (experience, epoch): the order of the training rows
    "batch_flip": 4,        # numpy (experience, step): which rows are flipped
    "er_buffer": 5,         # numpy (experience j): the images experience j keeps
    "er_memory": 6,         # numpy (experience, step): the memory rows of a step
    "er_memory_flip": 7,    # numpy (experience, step)
    "replay_labels": 29,    # numpy (experience, step): conditional replay's balanced labels
    "sample_grid": 8,       # jax (experience): the grid written after each experience
    "eval_samples": 9,      # jax (experience): the evaluation samples
    "kid_classifier": 10,   # numpy (experience): KID subsets on the classifier's features
    "kid_inception": 11,    # numpy (experience): KID subsets on Inception features
    # the solver (REFERENCE §6)
    "solver_init": 12,
    "solver_step": 13,      # jax (experience): folded with the solver step
    "solver_order": 14,     # numpy (experience, epoch)
    "solver_flip": 15,      # numpy (experience, epoch, step)
    "solver_pool": 19,      # jax (experience): solver.replay_pool's samples, folded per chunk
    "solver_pool_order": 20,  # numpy (experience, epoch): the pool rows' order
    "solver_replay_labels": 30,  # numpy (experience, step): a conditional generator's labels
                                 # for the solver's replay (the pool's: step 0)
    "solver_er_buffer": 25,  # numpy (experience j): the images the solver's ER keeps of j
    "solver_er_memory": 26,  # numpy (experience, epoch, step): its memory rows of a step
    "solver_er_flip": 27,   # numpy (experience, epoch, step): which of them are flipped
    # the evaluation classifier (REFERENCE §7)
    "classifier_init": 16,
    "classifier_step": 17,  # jax: folded with the classifier step
    "classifier_order": 18,  # numpy (epoch)
    # the studies (gdjax/studies/)
    "study_samples": 21,    # jax (DDIM steps): an IID-study evaluation's samples
    "study_score": 22,      # numpy (DDIM steps): its KID subsets, if any
    "study_steps": 23,      # jax / numpy (DDIM steps): the sampling-cost step curve
    "study_counts": 24,     # jax (samples) / numpy (samples, repeat): the count curve
}


def _code(stream: str) -> int:
    try:
        return STREAMS[stream]
    except KeyError:
        raise ValueError(f"unknown random stream {stream!r}; add it to gdjax/rng.py STREAMS "
                         f"with a new code") from None


def _check(seed: int, indices: tuple) -> None:
    for value in (seed, *indices):
        if not (isinstance(value, (int, np.integer)) and 0 <= value < 2**32):
            raise ValueError(f"random stream seed and indices must be integers in "
                             f"0..2**32 - 1, got {value!r}")


def seed_words(seed: int, stream: str, *indices: int) -> list[int]:
    """The numpy seed words of `stream` at `indices`: [seed, code, len(indices), *indices]."""
    _check(seed, indices)
    return [int(seed), _code(stream), len(indices), *(int(i) for i in indices)]


def numpy_rng(seed: int, stream: str, *indices: int) -> np.random.Generator:
    """A numpy Generator of `stream` at `indices` for run seed `seed`."""
    return np.random.default_rng(seed_words(seed, stream, *indices))


def key(seed: int, stream: str, *indices: int):
    """A JAX key of `stream` at `indices`: key(seed) folded with the code, then each index."""
    import jax  # lazily: importing gdjax.data must not start a backend

    _check(seed, indices)
    k = jax.random.fold_in(jax.random.key(int(seed)), _code(stream))
    for i in indices:
        k = jax.random.fold_in(k, int(i))
    return k
