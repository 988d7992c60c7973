"""Tests of gdjax.data: sources read back what the tests write, avalanche's class order,
the resize against independent references, and deterministic, resumable, sharded batches."""

import gzip
import io
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import textwrap
import threading
import time

import numpy as np
import pytest

from gdjax.data import pipeline, sources, splits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- writers

def _idx_bytes(array: np.ndarray) -> bytes:
    header = (0x0800 | array.ndim).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx(folder, split, images, labels, *, compress=True):
    os.makedirs(folder, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        path = os.path.join(folder, f"{prefix}-{kind}-ubyte" + (".gz" if compress else ""))
        with (gzip.open if compress else open)(path, "wb") as f:
            f.write(_idx_bytes(array))


def _write_idx_set(folder, images, labels, *, compress=True, test=None):
    """All four IDX files: `images`/`labels` as the train split, `test` (default: the same)
    as the test split."""
    _write_idx(folder, "train", images, labels, compress=compress)
    _write_idx(folder, "test", *(test or (images, labels)), compress=compress)


def _cifar_batch(images: np.ndarray, labels: np.ndarray) -> bytes:
    data = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    blob = pickle.dumps({b"batch_label": b"x", b"labels": [int(l) for l in labels],
                         b"data": data, b"filenames": [b"f"] * len(labels)}, protocol=2)
    # The published batches were pickled by numpy 1, which named numpy.core.
    return blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def _cifar_parts(rng):
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {n: (rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8),
                rng.integers(0, 10, 3).astype(np.int32)) for n in names}


def _write_cifar_tar(path, parts):
    with tarfile.open(path, "w:gz") as tar:
        for name, (images, labels) in parts.items():
            blob = _cifar_batch(images, labels)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


# ----------------------------------------------------------------------------- IDX

def test_idx_gz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    want = {s: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                rng.integers(0, 10, n, dtype=np.uint8)) for s, n in (("train", 5), ("test", 3))}
    _write_idx_set(str(tmp_path / "fashion_mnist"), *want["train"], test=want["test"])
    for split, (images, labels) in want.items():
        got_images, got_labels = sources.read_idx("fashion_mnist", str(tmp_path), split)
        np.testing.assert_array_equal(got_images, images[..., None])
        np.testing.assert_array_equal(got_labels, labels)
        assert got_images.dtype == np.uint8 and got_labels.dtype == np.int32


def test_idx_uncompressed_in_data_dir(tmp_path):
    images = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)
    _write_idx_set(str(tmp_path), images[::-1], np.array([3, 4]), compress=False,
                   test=(images, np.array([7, 1])))
    got_images, got_labels = sources.read_idx("mnist", str(tmp_path), "test")
    np.testing.assert_array_equal(got_images[..., 0], images)
    np.testing.assert_array_equal(got_labels, [7, 1])


def test_idx_missing_files_name_every_place_and_the_fix(tmp_path, no_system_data):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz") as e:
        sources.read_idx("fashion_mnist", missing, "train")
    message = str(e.value)
    for place in (os.path.join(missing, "fashion_mnist"), missing,
                  sources.SYSTEM_DIRS["fashion_mnist"]):
        assert place in message, message
    assert "apt-get update && apt-get install dataset-fashion-mnist" in message
    assert "github.com/zalandoresearch/fashion-mnist" in message
    with pytest.raises(FileNotFoundError) as e:  # MNIST has no system package
        sources.read_idx("mnist", missing, "train")
    assert "apt-get" not in str(e.value) and "ossci-datasets" in str(e.value)


def test_idx_falls_back_to_the_system_location_last(tmp_path, monkeypatch):
    system = str(tmp_path / "usr_share")
    monkeypatch.setattr(sources, "SYSTEM_DIRS", {"fashion_mnist": system})
    images = np.full((2, 3, 3), 9, np.uint8)
    _write_idx_set(system, images, np.array([1, 2]))
    got, labels = sources.read_idx("fashion_mnist", str(tmp_path / "empty"), "train")
    np.testing.assert_array_equal(got[..., 0], images)
    got, _ = sources.read_idx("fashion_mnist", None, "test")  # no data_dir at all
    np.testing.assert_array_equal(got[..., 0], images)
    mine = np.full((2, 3, 3), 200, np.uint8)  # data_dir's own copy comes first
    _write_idx_set(str(tmp_path / "data"), mine, np.array([0, 0]))
    got, _ = sources.read_idx("fashion_mnist", str(tmp_path / "data"), "train")
    np.testing.assert_array_equal(got[..., 0], mine)
    assert sources.find_idx_directory("fashion_mnist", str(tmp_path / "data")) == str(
        tmp_path / "data")


def test_idx_part_of_the_set_is_named_not_mixed_with_another_copy(tmp_path, monkeypatch):
    system = str(tmp_path / "usr_share")
    monkeypatch.setattr(sources, "SYSTEM_DIRS", {"fashion_mnist": system})
    _write_idx_set(system, np.zeros((2, 3, 3), np.uint8), np.array([1, 2]))
    part = tmp_path / "data" / "fashion_mnist"
    _write_idx(str(part), "train", np.ones((2, 3, 3), np.uint8), np.array([1, 2]))
    with pytest.raises(FileNotFoundError) as e:
        sources.read_idx("fashion_mnist", str(tmp_path / "data"), "train")
    message = str(e.value)
    assert f"{part} holds part of the fashion_mnist IDX files" in message
    assert "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz missing" in message
    assert "apt-get install dataset-fashion-mnist" in message


def _corrupt_idx_files(folder):
    """Yields the broken file's path after writing each kind of damage over a good set."""
    images, labels = np.zeros((3, 4, 4), np.uint8), np.zeros(3, np.uint8)
    img_path = os.path.join(folder, "train-images-idx3-ubyte.gz")
    lbl_path = os.path.join(folder, "train-labels-idx1-ubyte.gz")
    good_images = gzip.compress(_idx_bytes(images))
    cases = [
        (img_path, good_images[: len(good_images) // 2]),                   # truncated gzip
        (img_path, gzip.compress(b"\x00\x00\x08\x01" + _idx_bytes(images)[4:])),  # magic
        (img_path, gzip.compress(_idx_bytes(images)[:-5])),                 # short body
        (lbl_path, gzip.compress(_idx_bytes(np.zeros(4, np.uint8)))),      # 3 images, 4 labels
    ]
    for path, blob in cases:
        _write_idx_set(folder, images, labels)
        with open(path, "wb") as f:
            f.write(blob)
        yield path


def test_idx_corrupt_files_raise_value_error_naming_the_file_and_the_fix(tmp_path):
    redownload = "delete it and download it again from https://ossci-datasets"
    expected = [("corrupt or truncated gzip", redownload),
                ("wrong IDX magic number 0x00000801", redownload),
                ("IDX header says shape (3, 4, 4) (48 bytes) but the file holds 43", redownload),
                ("holds 3 images but", "delete both and download them again from https://oss")]
    for path, (problem, fix) in zip(_corrupt_idx_files(str(tmp_path)), expected, strict=True):
        with pytest.raises(ValueError) as e:
            sources.read_idx("mnist", str(tmp_path), "train")
        message = str(e.value)
        assert os.path.basename(path) in message and problem in message, message
        assert fix in message, message


def test_a_corrupt_idx_file_stops_a_run_before_any_compilation(tmp_path, caplog):
    import jax

    from configs import split_fmnist
    from gdjax import continual

    images, labels = np.zeros((3, 28, 28), np.uint8), np.zeros(3, np.uint8)
    _write_idx_set(str(tmp_path / "fashion_mnist"), images, labels)
    path = tmp_path / "fashion_mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])  # a torn download
    config = split_fmnist.get_config("naive")
    config.data.data_dir = str(tmp_path)
    start = time.perf_counter()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        with pytest.raises(ValueError) as e:
            continual.train(config, str(tmp_path / "run"))
    assert time.perf_counter() - start < 3
    compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert not compiled, compiled
    assert str(e.value).startswith(f"{path}: corrupt or truncated gzip file")
    assert "delete it and download it again from https://github.com/zalandoresearch/" \
        "fashion-mnist" in str(e.value)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- CIFAR-10

def test_cifar_tarball_and_folder_round_trip(tmp_path):
    parts = _cifar_parts(np.random.default_rng(1))
    _write_cifar_tar(str(tmp_path / "cifar-10-python.tar.gz"), parts)
    train_images, train_labels = sources.read_cifar10(str(tmp_path), "train")
    want = [parts[f"data_batch_{i}"] for i in range(1, 6)]
    np.testing.assert_array_equal(train_images, np.concatenate([w[0] for w in want]))
    np.testing.assert_array_equal(train_labels, np.concatenate([w[1] for w in want]))
    # The extracted folder reads the same.
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz") as tar:
        tar.extractall(tmp_path / "x", filter="data")
    test_images, test_labels = sources.read_cifar10(str(tmp_path / "x"), "test")
    np.testing.assert_array_equal(test_images, parts["test_batch"][0])
    np.testing.assert_array_equal(test_labels, parts["test_batch"][1])


def test_cifar_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz") as e:
        sources.read_cifar10(str(tmp_path), "train")
    assert str(tmp_path) in str(e.value)
    tarball = tmp_path / "cifar-10-python.tar.gz"
    _write_cifar_tar(str(tarball), _cifar_parts(np.random.default_rng(2)))
    tarball.write_bytes(tarball.read_bytes()[:300])  # truncated
    with pytest.raises(ValueError, match="cifar-10-python.tar.gz: corrupt or truncated") as e:
        sources.read_cifar10(str(tmp_path), "train")
    assert "delete it and download it again from https://www.cs.toronto.edu/~kriz/" \
        "cifar-10-python.tar.gz" in str(e.value)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps(threading.Lock))  # not a batch
    with pytest.raises(ValueError, match="test_batch: not a valid CIFAR-10 python batch") as e:
        sources.read_cifar10(str(tmp_path), "test")
    assert f"delete {folder} and extract it again from cifar-10-python.tar.gz" in str(e.value)
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        sources.read_cifar10(str(tmp_path), "train")


# ----------------------------------------------------------------------------- TFDS

def test_tfds_data_source_through_mock(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        images, labels = sources.read_tfds("fashion_mnist", str(tmp_path), "train")
        want = tfds.data_source("fashion_mnist", split="train")
        np.testing.assert_array_equal(images, np.stack([want[i]["image"] for i in range(6)]))
        np.testing.assert_array_equal(labels, [want[i]["label"] for i in range(6)])
        train, test = pipeline.load_dataset("mnist", source="tfds", image_size=32, channels=1)
    assert images.shape == (6, 28, 28, 1) and images.dtype == np.uint8
    assert labels.dtype == np.int32 and set(labels) <= set(range(10))
    assert train.images.shape == (6, 32, 32, 1) and len(test) == 6


def test_tfds_unprepared_and_prepare_without_tensorflow(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError, match="prepare") as e:
        sources.read_tfds("fashion_mnist", str(tmp_path), "train")
    assert str(tmp_path) in str(e.value)
    if "tensorflow" not in sys.modules:
        import importlib.util
        if importlib.util.find_spec("tensorflow") is None:
            with pytest.raises(ImportError, match="TensorFlow"):
                sources.read_tfds("mnist", str(tmp_path), "train", prepare=True)


# ----------------------------------------------------------------------------- folder

def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    pictures = {}
    for cls in ("dog", "cat"):
        for i in range(2):
            pixels = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
            os.makedirs(tmp_path / "train" / cls, exist_ok=True)
            Image.fromarray(pixels).save(tmp_path / "train" / cls / f"{i}.png")
            pictures[(cls, i)] = pixels
    images, labels = sources.read_image_folder(str(tmp_path), "train", channels=3)
    np.testing.assert_array_equal(labels, [0, 0, 1, 1])  # cat < dog
    np.testing.assert_array_equal(images[3], pictures[("dog", 1)])
    grey, _ = sources.read_image_folder(str(tmp_path), "train", channels=1)
    want = np.asarray(Image.fromarray(pictures[("cat", 0)]).convert("L"))
    np.testing.assert_array_equal(grey[0, ..., 0], want)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "test")):
        sources.read_image_folder(str(tmp_path), "test", channels=3)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "train" / "dog" / "9.png")
    with pytest.raises(ValueError, match="9.png: size 4x4 differs from 7x5.*resize it or remove"):
        sources.read_image_folder(str(tmp_path), "train", channels=3)
    png = (tmp_path / "train" / "dog" / "0.png").read_bytes()
    (tmp_path / "train" / "dog" / "9.png").write_bytes(png[:len(png) // 2])  # truncated
    with pytest.raises(ValueError) as e:
        sources.read_image_folder(str(tmp_path), "train", channels=3)
    assert str(e.value).startswith(f"{tmp_path / 'train' / 'dog' / '9.png'}: unreadable image")
    assert "remove it, or replace it by a readable image" in str(e.value)


def test_unknown_source_and_dataset():
    with pytest.raises(ValueError, match="sklearn, raw, tfds, folder"):
        sources.read_source("mnist", source="torchvision", split="train", data_dir="/x")
    with pytest.raises(ValueError, match="cifar10"):
        sources.read_source("svhn", source="raw", split="train", data_dir="/x")


# ----------------------------------------------------------------------------- digits

def test_digits_split_is_stratified_and_fixed():
    from sklearn.datasets import load_digits

    labels = load_digits().target
    train, test = sources.digits_split_indices()
    assert len(train) + len(test) == 1797 and not set(train) & set(test)
    for c in range(10):
        assert (labels[test] == c).sum() == round(0.2 * (labels == c).sum())
    # Independent of any run seed: pinned.
    assert test[:6].tolist() == [10, 27, 29, 30, 31, 38] and int(test.sum()) == 322611


def test_load_digits_shape_and_range():
    train, test = pipeline.load_dataset("digits", image_size=16, channels=1)
    assert train.images.shape == (1438, 16, 16, 1) and test.images.shape == (359, 16, 16, 1)
    assert train.images.dtype == np.float32 and train.labels.dtype == np.int32
    assert train.images.min() == -1.0 and train.images.max() == 1.0
    assert train.classes == tuple(range(10))
    raw, _ = sources.read_digits("test")
    assert raw.shape == (359, 8, 8, 1) and raw.max() == 255


# ----------------------------------------------------------------------------- resize

def _bilinear_reference(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """float64 half-pixel bilinear upsampling of one [H, W] image, clamped at the borders."""
    in_h, in_w = image.shape
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            y = min(max((i + 0.5) * in_h / out_h - 0.5, 0), in_h - 1)
            x = min(max((j + 0.5) * in_w / out_w - 0.5, 0), in_w - 1)
            y0, x0 = int(np.floor(y)), int(np.floor(x))
            y1, x1 = min(y0 + 1, in_h - 1), min(x0 + 1, in_w - 1)
            fy, fx = y - y0, x - x0
            out[i, j] = ((1 - fy) * ((1 - fx) * image[y0, x0] + fx * image[y0, x1])
                         + fy * ((1 - fx) * image[y1, x0] + fx * image[y1, x1]))
    return out


def test_resize_up_matches_float64_bilinear():
    image = np.array([[0.0, 10.0, 30.0], [40.0, 80.0, 20.0]])
    got = pipeline.resize_bilinear(image[None, :, :, None], (5, 7))[0, ..., 0]
    np.testing.assert_allclose(got, _bilinear_reference(image, 5, 7), atol=1e-5)
    # By hand: the first output column of 3 -> 7 sits at input x = 0.5*3/7 - 0.5 < 0.
    assert got[0, 0] == 0.0


def test_resize_down_is_antialiased_like_pil():
    from PIL import Image

    image = np.random.default_rng(4).uniform(0, 255, (9, 12)).astype(np.float32)
    want = np.asarray(Image.fromarray(image, mode="F").resize((5, 4), Image.BILINEAR))
    got = pipeline.resize_bilinear(image[None, :, :, None], (4, 5))[0, ..., 0]
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_resize_matches_torch_antialias():
    torch = pytest.importorskip("torch")
    images = np.random.default_rng(5).uniform(0, 255, (2, 28, 28, 3)).astype(np.float32)
    for size in (32, 16, 9):
        want = torch.nn.functional.interpolate(
            torch.from_numpy(images).permute(0, 3, 1, 2), size=(size, size), mode="bilinear",
            align_corners=False, antialias=True).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(pipeline.resize_bilinear(images, size), want, atol=2e-3)


# ----------------------------------------------------------------------------- splits

# avalanche: torch.random.manual_seed(seed); torch.randperm(10) (computed with torch 2.13).
AVALANCHE_ORDERS = {
    42: (2, 6, 1, 8, 4, 5, 0, 9, 3, 7),
    69: (0, 2, 3, 5, 4, 1, 6, 9, 8, 7),
    1714: (7, 3, 8, 0, 1, 4, 6, 2, 9, 5),
}


@pytest.mark.parametrize("seed", sorted(AVALANCHE_ORDERS))
def test_nc_class_order_pinned(seed):
    assert splits.nc_class_order(10, seed) == AVALANCHE_ORDERS[seed]


def test_torch_randperm_matches_torch():
    torch = pytest.importorskip("torch")
    for seed in (0, 1, 7, 123, 2024, 2**31 + 11, 2**32 + 5):
        for n in (1, 2, 10, 37):
            torch.manual_seed(seed)
            np.testing.assert_array_equal(splits.torch_randperm(n, seed), torch.randperm(n))


def test_class_order_validation_and_experiences():
    assert splits.resolve_class_order(4, seed=0, fixed_order=[3, 1, 0, 2]) == (3, 1, 0, 2)
    for bad, message in (([0, 1, 1, 2], "repeated"), ([0, 1, 2, 7], "not in the data set"),
                         ([0, 1, 2], "missing classes \\[3\\]")):
        with pytest.raises(ValueError, match=message):
            splits.resolve_class_order(4, seed=0, fixed_order=bad)
    experiences = splits.make_experiences(AVALANCHE_ORDERS[42], 5)
    assert experiences == [(2, 6), (1, 8), (4, 5), (0, 9), (3, 7)]
    with pytest.raises(ValueError, match="evenly"):
        splits.make_experiences(range(10), 3)
    labels = np.array([2, 1, 6, 8, 0, 2])
    np.testing.assert_array_equal(splits.experience_indices(labels, experiences[0]), [0, 2, 5])
    np.testing.assert_array_equal(splits.seen_indices(labels, experiences, 1), [0, 1, 2, 3, 5])
    assert splits.seen_classes(experiences, 2) == (2, 6, 1, 8, 4, 5)


# ----------------------------------------------------------------------------- batching

def _toy(n=23):
    images = np.arange(n * 2 * 3, dtype=np.float32).reshape(n, 1, 2, 3)
    return images, np.arange(n, dtype=np.int32)


def test_batches_are_deterministic_and_resumable():
    images, labels = _toy()
    kwargs = dict(batch_size=5, seed=3, experience=2, flip=True)
    with pipeline.batch_iterator(images, labels, num_steps=13, **kwargs) as it:
        full = list(it)
    assert len(full) == 13
    for start in (0, 4, 10):  # 5 batches per epoch: resume mid-epoch and on a boundary
        with pipeline.batch_iterator(images, labels, start_step=start, num_steps=13,
                                     **kwargs) as it:
            resumed = list(it)
        assert len(resumed) == 13 - start
        for a, b in zip(full[start:], resumed):
            for key in ("image", "label", "mask"):
                np.testing.assert_array_equal(a[key], b[key])


def test_an_epoch_keeps_its_last_partial_batch_padded_and_masked():
    """23 examples at batch 5: 4 full batches and one of 3 real rows (the reference's
    drop_last=False), padded with 2 zero rows whose mask is 0; drop_last drops the 3."""
    images, labels = _toy()
    assert pipeline.steps_per_epoch(23, 5) == 5
    assert pipeline.steps_per_epoch(23, 5, drop_last=True) == 4
    assert pipeline.steps_per_epoch(12000, 128) == 94  # Split Fashion-MNIST, an experience
    kwargs = dict(batch_size=5, seed=3, experience=2)
    batches = [pipeline.host_batch(images, labels, s, **kwargs) for s in range(6)]
    for b in batches:
        assert b["image"].shape == (5, 1, 2, 3) and b["mask"].dtype == np.float32
    np.testing.assert_array_equal([b["mask"].sum() for b in batches], [5, 5, 5, 5, 3, 5])
    np.testing.assert_array_equal(batches[4]["mask"], [1, 1, 1, 0, 0])
    assert not batches[4]["image"][3:].any() and not batches[4]["label"][3:].any()
    real = np.concatenate([b["label"][b["mask"] > 0] for b in batches[:5]])
    assert sorted(real) == list(range(23))  # one epoch: every example exactly once
    order = np.random.default_rng([3, 3, 2, 2, 0]).permutation(23)  # "epoch_order", (2, 0)
    np.testing.assert_array_equal(real, order)
    np.testing.assert_array_equal(batches[4]["image"][:3], images[order[20:]])
    dropped = [pipeline.host_batch(images, labels, s, drop_last=True, **kwargs)
               for s in range(4)]
    assert all(b["mask"].all() for b in dropped)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in dropped]), order[:20])


def test_flip_is_a_left_right_mirror():
    images, labels = _toy()
    batch = pipeline.host_batch(images, labels, 7, batch_size=8, seed=1, experience=0, flip=True)
    mask = pipeline.flip_mask(7, batch_size=8, seed=1, experience=0)
    # The "batch_flip" stream (code 4) at (experience 0, step 7).
    np.testing.assert_array_equal(mask, np.random.default_rng([1, 4, 2, 0, 7]).random(8) < 0.5)
    assert 0 < mask.sum() < 8
    np.testing.assert_array_equal(batch["image"][mask], images[batch["label"]][mask][:, :, ::-1])
    np.testing.assert_array_equal(batch["image"][~mask], images[batch["label"]][~mask])
    other = pipeline.host_batch(images, labels, 7, batch_size=8, seed=2, experience=0)
    assert not np.array_equal(other["label"], batch["label"])


def test_batch_size_errors():
    images, labels = _toy(4)
    with pytest.raises(ValueError, match="batch size 5"):
        pipeline.batch_iterator(images, labels, batch_size=5, seed=0, experience=0,
                                drop_last=True)
    with pytest.raises(ValueError, match="batch size 5"):
        pipeline.batch_iterator(images[:0], labels[:0], batch_size=5, seed=0, experience=0)
    assert pipeline.steps_per_epoch(4, 5) == 1  # one short batch, as torch's loaders give
    with pytest.raises(ValueError, match="multiple of 8, e.g. 24 or 32"):
        pipeline.check_batch_size(30, 8)
    with pytest.raises(ValueError, match="e.g. 8$"):
        pipeline.check_batch_size(3, 8)


def test_prefetcher_surfaces_errors_and_closes():
    def failing():
        yield 1
        raise RuntimeError("boom in the producer")

    it = pipeline.Prefetcher(failing())
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="boom"):
        next(it)
    endless = pipeline.Prefetcher(iter(int, 1), size=2)  # an infinite producer
    assert next(endless) == 0
    endless.close()
    assert not endless._thread.is_alive()
    with pytest.raises(StopIteration):
        next(endless)


def test_prefetcher_runs_ahead_by_its_depth_and_no_further():
    depth, n = 3, 9
    produced, consumed, filled, overran = [], [], threading.Event(), threading.Event()

    def producer():
        for i in range(n):
            produced.append(i)
            if i == depth:  # `depth` items queued and one more waiting for room
                filled.set()
            if i == depth + 1 and not consumed:
                overran.set()
            yield i

    with pipeline.Prefetcher(producer(), size=depth) as it:
        # Nothing consumed yet: the thread has filled the queue on its own, then stopped.
        assert filled.wait(timeout=10), f"produced only {produced} ahead of the consumer"
        assert not overran.wait(timeout=0.3), f"produced {produced}, more than the depth"
        assert produced == list(range(depth + 1))
        for item in it:
            consumed.append(item)
            # At most `depth` items queued plus one in the producer's hands.
            assert len(produced) <= len(consumed) + depth + 1, (produced, consumed)
    assert consumed == list(range(n))


def test_prefetch_zero_makes_each_batch_in_next_with_no_thread():
    """data.prefetch = 0: the same batches as with a prefetch, each made only when asked
    for, on the caller's thread."""
    images, labels = _toy()
    kwargs = dict(batch_size=5, seed=3, experience=2, num_steps=7)
    with pipeline.batch_iterator(images, labels, prefetch=2, **kwargs) as it:
        ahead = list(it)
    made, real_host_batch = [], pipeline.host_batch

    def recording(*args, **kw):
        made.append(threading.get_ident())
        return real_host_batch(*args, **kw)

    threads = threading.active_count()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "host_batch", recording)
        it = pipeline.batch_iterator(images, labels, prefetch=0, **kwargs)
        assert threading.active_count() == threads and made == []
        inline = [next(it)]
        assert made == [threading.get_ident()]  # one batch, made by this call, here
        inline += list(it)
    assert len(made) == 7 and set(made) == {threading.get_ident()}
    for a, b in zip(ahead, inline, strict=True):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ValueError, match="prefetch=-1 must be >= 0"):
        pipeline.batch_iterator(images, labels, prefetch=-1, **kwargs)


_SHARDING_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from gdjax.data import pipeline
    assert "jax" not in sys.modules, "importing gdjax.data must not import jax"
    import jax
    assert jax.device_count() == 8
    images = np.random.default_rng(0).normal(size=(50, 4, 4, 1)).astype(np.float32)
    labels = np.arange(50, dtype=np.int32)
    sharding = pipeline.data_sharding()
    kwargs = dict(batch_size=16, seed=5, experience=1, flip=True)
    with pipeline.batch_iterator(images, labels, start_step=2, num_steps=5,
                                 sharding=sharding, **kwargs) as it:
        for step, batch in enumerate(it, start=2):
            host = pipeline.host_batch(images, labels, step, **kwargs)
            for key in ("image", "label", "mask"):
                array = batch[key]
                assert array.shape == host[key].shape and len(array.sharding.device_set) == 8
                shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start)
                assert [s.data.shape[0] for s in shards] == [2] * 8
                for s in shards:
                    np.testing.assert_array_equal(np.asarray(s.data), host[key][s.index])
                np.testing.assert_array_equal(np.asarray(array), host[key])
    try:
        pipeline.batch_iterator(images, labels, batch_size=12, seed=0, experience=0,
                                sharding=sharding)
    except ValueError as e:
        assert "8 or 16" in str(e), e
    else:
        raise AssertionError("batch size 12 over 8 devices was accepted")
    print("OK")
""")


def test_sharding_over_eight_fake_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-c", _SHARDING_SCRIPT], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("value, ok", [(0, True), (2, True), (-1, False), (True, False)])
def test_data_prefetch_setting_takes_zero_and_refuses_the_rest(value, ok):
    from configs import split_digits
    from gdjax.run import settings_from_config

    config = split_digits.get_config()
    config.data.prefetch = value
    if ok:
        assert settings_from_config(config).data.prefetch == value
    else:
        with pytest.raises(ValueError, match=r"data.prefetch=.* must be an integer >= 0"):
            settings_from_config(config)
