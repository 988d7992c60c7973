"""The real Fashion-MNIST of Debian's dataset-fashion-mnist package, read where it lies.

CI installs the package (.ci/run); elsewhere these tests skip with the line that installs it,
except under CI=true, where a missing package is a failure.
"""

import os

import numpy as np
import pytest

from gdjax.data import sources

INSTALL = "apt-get update && apt-get install dataset-fashion-mnist"
SYSTEM_DIR = sources.SYSTEM_DIRS["fashion_mnist"]
# The data set's published statistics (Xiao et al. 2017, and every normalisation recipe):
# training pixel mean 0.2860 and std 0.3530 of [0, 1] values.
TRAIN_MEAN, TRAIN_STD = 0.2860, 0.3530


def require_fashion_mnist() -> str:
    try:
        return sources.find_idx_directory("fashion_mnist", None)
    except FileNotFoundError as e:
        message = f"Fashion-MNIST is not installed in {SYSTEM_DIR} ({INSTALL}): {e}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def fmnist():
    require_fashion_mnist()
    return {split: sources.read_idx("fashion_mnist", None, split) for split in sources.SPLITS}


def test_counts_classes_and_value_range(fmnist):
    for split, n in (("train", 60_000), ("test", 10_000)):
        images, labels = fmnist[split]
        assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int32
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), [n // 10] * 10)
        assert (images.min(), images.max()) == (0, 255)
    pixels = fmnist["train"][0] / 255.0
    assert abs(pixels.mean() - TRAIN_MEAN) < 1e-4 and abs(pixels.std() - TRAIN_STD) < 1e-4


def test_found_without_a_data_dir_and_behind_an_empty_one(tmp_path):
    found = require_fashion_mnist()
    assert found == SYSTEM_DIR
    assert sources.find_idx_directory("fashion_mnist", str(tmp_path)) == SYSTEM_DIR


def test_a_split_fmnist_run_holds_the_classes_of_its_seeds_order(tmp_path):
    """configs/split_fmnist.py with the default data_dir (absent here) reads the system
    copy; each experience holds exactly the two classes avalanche's order gives, 6000
    training images each, scaled to [-1, 1] at 32x32; the paper's schedule is 94 steps
    (the last of 96 rows) x 100 epochs per experience."""
    require_fashion_mnist()
    from configs import split_fmnist
    from gdjax import data as gdata
    from gdjax.run import build

    orders = {42: (2, 6, 1, 8, 4, 5, 0, 9, 3, 7), 1714: (7, 3, 8, 0, 1, 4, 6, 2, 9, 5)}
    config = split_fmnist.get_config("naive")
    config.data.data_dir = str(tmp_path / "absent")
    config.seed = 42
    run = build(config, str(tmp_path / "run"))
    assert run.train.images.shape == (60_000, 32, 32, 1)
    assert -1.0 <= run.train.images.min() < -0.99 and 0.99 < run.train.images.max() <= 1.0
    assert run.experiences == gdata.make_experiences(orders[42], 5)
    for seed, order in orders.items():
        run.experiences = gdata.make_experiences(gdata.resolve_class_order(10, seed=seed), 5)
        for k in range(5):
            part = run.experience_data(k)
            assert sorted(set(part.labels.tolist())) == sorted(order[2 * k:2 * k + 2])
            assert len(part) == 12_000
            assert run.num_steps(k) == 94 * 100
