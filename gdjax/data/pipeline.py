"""From a data set's name to sharded training batches.

Two halves:

1. Loading, once per run, on the host: `load_dataset(name, source=..., data_dir=...,
   image_size=..., channels=...)` reads both splits (see `sources.py`), converts channels,
   resizes with antialiased bilinear interpolation (half-pixel centres, the filter PIL and
   torchvision's `antialias=True` use: a triangle stretched by the scale when downsampling),
   and scales to float32 in [-1, 1]. It returns two `ImageSplit`s (images NHWC, labels int32).
   The resize is kept in float (torchvision rounds PIL's uint8 output; the gap is < 1/255).

2. Batching: the batch at `step` of experience `e` is a pure function of (seed, e, step,
   dataset size, batch size). Epoch k visits the examples in the order of the named random
   stream "epoch_order" (gdjax/rng.py) at (e, k), cut into batches of `batch_size`; the last
   batch of an epoch keeps the remainder, as the reference's loaders do (drop_last False),
   padded to `batch_size` zero rows with a 0 in its "mask" so that the step compiles once
   (`drop_last=True` drops the remainder instead). The optional horizontal flip of each row
   comes from the stream "batch_flip" at (e, step). So a run resumed at step s gets exactly
   the batches it would have had. `batch_iterator(...)` builds those batches in a background
   thread, a couple ahead of the accelerator, and, given a `data_sharding()`, places each one
   on the devices sharded along the batch axis (each host builds only the rows its devices
   hold).

    train, test = load_dataset("digits", image_size=16, channels=1)
    part = train.select(experiences[e])
    with batch_iterator(part.images, part.labels, batch_size=64, seed=0, experience=e,
                        start_step=s, num_steps=400, sharding=data_sharding()) as batches:
        for batch in batches:          # {"image": [64, 16, 16, 1], "label": [64], "mask": [64]}
            ...
"""

import dataclasses
import itertools
import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from gdjax import rng
from gdjax.data import sources, splits

_RESIZE_CHUNK = 4096  # images resized at a time, to bound the host memory it takes


# ----------------------------------------------------------------------------- preprocessing

def resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """float64 [out_size, in_size] antialiased bilinear weights (half-pixel centres).

    Output pixel o is centred at (o + 0.5) * in/out in input coordinates; input pixel i, at
    i + 0.5, gets the triangle weight max(0, 1 - |distance| / max(in/out, 1)); each row is
    normalised to sum to 1, which also clamps at the borders.
    """
    scale = in_size / out_size
    stretch = max(scale, 1.0)  # downsampling widens the filter: that is the antialiasing
    centres = (np.arange(out_size) + 0.5) * scale
    distance = (np.arange(in_size) + 0.5)[None, :] - centres[:, None]
    weights = np.maximum(0.0, 1.0 - np.abs(distance) / stretch)
    return weights / weights.sum(axis=1, keepdims=True)


def resize_bilinear(images: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """NHWC `images` resized to `size` (int or (H, W)) with `resize_weights`: a new float32 array."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    if images.shape[1:3] == (out_h, out_w):
        return np.array(images, dtype=np.float32)  # a copy: callers may scale it in place
    images = np.asarray(images, dtype=np.float32)
    wh = resize_weights(images.shape[1], out_h).astype(np.float32)
    ww = resize_weights(images.shape[2], out_w).astype(np.float32)
    out = np.empty((len(images), out_h, out_w, images.shape[3]), np.float32)
    for start in range(0, len(images), _RESIZE_CHUNK):
        # As [n, c, h, w], both passes are batched matrix products (faster than einsum).
        chunk = images[start:start + _RESIZE_CHUNK].transpose(0, 3, 1, 2)
        out[start:start + _RESIZE_CHUNK] = (wh @ chunk @ ww.T).transpose(0, 2, 3, 1)
    return out


def convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 NHWC images with `channels` channels: grey repeated to RGB, RGB to ITU-R 601 luma."""
    have = images.shape[-1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return np.repeat(images, 3, axis=-1)
    if have == 3 and channels == 1:
        luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.rint(luma)[..., None].astype(np.uint8)
    raise ValueError(f"cannot convert {have}-channel images to {channels} channels")


def preprocess(images: np.ndarray, *, image_size: int, channels: int) -> np.ndarray:
    """uint8 NHWC -> float32 [N, image_size, image_size, channels] in [-1, 1]."""
    images = convert_channels(images, channels)
    images = resize_bilinear(images, image_size)  # float32, still in [0, 255]
    images *= np.float32(1 / 127.5)  # in place: CIFAR's train split is 600 MB as float32
    images -= np.float32(1.0)
    return np.clip(images, -1.0, 1.0, out=images)  # rounding can step just past +-1


# ----------------------------------------------------------------------------- data sets

@dataclasses.dataclass(frozen=True)
class ImageSplit:
    """One split of a data set: images float32 [N, H, W, C] in [-1, 1], labels int32 [N]."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def classes(self) -> tuple[int, ...]:
        """The distinct labels present, ascending."""
        return tuple(int(c) for c in np.unique(self.labels))

    def take(self, indices: np.ndarray) -> "ImageSplit":
        """The examples at `indices`, in that order."""
        return ImageSplit(self.images[indices], self.labels[indices])

    def select(self, classes: Sequence[int]) -> "ImageSplit":
        """The examples whose label is in `classes` (an experience, or those seen so far)."""
        return self.take(splits.experience_indices(self.labels, classes))


def load_dataset(name: str, *, source: str | None = None, data_dir: str | None = None,
                 image_size: int, channels: int,
                 prepare: bool = False) -> tuple[ImageSplit, ImageSplit]:
    """(train, test) of data set `name`, resized to `image_size` and scaled to [-1, 1].

    `source` is one of `sources.SOURCES` (default: "sklearn" for "digits", else "raw");
    `prepare` lets the "tfds" source download and prepare the data first (needs TensorFlow).
    """
    source = source or sources.default_source(name)
    out = []
    for split in sources.SPLITS:
        images, labels = sources.read_source(name, source=source, split=split, data_dir=data_dir,
                                             channels=channels, prepare=prepare and not out)
        out.append(ImageSplit(preprocess(images, image_size=image_size, channels=channels),
                              labels.astype(np.int32)))
    return out[0], out[1]


def resize_uint8_pil(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 NHWC images (1 or 3 channels) resized to size x size by PIL's bilinear filter,
    in uint8: what torchvision's `Resize(size, antialias=True)` gives on the reference's PIL
    images. The real images of the reference's FID take this path (gdjax's own training
    images are resized in float by `resize_bilinear`, which differs by < 1/255)."""
    from PIL import Image  # lazily: only the FID's real images need it

    images = np.asarray(images, np.uint8)
    if images.shape[1:3] == (size, size):
        return images.copy()
    mode = {1: "L", 3: "RGB"}[images.shape[-1]]
    out = np.empty((len(images), size, size, images.shape[-1]), np.uint8)
    for i, image in enumerate(images):
        pil = Image.fromarray(image[..., 0] if mode == "L" else image, mode)
        out[i] = np.asarray(pil.resize((size, size), Image.BILINEAR)).reshape(size, size, -1)
    return out


def load_uint8_split(name: str, *, source: str | None = None, data_dir: str | None = None,
                     image_size: int, channels: int, split: str = "test") -> ImageSplit:
    """One split as uint8 [N, image_size, image_size, channels] images resized by PIL
    (`resize_uint8_pil`) and int32 labels: the reference's real images for FID."""
    source = source or sources.default_source(name)
    images, labels = sources.read_source(name, source=source, split=split, data_dir=data_dir,
                                         channels=channels)
    images = resize_uint8_pil(convert_channels(images, channels), image_size)
    return ImageSplit(images, labels.astype(np.int32))


# ----------------------------------------------------------------------------- batch order

def steps_per_epoch(num_examples: int, batch_size: int, *, drop_last: bool = False) -> int:
    """Batches per epoch: every example once, the last batch partial unless `drop_last`."""
    if batch_size < 1 or num_examples < 1 or (drop_last and num_examples < batch_size):
        raise ValueError(f"batch size {batch_size} needs 1 <= batch size <= the "
                         f"{num_examples} examples of the experience")
    return num_examples // batch_size if drop_last else -(-num_examples // batch_size)


def epoch_permutation(seed: int, experience: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order (int64 [num_examples]) in which epoch `epoch` of `experience` visits examples."""
    return rng.numpy_rng(seed, "epoch_order", experience, epoch).permutation(num_examples)


def batch_indices(step: int, *, num_examples: int, batch_size: int, seed: int,
                  experience: int, drop_last: bool = False) -> np.ndarray:
    """Example indices (int64, at most [batch_size]) of the batch at global `step` of
    `experience`; the last batch of an epoch is shorter unless `drop_last`."""
    per_epoch = steps_per_epoch(num_examples, batch_size, drop_last=drop_last)
    epoch, position = divmod(step, per_epoch)
    order = epoch_permutation(seed, experience, epoch, num_examples)
    return order[position * batch_size:(position + 1) * batch_size]


def flip_mask(step: int, *, batch_size: int, seed: int, experience: int,
              stream: str = "batch_flip") -> np.ndarray:
    """bool [batch_size]: which rows of the batch at `step` are flipped left-right."""
    return rng.numpy_rng(seed, stream, experience, step).random(batch_size) < 0.5


def flip_rows(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`images` (NHWC, a new array) with the rows where `mask` holds mirrored left-right."""
    images = np.array(images)
    images[mask] = images[mask, :, ::-1]
    return images


def pad_rows(rows: np.ndarray, size: int) -> np.ndarray:
    """`rows` followed by zero rows up to `size` rows."""
    pad = size - len(rows)
    if pad <= 0:
        return rows
    return np.concatenate([rows, np.zeros((pad,) + rows.shape[1:], rows.dtype)])


def host_batch(images: np.ndarray, labels: np.ndarray, step: int, *, batch_size: int,
               seed: int, experience: int, flip: bool = False, drop_last: bool = False,
               rows: slice = slice(None)) -> dict[str, np.ndarray]:
    """Rows `rows` of the batch at `step`: {"image": float32 NHWC, "label": int32,
    "mask": float32}, always `batch_size` rows before slicing: the short last batch of an
    epoch is padded with zero rows whose mask is 0 (one compiled shape; the step takes its
    means over the rows whose mask is 1)."""
    index = batch_indices(step, num_examples=len(labels), batch_size=batch_size, seed=seed,
                          experience=experience, drop_last=drop_last)
    image = np.take(images, index, axis=0)
    if flip:
        mask = flip_mask(step, batch_size=batch_size, seed=seed, experience=experience)
        image = flip_rows(image, mask[:len(index)])
    real = np.zeros(batch_size, np.float32)
    real[:len(index)] = 1.0
    batch = {"image": pad_rows(image, batch_size),
             "label": pad_rows(np.take(labels, index).astype(np.int32), batch_size),
             "mask": real}
    return {name: value[rows] for name, value in batch.items()}


# ----------------------------------------------------------------------------- sharding

def data_sharding(mesh=None):
    """NamedSharding splitting axis 0 over mesh axis 'data' (default: all devices, 1-D).

    The default mesh uses AxisType.Auto so that jit partitions the computation itself, as in
    plain data parallelism; pass your own mesh to share the train step's.
    """
    import jax  # lazily: importing this module must not start a backend
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    if mesh is None:
        mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    return NamedSharding(mesh, PartitionSpec("data"))


def check_batch_size(batch_size: int, num_devices: int, what: str = "batch size") -> None:
    """ValueError, with the nearest valid sizes, unless `num_devices` divides `batch_size`."""
    if batch_size % num_devices:
        below = batch_size // num_devices * num_devices
        valid = [s for s in (below, below + num_devices) if s > 0]
        raise ValueError(
            f"{what} {batch_size} is not divisible by the {num_devices} devices it is "
            f"sharded over; use a multiple of {num_devices}, e.g. "
            + " or ".join(str(s) for s in valid))


def local_rows(sharding, batch_size: int) -> slice:
    """The contiguous rows of a global batch that this process's devices hold."""
    check_batch_size(batch_size, sharding.mesh.shape["data"])
    index_map = sharding.addressable_devices_indices_map((batch_size,))
    bounds = sorted({(s[0].indices(batch_size)[:2]) for s in index_map.values()})
    start, stop = bounds[0][0], bounds[-1][1]
    if sum(b - a for a, b in bounds) != stop - start:
        raise ValueError(f"this process's devices hold non-contiguous rows {bounds}")
    return slice(start, stop)


def shard_batch(batch: dict[str, np.ndarray], sharding, *, batch_size: int | None = None):
    """This process's rows of a global batch -> dict of global jax.Arrays sharded on axis 0.

    `batch` holds the rows `local_rows(sharding, batch_size)` of the global batch (all of it on
    one host); `batch_size` is the global size (default: each entry's local size times the
    process count, so entries of different sizes, such as ER's memory rows, may share a batch).
    """
    import jax

    out = {}
    for name, value in batch.items():
        size = batch_size or len(value) * jax.process_count()
        check_batch_size(size, sharding.mesh.shape["data"])
        out[name] = jax.make_array_from_process_local_data(sharding, value,
                                                           (size,) + value.shape[1:])
    return out


def global_rows(array, sharding):
    """A host array that every process holds whole (evaluation images, a solver batch), as
    one global jax.Array split along axis 0 over `sharding`: each process places the rows
    its devices hold."""
    import jax

    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


# ----------------------------------------------------------------------------- prefetch

class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


class Prefetcher(Iterator):
    """Runs an iterator in a background thread, `size` items ahead; close() stops it.

    An exception raised in the thread is re-raised by the consumer's next(). `size` 0
    starts no thread: each item is made in next(), on the consumer's thread
    (data.prefetch = 0; the benchmark's baseline for what prefetching saves).
    """

    def __init__(self, items: Iterator, size: int = 2):
        if size < 0:
            raise ValueError(f"prefetch={size} must be >= 0 (0: no background thread)")
        self._done = False
        self._items = items if size == 0 else None
        if size == 0:
            return
        self._queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterator) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as e:  # surfaced to the consumer, not lost in the thread
            self._put(_Failure(e))

    def __next__(self):
        if self._done:
            raise StopIteration
        if self._items is not None:  # no thread
            try:
                return next(self._items)
            except StopIteration:
                self._done = True
                raise
        item = self._queue.get()
        if item is _END or isinstance(item, _Failure):
            self.close()
            if isinstance(item, _Failure):
                raise item.error
            raise StopIteration
        return item

    def close(self) -> None:
        """Stops the thread and drops what it had prepared; idempotent."""
        self._done = True
        if self._items is not None:
            return
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shard_group(batch: dict[str, np.ndarray], sharding):
    """`shard_batch` for batches stacked on a leading step axis ([n, local rows, ...]): the
    rows split over 'data' on the second axis (train.steps_per_call)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    stacked = NamedSharding(sharding.mesh, P(None, "data"))
    out = {}
    for name, value in batch.items():
        shape = (value.shape[0], value.shape[1] * jax.process_count()) + value.shape[2:]
        check_batch_size(shape[1], sharding.mesh.shape["data"])
        out[name] = jax.make_array_from_process_local_data(stacked, value, shape)
    return out


def _batches(images, labels, steps, *, batch_size, seed, experience, flip, drop_last,
             sharding, extra, groups=None, group_size=None):
    rows = slice(None) if sharding is None else local_rows(sharding, batch_size)

    def one(step):
        batch = host_batch(images, labels, step, batch_size=batch_size, seed=seed,
                           experience=experience, flip=flip, drop_last=drop_last, rows=rows)
        if extra is not None:  # global rows: keep this process's share of each
            batch.update({name: value if sharding is None
                          else value[local_rows(sharding, len(value))]
                          for name, value in extra(step).items()})
        return batch

    if groups is None:
        for step in steps:
            batch = one(step)
            yield batch if sharding is None else shard_batch(batch, sharding)
        return
    steps, size = iter(steps), group_size or max(groups)
    for n in groups:
        parts = [one(next(steps)) for _ in range(n)]
        batch = {name: np.stack([p[name] for p in parts]
                                + [np.zeros_like(parts[0][name])] * (size - n))
                 for name in parts[0]}
        yield batch if sharding is None else shard_group(batch, sharding)


def batch_iterator(images: np.ndarray, labels: np.ndarray, *, batch_size: int, seed: int,
                   experience: int, start_step: int = 0, num_steps: int | None = None,
                   flip: bool = False, drop_last: bool = False, sharding=None,
                   prefetch: int = 2, extra=None, groups=None,
                   group_size: int | None = None) -> Prefetcher:
    """Batches at steps start_step, ..., num_steps - 1 (forever if None) of `experience`.

    Each is `host_batch`'s {"image": float32 [B, H, W, C], "label": int32 [B], "mask":
    float32 [B]}: numpy arrays, or, with a `sharding` (see `data_sharding`), global
    jax.Arrays sharded along the batch, placed on the devices by the background thread.
    `extra(step)`, if given, adds host arrays to each batch before it is placed (this
    process's rows of them; e.g. ER's memory rows). `num_steps` is the experience's total,
    so a run resumed at step s passes the same `num_steps` and `start_step=s`. `groups`
    (train.steps_per_call), sizes that sum to the steps: each yields the next n steps'
    batches as one, stacked on a new leading axis and padded with zeros to `group_size`
    (default: the largest; sharded by `shard_group`). `prefetch` batches are made (and placed)
    ahead in a background thread; 0 makes each in next(). Close the iterator (or use it in a
    `with`) to stop its thread.
    """
    steps_per_epoch(len(labels), batch_size, drop_last=drop_last)  # fail here, not in the thread
    if sharding is not None:
        check_batch_size(batch_size, sharding.mesh.shape["data"])
    steps = range(start_step, num_steps) if num_steps is not None else itertools.count(start_step)
    return Prefetcher(_batches(images, labels, steps, batch_size=batch_size, seed=seed,
                               experience=experience, flip=flip, drop_last=drop_last,
                               sharding=sharding, extra=extra, groups=groups,
                               group_size=group_size),
                      size=prefetch)
