"""Fuzzing: invalid config values and malformed data files get our clean errors.

Clean means a ValueError or FileNotFoundError raised by gdjax's own code (the raising frame
is in gdjax/ or configs/), not a traceback from deep inside JAX, numpy or pickle.
"""

import gzip
import io
import os
import pickle
import struct
import tarfile
import tempfile
import traceback
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gdjax.run import build
from gdjax.data import sources
from tests.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLEAN = (ValueError, FileNotFoundError)
# GDJAX_FUZZ_EXAMPLES=400 python -m pytest tests/test_fuzz.py: the longer runs of the README.
_EXAMPLES = int(os.environ.get("GDJAX_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=_EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
# How many inputs each fuzz test tried (README "Reliability" figures).
TRIED: dict = {}


def assert_clean(error: BaseException) -> None:
    """Our error type, raised by our code: the message names the fix, not a library's state."""
    assert isinstance(error, CLEAN), "".join(traceback.format_exception(error))
    where = traceback.extract_tb(error.__traceback__)[-1].filename
    ours = (os.path.join(ROOT, "gdjax"), os.path.join(ROOT, "configs"))
    assert where.startswith(ours), f"raised in {where}: {error!r}"


def expect_clean(fn, *args, **kwargs):
    """Runs fn; a raised error must be clean. Returns whether it raised."""
    try:
        fn(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - judged by assert_clean
        assert_clean(e)
        return True
    return False


def _count(name):
    TRIED[name] = TRIED.get(name, 0) + 1


# ----------------------------------------------------------------------------- configs

_KEYS = [f"{section}.{name}" for section, values in tiny_config().items()
         if hasattr(values, "items") for name in values]


def _values_like(value):
    """Values of the field's own type (a locked ConfigDict refuses others), edges included."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.one_of(st.sampled_from([0, -1, 1, 2, 3, 10**9, -(2**40), 2**70]),
                         st.integers(-10**6, 10**6))
    if isinstance(value, float):
        return st.one_of(st.sampled_from([0.0, -1.0, float("nan"), float("inf"), -float("inf"),
                                          1e300, 1.0, 2.0]), st.floats())
    if isinstance(value, str):
        return st.one_of(st.sampled_from(["", " ", "none", "../..", "mnist", "raw", "tfds",
                                          "folder", "cosine", "skip"]), st.text(max_size=12))
    if isinstance(value, tuple):
        return st.lists(st.integers(-3, 12), max_size=12).map(tuple)
    raise AssertionError(f"no strategy for {value!r}")


@st.composite
def mutated_configs(draw):
    config = tiny_config()
    for key in draw(st.lists(st.sampled_from(_KEYS + ["seed"]), min_size=1, max_size=3)):
        if key == "seed":
            config.seed = draw(_values_like(1))
            continue
        section, name = key.split(".")
        setattr(config[section], name, draw(_values_like(config[section][name])))
    return config


@FUZZ
@given(config=mutated_configs())
def test_fuzzed_configs_fail_cleanly_or_build(config):
    _count("configs")
    with tempfile.TemporaryDirectory() as workdir:
        if not expect_clean(build, config, workdir):
            # Accepted: then the values must be usable, e.g. finite where they are rates.
            t = config.train
            assert np.isfinite(t.learning_rate) and np.isfinite(t.grad_clip)
            assert 0 <= config.seed < 2**31


@pytest.mark.parametrize("key, value, message", [
    ("train.learning_rate", float("inf"), "train.learning_rate=inf"),
    ("train.grad_clip", float("nan"), "train.grad_clip=nan"),
    ("strategy.lambd", float("nan"), "strategy.lambd=nan"),
    ("eval.eta", -1.0, "eval.eta=-1.0"),
    ("diffusion.beta_end", float("nan"), "beta_end=nan"),
])
def test_non_finite_or_negative_rates_are_named(key, value, message, tmp_path):
    config = tiny_config()
    section, name = key.split(".")
    setattr(config[section], name, value)
    with pytest.raises(ValueError, match=message):
        build(config, str(tmp_path))


@pytest.mark.parametrize("seed", [-1, 2**31, 2**70])
def test_seed_out_of_range_is_named(seed, tmp_path):
    config = tiny_config()
    config.seed = seed
    with pytest.raises(ValueError, match=f"seed={seed}"):
        build(config, str(tmp_path))


# ----------------------------------------------------------------------------- IDX files

def _idx(array: np.ndarray) -> bytes:
    header = (0x0800 | array.ndim).to_bytes(4, "big")
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


_GOOD_IMAGES = _idx(np.arange(2 * 3 * 3).reshape(2, 3, 3))
_GOOD_LABELS = _idx(np.array([1, 2]))


@st.composite
def damaged(draw, good: bytes):
    """`good` truncated, extended, or with bytes overwritten; or random bytes."""
    kind = draw(st.sampled_from(["truncate", "extend", "overwrite", "random"]))
    if kind == "truncate":
        return good[:draw(st.integers(0, len(good) - 1))]
    if kind == "extend":
        return good + draw(st.binary(min_size=1, max_size=16))
    if kind == "overwrite":
        data = bytearray(good)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    return draw(st.binary(max_size=64))


def _write_idx_dir(root, images: bytes, labels: bytes, gz: bool) -> None:
    os.makedirs(root, exist_ok=True)
    for stem, data in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        path = os.path.join(root, stem + (".gz" if gz else ""))
        if gz:
            data = gzip.compress(data)
        with open(path, "wb") as f:
            f.write(data)


@FUZZ
@given(images=damaged(_GOOD_IMAGES), labels=damaged(_GOOD_LABELS), gz=st.booleans(),
       tear_gzip=st.integers(0, 3))
def test_fuzzed_idx_files_fail_cleanly(images, labels, gz, tear_gzip):
    _count("idx files")
    with tempfile.TemporaryDirectory() as root:
        _write_idx_dir(root, images, labels, gz)
        if gz and tear_gzip:  # a torn download: the gzip stream itself is cut short
            path = os.path.join(root, "train-images-idx3-ubyte.gz")
            data = open(path, "rb").read()
            open(path, "wb").write(data[:max(1, len(data) - 4 * tear_gzip)])
        raised = expect_clean(sources.read_idx, "mnist", root, "train")
        assert raised or (images, labels) == (_GOOD_IMAGES, _GOOD_LABELS) or \
            _still_valid(images, labels)


def _still_valid(images: bytes, labels: bytes) -> bool:
    """An overwrite that kept a consistent file (e.g. a changed pixel) is valid data."""
    try:
        a = sources.parse_idx(images, "i", ndim=3)
        b = sources.parse_idx(labels, "l", ndim=1)
    except ValueError:
        return False
    return len(a) == len(b)


def test_missing_idx_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz, .* are not in"):
        sources.read_idx("mnist", str(tmp_path), "train")


# ----------------------------------------------------------------------------- CIFAR files

def _cifar_batch(n=2) -> bytes:
    batch = {b"data": np.zeros((n, 3072), np.uint8), b"labels": list(range(n))}
    return pickle.dumps(batch, protocol=2)


_GOOD_BATCH = _cifar_batch()


@FUZZ
@given(data=damaged(_GOOD_BATCH))
def test_fuzzed_cifar_batches_fail_cleanly(data):
    _count("cifar batches")
    with tempfile.TemporaryDirectory() as root:
        folder = os.path.join(root, "cifar-10-batches-py")
        os.makedirs(folder)
        with open(os.path.join(folder, "test_batch"), "wb") as f:
            f.write(data)
        expect_clean(sources.read_cifar10, root, "test")


@FUZZ
@given(cut=st.integers(1, 400), flip=st.integers(0, 399))
def test_fuzzed_cifar_tarballs_fail_cleanly(cut, flip):
    _count("cifar tarballs")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.size = len(_GOOD_BATCH)
        tar.addfile(info, io.BytesIO(_GOOD_BATCH))
    data = bytearray(buffer.getvalue())
    data[flip % len(data)] ^= 0xFF
    with tempfile.TemporaryDirectory() as root:
        with open(os.path.join(root, "cifar-10-python.tar.gz"), "wb") as f:
            f.write(bytes(data[:max(1, len(data) - cut)]))
        # Some damage is harmless (a flipped gzip timestamp, a cut trailer tarfile ignores).
        expect_clean(sources.read_cifar10, root, "test")


def test_cifar_batch_naming_an_unknown_codec_is_a_clean_error(tmp_path):
    """Found by fuzzing: the allowed _codecs.encode let a batch name an unknown codec."""
    data = _GOOD_BATCH.replace(b"latin1", b"\x01atin1")
    assert data != _GOOD_BATCH
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(data)
    with pytest.raises(ValueError, match="not a valid CIFAR-10 python batch"):
        sources.read_cifar10(str(tmp_path), "test")



def test_cifar_batch_asking_for_a_huge_buffer_is_a_clean_error(tmp_path):
    """Found by fuzzing (400 examples): a first byte turned into BYTEARRAY8 makes the
    unpickler allocate the 8-byte length that follows, a MemoryError."""
    data = b"\x96" + _GOOD_BATCH[1:]
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(data)
    with pytest.raises(ValueError, match="not a valid CIFAR-10 python batch"):
        sources.read_cifar10(str(tmp_path), "test")


# ----------------------------------------------------------------------------- image folders

def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


_GOOD_PNG = _png(np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8))


@settings(FUZZ, max_examples=max(25, _EXAMPLES * 5 // 8))  # = _FOLDER_EXAMPLES
@given(files=st.lists(st.tuples(st.sampled_from(["cat", "dog"]),
                                st.one_of(st.just(_GOOD_PNG), damaged(_GOOD_PNG))),
                      min_size=1, max_size=4))
def test_fuzzed_image_folders_fail_cleanly(files):
    _count("image folders")
    with tempfile.TemporaryDirectory() as root:
        paths = [os.path.join(root, "train", cls, f"{i}.png") for i, (cls, _) in enumerate(files)]
        for path, (_, data) in zip(paths, files):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        try:
            images, labels = sources.read_image_folder(root, "train", channels=3)
        except BaseException as e:  # noqa: BLE001 - judged by assert_clean
            assert_clean(e)
            message = str(e)  # names the file and says what to do with it
            assert any(message.startswith(f"{path}: ") for path in paths), message
            assert "remove it" in message, message
        else:  # some damage keeps a valid PNG (e.g. bytes after IEND)
            assert images.shape == (len(files), 4, 5, 3) and len(labels) == len(files)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return (len(body).to_bytes(4, "big") + kind + body
            + zlib.crc32(kind + body).to_bytes(4, "big"))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("header, problem", [
    # 100000 x 100000 pixels, valid CRC: PIL raises DecompressionBombError, not an OSError.
    (struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0), "exceeds limit"),
    (struct.pack(">II", 4, 5), "Truncated IHDR chunk"),  # PIL raises a ValueError
])
def test_damaged_png_headers_are_clean_errors(header, problem, tmp_path):
    """Found by fuzzing PIL (rare in 25 examples): errors that are not OSError."""
    (tmp_path / "train" / "cat").mkdir(parents=True)
    path = tmp_path / "train" / "cat" / "0.png"
    path.write_bytes(_PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b""))
    with pytest.raises(ValueError) as e:
        sources.read_image_folder(str(tmp_path), "train", channels=1)
    assert_clean(e.value)
    assert str(e.value).startswith(f"{path}: unreadable image") and problem in str(e.value)


_FOLDER_EXAMPLES = max(25, _EXAMPLES * 5 // 8)
EXPECTED = {"configs": _EXAMPLES, "idx files": _EXAMPLES, "cifar batches": _EXAMPLES,
            "cifar tarballs": _EXAMPLES, "image folders": _FOLDER_EXAMPLES}


def test_every_fuzz_test_tried_all_its_inputs():
    """The README's figure (185 inputs per suite run at the default 40): each fuzz test that
    ran above tried as many inputs as its settings ask for, none stopped short."""
    if not TRIED:
        pytest.skip("no fuzz test ran in this session (run the whole module)")
    assert TRIED == {name: EXPECTED[name] for name in TRIED}, TRIED
    if len(TRIED) == len(EXPECTED) and _EXAMPLES == 40:
        assert sum(TRIED.values()) == 185
