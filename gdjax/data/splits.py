"""Class-incremental splits: the class order, the experiences, and their indices.

A benchmark such as Split Fashion-MNIST cuts the classes of a data set into a sequence of
experiences (5 experiences of 2 classes). The class order is the one avalanche's
`nc_benchmark(..., seed=seed, shuffle=True, fixed_class_order=None)` draws, which the paper's
code uses: `torch.random.manual_seed(seed)` followed by `torch.randperm(num_classes)` on the
CPU. `torch_randperm` reimplements that draw with numpy (torch's MT19937 and its
Fisher-Yates loop), so gdjax needs no torch at run time; the tests check it against torch.

Typical use:

    order = resolve_class_order(10, seed=42)             # (2, 6, 1, 8, 4, 5, 0, 9, 3, 7)
    experiences = make_experiences(order, 5)             # [(2, 6), (1, 8), ...]
    idx = experience_indices(labels, experiences[e])     # data of experience e
    idx = seen_indices(labels, experiences, e)           # data of experiences 0..e
"""

from collections.abc import Sequence

import numpy as np

_MT_N = 624  # words of MT19937 state
# torch keeps its old modulo-based loop for every n below this bound (TensorFactories.cpp).
_SMALL_N_LIMIT = (2**32 - 1) // 20


def _mt19937_key(seed: int) -> np.ndarray:
    """The MT19937 state torch's `manual_seed` sets: the reference init_genrand recurrence.

    torch seeds its CPU engine with the seed's low 32 bits (`at::mt19937(seed)`).
    """
    key = np.empty(_MT_N, dtype=np.uint64)
    key[0] = seed & 0xFFFFFFFF
    for i in range(1, _MT_N):
        prev = int(key[i - 1])
        key[i] = (1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF
    return key.astype(np.uint32)


def _mt19937_words(seed: int, count: int) -> np.ndarray:
    """The first `count` 32-bit outputs of MT19937 seeded as torch seeds it."""
    bitgen = np.random.MT19937()
    # pos=624 makes numpy twist before the first output, exactly as a freshly seeded engine.
    bitgen.state = {"bit_generator": "MT19937",
                    "state": {"key": _mt19937_key(seed), "pos": _MT_N}}
    return bitgen.random_raw(count).astype(np.uint64)


def torch_randperm(n: int, seed: int) -> np.ndarray:
    """What `torch.manual_seed(seed); torch.randperm(n)` returns on the CPU, as int64 [n].

    torch fills 0..n-1 and, for i in 0..n-2, swaps entry i with entry i + (u32 % (n - i)),
    each u32 a fresh MT19937 output.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if not 0 < n < _SMALL_N_LIMIT:
        raise ValueError(f"n must be in [1, {_SMALL_N_LIMIT}), got {n}")
    perm = np.arange(n, dtype=np.int64)
    words = _mt19937_words(seed, max(n - 1, 0))
    for i in range(n - 1):
        j = i + int(words[i] % (n - i))
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def nc_class_order(num_classes: int, seed: int) -> tuple[int, ...]:
    """The class order avalanche's `nc_benchmark` draws from `seed` for classes 0..num_classes-1.

    avalanche permutes the sorted class ids with `torch.randperm` after `manual_seed(seed)`.
    """
    return tuple(int(c) for c in torch_randperm(num_classes, seed))


def validate_class_order(order: Sequence[int], num_classes: int) -> tuple[int, ...]:
    """Returns `order` as a tuple of ints if it is a permutation of 0..num_classes-1.

    Raises ValueError naming what is wrong (duplicates, missing or unknown classes).
    """
    order = tuple(int(c) for c in order)
    expected = set(range(num_classes))
    duplicates = sorted({c for c in order if order.count(c) > 1})
    unknown = sorted(set(order) - expected)
    missing = sorted(expected - set(order))
    problems = []
    if duplicates:
        problems.append(f"repeated classes {duplicates}")
    if unknown:
        problems.append(f"classes {unknown} not in the data set")
    if missing:
        problems.append(f"missing classes {missing}")
    if problems:
        raise ValueError(
            f"class order {list(order)} must be a permutation of the data set's "
            f"{num_classes} classes 0..{num_classes - 1}: " + "; ".join(problems))
    return order


def resolve_class_order(num_classes: int, *, seed: int,
                        fixed_order: Sequence[int] | None = None) -> tuple[int, ...]:
    """The user's `fixed_order` (validated) if given, else `nc_class_order(num_classes, seed)`."""
    if fixed_order is not None:
        return validate_class_order(fixed_order, num_classes)
    return nc_class_order(num_classes, seed)


def make_experiences(class_order: Sequence[int], n_experiences: int) -> list[tuple[int, ...]]:
    """Cuts `class_order` into `n_experiences` consecutive, equally sized tuples of classes."""
    n = len(class_order)
    if n_experiences < 1 or n % n_experiences:
        raise ValueError(
            f"{n} classes cannot be split evenly into {n_experiences} experiences; "
            f"choose a divisor of {n}")
    per = n // n_experiences
    return [tuple(int(c) for c in class_order[i * per:(i + 1) * per])
            for i in range(n_experiences)]


def experience_indices(labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Indices (int64, ascending) of the examples whose label is one of `classes`."""
    return np.flatnonzero(np.isin(labels, np.asarray(classes)))


def seen_classes(experiences: Sequence[Sequence[int]], k: int) -> tuple[int, ...]:
    """The classes of experiences 0..k, in experience order."""
    if not 0 <= k < len(experiences):
        raise ValueError(f"experience {k} out of range [0, {len(experiences)})")
    return tuple(c for exp in experiences[:k + 1] for c in exp)


def seen_indices(labels: np.ndarray, experiences: Sequence[Sequence[int]],
                 k: int) -> np.ndarray:
    """Indices of the examples of experiences 0..k (cumulative training, seen test data)."""
    return experience_indices(labels, seen_classes(experiences, k))
