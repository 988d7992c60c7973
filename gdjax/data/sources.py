"""Where the images come from: raw uint8 arrays of a data set's train or test split.

Every reader returns `(images, labels)`: uint8 [N, H, W, C] and int32 [N], in the order the
files hold them. Nothing here resizes or rescales (that is `pipeline.py`) and nothing needs
TensorFlow. The sources, by the name `read_source` takes:

- "sklearn": the 8x8 digits bundled with scikit-learn (data set "digits"); 20% of each class
  is held out as the test split by a fixed permutation, the same for every run.
- "raw": the files as their publishers distribute them, in `data_dir` or `data_dir/<name>`:
  MNIST / Fashion-MNIST IDX files (`train-images-idx3-ubyte.gz`, ..., gzipped or not) and
  CIFAR-10's `cifar-10-python.tar.gz` (or its extracted `cifar-10-batches-py/`). Where
  neither holds the IDX files, the system location of a Debian package is looked at last
  (`SYSTEM_DIRS`: `apt-get install dataset-fashion-mnist` puts Fashion-MNIST under
  /usr/share/datasets/fashion-mnist/).
- "tfds": an already prepared TFDS data set read with `tfds.data_source` (array_record
  files); `prepare=True` runs `download_and_prepare` first, which needs TensorFlow.
- "folder": `data_dir/<split>/<class name>/*.png|jpg|...`; class index = rank of the
  sub-folder name in sorted order; every image must have the same size.

Missing files raise FileNotFoundError naming the path and what is expected there; corrupt
files raise ValueError naming the file, what is wrong with it and the fix (download a publisher's
file again; remove or replace an unreadable image).
"""

import gzip
import importlib.util
import io
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable

import numpy as np

SOURCES = ("sklearn", "raw", "tfds", "folder")
SPLITS = ("train", "test")
IDX_DATASETS = ("mnist", "fashion_mnist")
DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 20240101  # fixed: the digits test set must not depend on the run seed

_IDX_URLS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/ (mirror of yann.lecun.com/exdb/mnist)",
    "fashion_mnist": "https://github.com/zalandoresearch/fashion-mnist#get-the-data",
}
# Where a system package puts a data set (Debian's dataset-fashion-mnist: the full set,
# recompressed, so the .gz checksums differ from the publisher's but the contents do not).
# Looked at after data_dir.
SYSTEM_DIRS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist"}
SYSTEM_PACKAGES = {"fashion_mnist": "dataset-fashion-mnist"}
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

Arrays = tuple[np.ndarray, np.ndarray]


_LOOKS_CORRUPT = "The file looks truncated or is not the publisher's file"


def _redownload(url: str) -> str:
    """The fix that ends the error of a corrupt file downloaded from `url`."""
    return f"{_LOOKS_CORRUPT}: delete it and download it again from {url}"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")


# ----------------------------------------------------------------------------- digits

def digits_split_indices(labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices into `sklearn.datasets.load_digits()`, both ascending.

    For each class, round(20%) of its examples, picked by a permutation with a fixed seed,
    go to the test split: stratified, and the same on every machine and run. `labels`
    (the digits' targets) saves loading them again.
    """
    if labels is None:
        from sklearn.datasets import load_digits  # lazily: only this source needs sklearn

        labels = load_digits().target
    rng = np.random.default_rng(_DIGITS_SPLIT_SEED)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_test = int(round(DIGITS_TEST_FRACTION * len(members)))
        test.append(rng.permutation(members)[:n_test])
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def read_digits(split: str) -> Arrays:
    """scikit-learn's 8x8 digits: uint8 [N, 8, 8, 1] with 0..16 mapped to 0..255, int32 [N]."""
    from sklearn.datasets import load_digits

    _check_split(split)
    digits = load_digits()
    index = digits_split_indices(digits.target)[SPLITS.index(split)]
    images = np.rint(digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
    return images[..., None], digits.target[index].astype(np.int32)


# ----------------------------------------------------------------------------- IDX

def _find_file(dirs: list[str], names: list[str], expected: str) -> str:
    """The first existing `dir/name`, else FileNotFoundError listing where it looked."""
    for d in dirs:
        for name in names:
            path = os.path.join(d, name)
            if os.path.exists(path):
                return path
    looked = ", ".join(os.path.join(d, names[0]) for d in dirs)
    raise FileNotFoundError(f"{names[0]} not found (looked for {looked}). {expected}")


def _read_bytes(path: str) -> bytes:
    """The file's content, gunzipped if it ends in .gz; ValueError if the gzip is corrupt."""
    if not path.endswith(".gz"):
        with open(path, "rb") as f:
            return f.read()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated gzip file ({e})") from e


def parse_idx(data: bytes, path: str, *, ndim: int) -> np.ndarray:
    """A uint8 IDX array (magic 0x0000 08 ndim) of `ndim` dimensions; `path` names errors."""
    magic = 0x0800 | ndim
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: wrong IDX magic number {found:#010x}, expected {magic:#010x}")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise ValueError(f"{path}: IDX header says shape {shape} ({int(np.prod(shape))} bytes) "
                         f"but the file holds {len(body)} bytes of data")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _idx_stems(name: str) -> list[str]:
    """The four IDX files of a data set, without the optional .gz."""
    return [f"{_IDX_PREFIX[split]}-{kind}-ubyte" for split in SPLITS
            for kind in ("images-idx3", "labels-idx1")]


def _present(folder: str, stem: str) -> str | None:
    for name in (stem + ".gz", stem):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def idx_directories(name: str, data_dir: str | None) -> list[str]:
    """Where the IDX files of `name` are looked for, in order: data_dir/<name>, data_dir,
    then the system location of the data set's Debian package, if it has one."""
    dirs = [] if data_dir is None else [os.path.join(data_dir, name), data_dir]
    if name in SYSTEM_DIRS:
        dirs.append(SYSTEM_DIRS[name])
    return dirs


def find_idx_directory(name: str, data_dir: str | None) -> str:
    """The first of `idx_directories` that holds all four IDX files of `name`.

    A directory holding some of them is an error naming the missing ones (no silent mix of
    two copies); none holding any is a FileNotFoundError naming every place looked at and
    how to get the files.
    """
    stems = _idx_stems(name)
    looked = idx_directories(name, data_dir)
    for folder in looked:
        found = {stem: _present(folder, stem) for stem in stems}
        if all(found.values()):
            return folder
        if any(found.values()):
            missing = ", ".join(f"{stem}.gz" for stem, path in found.items() if path is None)
            raise FileNotFoundError(
                f"{folder} holds part of the {name} IDX files: {missing} missing. Put all four "
                f"there ({_idx_get(name)}), or remove the others so that gdjax looks further.")
    raise FileNotFoundError(
        f"the {name} IDX files ({', '.join(s + '.gz' for s in stems)}) are not in "
        f"{' nor '.join(looked) or 'any directory (data.data_dir is empty)'}. "
        f"{_idx_get(name)[0].upper()}{_idx_get(name)[1:]}.")


def _idx_get(name: str) -> str:
    """How to get the IDX files of `name`."""
    hint = f"download them from {_IDX_URLS[name]} into data.data_dir"
    if name in SYSTEM_PACKAGES:
        hint = (f"install them with `apt-get update && apt-get install {SYSTEM_PACKAGES[name]}` "
                f"(into {SYSTEM_DIRS[name]}), or {hint}")
    return hint


def read_idx(name: str, data_dir: str | None, split: str) -> Arrays:
    """MNIST or Fashion-MNIST from its IDX files: the first of `idx_directories(name,
    data_dir)` that holds all four (`find_idx_directory`)."""
    _check_split(split)
    if name not in IDX_DATASETS:
        raise ValueError(f"IDX files hold {IDX_DATASETS}, not {name!r}")
    folder = find_idx_directory(name, data_dir)
    arrays = []
    for kind, ndim in (("images-idx3", 3), ("labels-idx1", 1)):
        path = _present(folder, f"{_IDX_PREFIX[split]}-{kind}-ubyte")
        try:
            arrays.append((parse_idx(_read_bytes(path), path, ndim=ndim), path))
        except ValueError as e:
            raise ValueError(f"{e}. {_redownload(_IDX_URLS[name])}.") from e
    (images, image_path), (labels, label_path) = arrays
    if len(images) != len(labels):
        raise ValueError(f"{image_path} holds {len(images)} images but {label_path} holds "
                         f"{len(labels)} labels. One of them is not the publisher's file: "
                         f"delete both and download them again from {_IDX_URLS[name]}.")
    return images[..., None].copy(), labels.astype(np.int32)


# ----------------------------------------------------------------------------- CIFAR-10

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches, refusing every global but numpy's array reconstruction."""

    # _codecs.encode: how Python 3 writes bytes at pickle protocol 2 (re-packed copies).
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray"  # numpy 2 moved it; old pickles name the old path
        return super().find_class(module, name)


def _parse_cifar_batch(data: bytes, path: str, fix: str) -> Arrays:
    """One pickled CIFAR-10 batch -> uint8 [N, 32, 32, 3], int32 [N]; `fix` ends errors."""
    try:
        batch = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
        batch = {(k.decode() if isinstance(k, bytes) else k): v for k, v in batch.items()}
        images = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["labels"], dtype=np.int32)
    except (pickle.UnpicklingError, EOFError, AttributeError, KeyError, TypeError,
            ValueError, IndexError, LookupError, MemoryError) as e:
        # LookupError: an unknown codec name; MemoryError: a damaged length asking for more
        raise ValueError(f"{path}: not a valid CIFAR-10 python batch ({e!r}). {fix}.") from e
    if images.ndim != 2 or images.shape[1] != 3072 or len(images) != len(labels):
        raise ValueError(f"{path}: expected data [N, 3072] and N labels, got data "
                         f"{images.shape} and {len(labels)} labels. {fix}.")
    # Rows hold the red, then green, then blue 32x32 planes.
    return images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def _cifar_members(split: str) -> list[str]:
    return ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]


def _read_cifar_tar(path: str, split: str) -> list[Arrays]:
    fix = _redownload(_CIFAR_URL)
    try:
        with tarfile.open(path, "r:*") as tar:
            parts = []
            for member in _cifar_members(split):
                member_path = f"cifar-10-batches-py/{member}"
                try:
                    f = tar.extractfile(member_path)
                except KeyError:
                    f = None
                if f is None:
                    raise ValueError(f"{path}: the tarball has no {member_path}. {fix}.")
                parts.append(_parse_cifar_batch(f.read(), f"{path}:{member_path}", fix))
            return parts
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated tar file ({e}). {fix}.") from e


def read_cifar10(data_dir: str, split: str) -> Arrays:
    """CIFAR-10 from `cifar-10-batches-py/` or `cifar-10-python.tar.gz` in `data_dir`."""
    _check_split(split)
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    tarball = os.path.join(data_dir, "cifar-10-python.tar.gz")
    if os.path.isdir(folder):
        fix = (f"{_LOOKS_CORRUPT}: delete {folder} and extract it again from "
               f"cifar-10-python.tar.gz, downloaded from {_CIFAR_URL}")
        parts = []
        for member in _cifar_members(split):
            path = _find_file([folder], [member], f"Expected the pickled batches "
                              f"data_batch_1..5 and test_batch in {folder}.")
            with open(path, "rb") as f:
                parts.append(_parse_cifar_batch(f.read(), path, fix))
    elif os.path.isfile(tarball):
        parts = _read_cifar_tar(tarball, split)
    else:
        raise FileNotFoundError(
            f"CIFAR-10 not found: neither {tarball} nor {folder} exists. Download "
            f"cifar-10-python.tar.gz from {_CIFAR_URL} into {data_dir}.")
    return (np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]))


# ----------------------------------------------------------------------------- TFDS

def prepare_tfds(name: str, data_dir: str | None) -> None:
    """Downloads and prepares `name` as array_record files; needs TensorFlow and internet."""
    if importlib.util.find_spec("tensorflow") is None:
        raise ImportError(
            f"preparing the TFDS data set {name!r} needs TensorFlow, which is not installed "
            f"(gdjax itself never needs it). Either `pip install tensorflow` and retry, prepare "
            f"it on another machine with tfds.builder({name!r}).download_and_prepare("
            f"file_format='array_record') and copy the data dir here, or use source='raw'.")
    import tensorflow_datasets as tfds

    tfds.builder(name, data_dir=data_dir).download_and_prepare(file_format="array_record")


def read_tfds(name: str, data_dir: str | None, split: str, *, prepare: bool = False) -> Arrays:
    """An already prepared TFDS data set ("image", "label" features) via `tfds.data_source`."""
    import tensorflow_datasets as tfds  # lazily: heavy, and only this source needs it

    _check_split(split)
    if prepare:
        prepare_tfds(name, data_dir)
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except (NotImplementedError, FileNotFoundError, AssertionError, OSError) as e:
        where = data_dir or "the default TFDS data dir (~/tensorflow_datasets)"
        raise FileNotFoundError(
            f"no prepared array_record copy of TFDS data set {name!r} in {where} ({e}). "
            f"Expected {where}/{name}/<version>/ with array_record files; prepare it once "
            f"with prepare=True (needs TensorFlow and internet) or use source='raw'.") from e
    # One example at a time: slower than __getitems__ but also what tfds's mocks support.
    examples = [source[i] for i in range(len(source))]
    images = np.stack([np.asarray(ex["image"], dtype=np.uint8) for ex in examples])
    labels = np.asarray([ex["label"] for ex in examples], dtype=np.int32)
    return images, labels


# ----------------------------------------------------------------------------- folder

def _class_folders(root: str) -> list[str]:
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"image folder {root} not found: expected {root}/<class name>/<images>, one "
            f"sub-folder per class, for each split (train/ and test/).")
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not names:
        raise FileNotFoundError(f"image folder {root} has no class sub-folders")
    return names


def _read_image(path: str, mode: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode), dtype=np.uint8)
    # SyntaxError: PIL's "broken PNG file"; ValueError: e.g. "Truncated IHDR chunk"; a bomb:
    # a damaged header claiming billions of pixels.
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError,
            ValueError) as e:
        raise ValueError(f"{path}: unreadable image ({e}); remove it, or replace it by a "
                         f"readable image") from e


def read_image_folder(data_dir: str, split: str, *, channels: int) -> Arrays:
    """`data_dir/<split>/<class>/*` images converted to `channels` (1: L, 3: RGB)."""
    _check_split(split)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    root = os.path.join(data_dir, split)
    images, labels = [], []
    for label, name in enumerate(_class_folders(root)):
        folder = os.path.join(root, name)
        for file in sorted(os.listdir(folder)):
            if file.lower().endswith(_IMAGE_SUFFIXES):
                path = os.path.join(folder, file)
                image = _read_image(path, "L" if channels == 1 else "RGB")
                if images and image.shape != images[0].shape:
                    raise ValueError(f"{path}: size {image.shape[1]}x{image.shape[0]} differs "
                                     f"from {images[0].shape[1]}x{images[0].shape[0]}; all "
                                     f"images of a folder must have the same size: resize "
                                     f"it or remove it")
                images.append(image)
                labels.append(label)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(_IMAGE_SUFFIXES)}) under {root}")
    images = np.stack(images)
    return images.reshape(images.shape[:3] + (channels,)), np.asarray(labels, np.int32)


# ----------------------------------------------------------------------------- dispatch

def default_source(name: str) -> str:
    """The source a data set is read from when none is given: digits ship with sklearn."""
    return "sklearn" if name == "digits" else "raw"


def _raw_reader(name: str) -> Callable[[str, str], Arrays]:
    if name in IDX_DATASETS:
        return lambda data_dir, split: read_idx(name, data_dir, split)
    if name == "cifar10":
        return read_cifar10
    raise ValueError(f"source 'raw' reads {', '.join(IDX_DATASETS + ('cifar10',))}, "
                     f"not {name!r}")


def read_source(name: str, *, source: str, split: str, data_dir: str | None = None,
                channels: int = 1, prepare: bool = False) -> Arrays:
    """uint8 [N, H, W, C] images and int32 [N] labels of `split` of data set `name`."""
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; known sources: {', '.join(SOURCES)}")
    if source == "sklearn":
        if name != "digits":
            raise ValueError(f"source 'sklearn' only holds 'digits', not {name!r}")
        return read_digits(split)
    if source == "tfds":
        return read_tfds(name, data_dir, split, prepare=prepare)
    if source == "raw" and name in IDX_DATASETS:
        return read_idx(name, data_dir, split)  # data_dir may be None: the system location
    if data_dir is None:
        raise ValueError(f"source {source!r} needs a data_dir")
    if source == "folder":
        return read_image_folder(data_dir, split, channels=channels)
    return _raw_reader(name)(data_dir, split)
