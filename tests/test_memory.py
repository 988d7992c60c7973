"""gdjax/data/memory.py: experience replay's buffer and the memory rows of each step."""

import numpy as np

from gdjax.data import memory

EXPERIENCES = [(0, 1), (2, 3), (4, 5), (6, 7)]


def _labels():
    return np.repeat(np.arange(8), 30)  # 60 images per experience


def test_quotas_are_balanced_over_past_experiences_only():
    labels = _labels()
    for k, quotas in ((1, [20]), (2, [10, 10]), (3, [7, 7, 6])):
        buffer = memory.buffer_indices(labels, EXPERIENCES, k, size=20, seed=3)
        assert len(set(buffer)) == len(buffer) == 20
        per = [int(np.isin(labels[buffer], e).sum()) for e in EXPERIENCES[:k]]
        assert per == quotas and not np.isin(labels[buffer], EXPERIENCES[k]).any()
    assert len(memory.buffer_indices(labels, EXPERIENCES, 0, size=20, seed=3)) == 0


def test_the_buffer_is_its_named_stream():
    """Experience j keeps the first quota images of the "er_buffer" stream's permutation."""
    labels = _labels()
    buffer = memory.buffer_indices(labels, EXPERIENCES, 2, size=20, seed=3)
    for j in range(2):
        index = np.flatnonzero(np.isin(labels, EXPERIENCES[j]))
        order = np.random.default_rng([3, 5, 1, j]).permutation(len(index))
        np.testing.assert_array_equal(buffer[10 * j:10 * (j + 1)], index[order[:10]])


def test_memory_rows_are_drawn_from_the_buffer_and_flipped_like_real_rows():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (240, 4, 4, 1)).astype(np.float32)
    buffer = memory.buffer_indices(_labels(), EXPERIENCES, 1, size=20, seed=3)
    rows = memory.memory_rows(images, buffer, rows=8, seed=3, experience=1, step=5)
    pick = np.random.default_rng([3, 6, 2, 1, 5]).choice(20, 8, replace=False)
    np.testing.assert_array_equal(rows, images[buffer[pick]])
    flipped = memory.memory_rows(images, buffer, rows=8, seed=3, experience=1, step=5,
                                 flip=True)
    mask = np.random.default_rng([3, 7, 2, 1, 5]).random(8) < 0.5
    assert 0 < mask.sum() < 8
    np.testing.assert_array_equal(flipped[mask], rows[mask][:, :, ::-1])
    np.testing.assert_array_equal(flipped[~mask], rows[~mask])
    # More rows than the buffer holds: drawn with replacement.
    many = memory.memory_rows(images, buffer[:3], rows=8, seed=3, experience=1, step=0)
    assert len(many) == 8 and len({x.tobytes() for x in many}) <= 3
