"""gdjax/rng.py: named random streams never share numbers."""

import itertools

import jax
import numpy as np
import pytest

from gdjax import rng


def test_seed_words_carry_the_code_and_the_number_of_indices():
    assert rng.seed_words(42, "epoch_order", 2, 7) == [42, 3, 2, 2, 7]
    assert rng.seed_words(42, "er_buffer", 2) == [42, 5, 1, 2]
    np.testing.assert_array_equal(rng.numpy_rng(42, "epoch_order", 2, 7).permutation(50),
                                  np.random.default_rng([42, 3, 2, 2, 7]).permutation(50))


def test_the_old_collision_is_gone():
    """numpy ignores trailing zeros, and the ER buffer of experience j was seeded [seed, j, 7]
    like epoch 7 of experience j: the same permutation. Named streams differ."""
    np.testing.assert_array_equal(np.random.default_rng([5, 1]).random(3),
                                  np.random.default_rng([5, 1, 0]).random(3))
    buffer = rng.numpy_rng(42, "er_buffer", 1).permutation(100)
    epoch = rng.numpy_rng(42, "epoch_order", 1, 7).permutation(100)
    assert not np.array_equal(buffer, epoch)
    # Trailing zero indices are a different stream position, not the same seed.
    assert not np.array_equal(rng.numpy_rng(5, "solver_flip", 1).random(3),
                              rng.numpy_rng(5, "solver_flip", 1, 0).random(3))


def test_every_stream_and_index_draws_different_numbers():
    draws = {}
    for name, indices in itertools.product(rng.STREAMS, [(), (0,), (0, 0), (1,), (1, 0)]):
        draws[(name, indices)] = tuple(rng.numpy_rng(7, name, *indices).integers(0, 2**62, 2))
    assert len(set(draws.values())) == len(draws)
    assert len(set(rng.STREAMS.values())) == len(rng.STREAMS)


def test_jax_keys_of_the_train_step_and_the_grids_differ():
    """The train step folded its global step into key(seed), and the sample grid of
    experience k used fold_in(key(seed), 10_000 + k): step 10_003 drew the grid's numbers."""
    seed = 42
    old_step = jax.random.fold_in(jax.random.key(seed), 10_003)
    old_grid = jax.random.fold_in(jax.random.key(seed), 10_000 + 3)
    assert (jax.random.key_data(old_step) == jax.random.key_data(old_grid)).all()
    step = jax.random.fold_in(rng.key(seed, "train_step"), 10_003)
    grid = rng.key(seed, "sample_grid", 3)
    assert not (jax.random.key_data(step) == jax.random.key_data(grid)).all()
    keys = {tuple(np.asarray(jax.random.key_data(rng.key(seed, name, *idx))).tolist())
            for name in rng.STREAMS for idx in [(), (0,), (3,)]}
    assert len(keys) == 3 * len(rng.STREAMS)


def test_bad_names_and_indices_are_refused():
    with pytest.raises(ValueError, match="unknown random stream 'epoch'.*gdjax/rng.py"):
        rng.numpy_rng(0, "epoch")
    with pytest.raises(ValueError, match="0..2\\*\\*32 - 1, got -1"):
        rng.numpy_rng(0, "epoch_order", -1)
