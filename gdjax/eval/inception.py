"""Inception-v3 pool features for FID, computed as torchmetrics' FID computes them.

The network is the 2015-12-05 TensorFlow Inception graph of the original FID code, as
torch-fidelity and pytorch-fid port it (the weights torchmetrics' `FrechetInceptionDistance`
uses): average pools in Mixed_5*/6*/7b that do not count the padding, a max pool in the pool
branch of Mixed_7c, BatchNorm with eps 1e-3 and no conv biases. Here in Flax Linen, NHWC,
float32, inference only. The preprocessing is torchmetrics' with `normalize=True`
(REFERENCE §7): images in [0, 1] become uint8 by `(x * 255)` truncated toward zero, grey
images are repeated to 3 channels, TensorFlow 1's bilinear resize (no half-pixel centres,
no antialiasing) takes them to 299x299, and `(x - 128) / 128` scales them to [-1, 1].
That is torchmetrics up to 1.7 (the baseline's era) and the original TF FID; torchmetrics
1.8 made `antialias=True` the default, a different (half-pixel, antialiased) resize, which
`FrechetInceptionDistance(..., antialias=False)` turns back off.

Using it (FID of generated images against real ones, both NHWC float in [0, 1]):

    params = inception.load_inception()               # default_inception_dir(), once per run
    real = inception.pool_features(params, real01)    # float32 [N, 2048]
    fake = inception.pool_features(params, samples01)
    fid = metrics.frechet_distance(*metrics.feature_statistics(real),
                                   *metrics.feature_statistics(fake))

The weights are not shipped. They are the file torch-fidelity and pytorch-fid publish
(`TORCH_FIDELITY_URL`, `PYTORCH_FID_URL`; both names end in the SHA-256 prefix 6726825d,
which the conversion checks), converted once with
`python -m launch.convert_inception --src <file.pth>` (`convert_file`: `read_pth` needs torch,
then `convert_state_dict` checks every key and shape, then `save_inception`). They live in
`default_inception_dir()` (`~/.cache/gdjax/inception`, or $GDJAX_INCEPTION_DIR): Orbax params
under `params/` and a JSON record `inception.json`. Without them `load_inception` raises
FileNotFoundError carrying `fid_unavailable_message()` (where to download, how to convert);
`maybe_load_inception` logs that message and returns None, so a run can go on without FID.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

log = logging.getLogger(__name__)

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3
ENV_DIR = "GDJAX_INCEPTION_DIR"
META_FILE = "inception.json"
PARAMS_DIR = "params"
FORMAT = "gdjax-inception-v3-fid"
TORCH_FIDELITY_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                      "weights-inception-2015-12-05-6726825d.pth")
PYTORCH_FID_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
# The weight file also holds the 1008-way classifier; FID never uses it, so it is checked
# and dropped.
_CLASSIFIER_SHAPES = {"fc.weight": (1008, FEATURE_DIM), "fc.bias": (1008,)}
# A torch module's own state_dict() adds these counters; the published file has none.
_IGNORED_SUFFIX = ".num_batches_tracked"
_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


# ----------------------------------------------------------------------------- network

class FrozenBatchNorm(nn.Module):
    """Inference BatchNorm whose statistics are plain parameters (nothing here trains)."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU; `padding` is (rows, columns) on both sides."""

    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        # Full float32 convolutions: on GPUs the default would be TF32, whose ~1e-3 relative
        # error compounds over 94 layers; the cost is small next to sampling the images.
        x = nn.Conv(self.features, self.kernel, strides=self.strides,
                    padding=[(p, p) for p in self.padding], use_bias=False,
                    precision=jax.lax.Precision.HIGHEST, name="conv")(x)
        return nn.relu(FrozenBatchNorm(name="bn")(x))


def _avg_pool_3x3(x):
    # TensorFlow's pooling averages over the window's valid pixels only.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_3x3(x, stride: int):
    padding = ((1, 1), (1, 1)) if stride == 1 else "VALID"
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1x1, 5x5, double 3x3 and pool branches (35x35)."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: the 35x35 -> 17x17 reduction."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..6e: factorised 7x7 branches (17x17)."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: the 17x17 -> 8x8 reduction."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b/7c: split 1x3 + 3x1 branches (8x8). The 2015 graph pools Mixed_7c's pool
    branch with a max (`max_pool=True`) where Mixed_7b averages."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _max_pool_3x3(x, 1) if self.max_pool else _avg_pool_3x3(x)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """[N, 299, 299, 3] in [-1, 1] -> pool features [N, 2048]. Submodule names are the
    weight file's (torchvision's Inception3 names)."""

    @nn.compact
    def __call__(self, x):
        x = BasicConv2d(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x, 2)
        x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3(x, 2)
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool_features, name=name)(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                         ("Mixed_6e", 192)):
            x = InceptionC(c7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        return x.mean(axis=(1, 2))


@functools.lru_cache(maxsize=None)
def param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax path -> shape of every parameter of `InceptionV3` (traced, nothing computed)."""
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    tree = jax.eval_shape(InceptionV3().init, jax.random.key(0), x)["params"]
    return {path: tuple(s.shape) for path, s in traverse_util.flatten_dict(tree).items()}


# ----------------------------------------------------------------------------- weights in

def torch_key(path: tuple[str, ...]) -> str:
    """The weight file's key of the Flax parameter at `path` (e.g. Mixed_5b.branch1x1.bn.bias)."""
    *modules, leaf = path
    return ".".join(modules + ["weight" if leaf == "kernel" else _BN_NAMES[leaf]])


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 4:  # HWIO -> OIHW
        h, w, i, o = shape
        return (o, i, h, w)
    return shape


def expected_torch_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of the FID Inception weight file with its shape (torch layout)."""
    shapes = {torch_key(p): _torch_shape(s) for p, s in param_shapes().items()}
    return {**shapes, **_CLASSIFIER_SHAPES}


def _state_dict_problems(shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    expected = expected_torch_shapes()
    problems = [f"missing key {k!r} (expected shape {expected[k]})"
                for k in sorted(set(expected) - set(shapes))]
    problems += [f"unexpected key {k!r} (shape {shapes[k]})"
                 for k in sorted(set(shapes) - set(expected))]
    problems += [f"key {k!r}: expected shape {expected[k]}, found {shapes[k]}"
                 for k in sorted(set(shapes) & set(expected)) if shapes[k] != expected[k]]
    return problems


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict:
    """Flax params (nested dict of float32 numpy arrays) from the FID Inception weight file.

    `state_dict` maps the file's keys (torchvision Inception3 names: `Conv2d_1a_3x3.conv.weight`,
    `Mixed_5b.branch1x1.bn.running_var`, ..., `fc.weight`) to arrays. Every key and shape is
    checked first: a missing, unexpected or misshaped key is a ValueError naming it.
    `*.num_batches_tracked` counters are ignored; `fc.*` (the classifier) is checked, then
    dropped. Conv kernels go from OIHW to HWIO.
    """
    arrays = {k: np.asarray(v) for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIX)}
    problems = _state_dict_problems({k: tuple(v.shape) for k, v in arrays.items()})
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(
            f"not the FID Inception-v3 weights ({len(problems)} problems):\n  {shown}{more}\n"
            f"Expected the 'inception-2015-12-05' file of torch-fidelity or pytorch-fid "
            f"({TORCH_FIDELITY_URL}).")
    flat = {}
    for path, shape in param_shapes().items():
        value = arrays[torch_key(path)].astype(np.float32)
        if len(shape) == 4:
            value = np.ascontiguousarray(value.transpose(2, 3, 1, 0))
        flat[path] = value
    return traverse_util.unflatten_dict(flat)


def sha256_of(path: str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_download(path: str) -> str:
    """SHA-256 of `path`; ValueError when its name carries a torch-hub hash prefix
    (`...-6726825d.pth`) that the content does not match (a damaged or partial download)."""
    digest = sha256_of(path)
    stem = os.path.basename(path).rsplit(".", 1)[0]
    tag = stem.rsplit("-", 1)[-1] if "-" in stem else ""
    if len(tag) >= 8 and all(c in "0123456789abcdef" for c in tag) and not digest.startswith(tag):
        raise ValueError(f"{path}: its SHA-256 {digest[:16]}... does not start with {tag!r} as "
                         f"its name says; the download is damaged or incomplete, fetch it again "
                         f"from {TORCH_FIDELITY_URL}")
    return digest


def read_pth(path: str) -> dict[str, np.ndarray]:
    """The state dict in a .pth file as float32 numpy arrays (`weights_only`: no pickled
    code runs). The one function here that needs torch, so it imports it itself."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs torch (pip install torch; the CPU build is "
                          "enough). Only converting the weights needs it.") from e
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
    return {k: v.detach().float().numpy() for k, v in state_dict.items()}


def convert_file(src: str, dst: str | None = None) -> str:
    """Checks and converts the .pth weight file `src` into `dst` (default
    `default_inception_dir()`); returns `dst`. Errors name the file and the problem."""
    if not os.path.isfile(src):
        raise FileNotFoundError(f"no such weight file: {src}; download it from "
                                f"{TORCH_FIDELITY_URL}")
    sha256 = check_download(src)
    try:
        params = convert_state_dict(read_pth(src))
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None
    dst = os.path.abspath(dst or default_inception_dir())
    save_inception(dst, params, source=os.path.basename(src), sha256=sha256)
    return dst


# ----------------------------------------------------------------------------- preprocessing

def _check_images(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or 0 in images.shape:
        raise ValueError(f"images must be NHWC [N >= 1, H, W, 1 or 3], got shape {images.shape}"
                         " (NCHW arrays need .transpose(0, 2, 3, 1))")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be floats in [0, 1], got dtype {images.dtype} "
                         "(divide uint8 images by 255)")
    if not np.isfinite(images).all():
        raise ValueError("images hold NaN or infinite values")
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"images must lie in [0, 1], found values in [{low:g}, {high:g}]; "
                         "map [-1, 1] images with (x + 1) / 2 and clip with np.clip(x, 0, 1)")
    return images


def to_uint8(images) -> np.ndarray:
    """torchmetrics' `(imgs * 255).byte()`: NHWC floats in [0, 1] -> uint8, truncated toward
    zero after a float32 product (so 0.999 -> 254, 0.5 -> 127). Bad input is a ValueError."""
    images = _check_images(images)
    return (images.astype(np.float32) * np.float32(255)).astype(np.uint8)


def _tf1_grid(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(low index, high index, fraction) per output pixel of TF1's bilinear resize with
    align_corners=False: source = out * (in / out), in float32 as TensorFlow 1 computes it."""
    source = np.arange(out_size, dtype=np.float32) * np.float32(in_size / out_size)
    low = source.astype(np.int32)  # floor: source >= 0
    high = np.minimum(low + 1, in_size - 1)
    return low, high, source - low.astype(np.float32)


def resize_tf1(x: jnp.ndarray, size: int = INPUT_SIZE) -> jnp.ndarray:
    """TensorFlow 1.x `resize_bilinear` (align_corners=False, no half-pixel centres) of NHWC
    floats to [N, size, size, C], as torch-fidelity reproduces it: interpolate along the
    width in the two source rows, then between them."""
    y0, y1, dy = _tf1_grid(x.shape[1], size)
    x0, x1, dx = _tf1_grid(x.shape[2], size)
    dx, dy = dx[None, None, :, None], dy[None, :, None, None]
    top, bottom = x[:, y0], x[:, y1]
    top = top[:, :, x0] + (top[:, :, x1] - top[:, :, x0]) * dx
    bottom = bottom[:, :, x0] + (bottom[:, :, x1] - bottom[:, :, x0]) * dx
    return top + (bottom - top) * dy


@jax.jit
def _preprocess(images_uint8: jnp.ndarray) -> jnp.ndarray:
    x = images_uint8.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    return (resize_tf1(x) - 128.0) / 128.0


@jax.jit
def _network(params, x: jnp.ndarray) -> jnp.ndarray:
    return InceptionV3().apply({"params": params}, x)


def pool_features(params, images, *, batch_size: int = 100) -> np.ndarray:
    """Inception pool features, float32 [N, 2048], of NHWC images in [0, 1] (1 or 3 channels,
    any size), preprocessed as torchmetrics' FID with normalize=True does; `params` come
    from `load_inception` (or `convert_state_dict`). Runs on the default device.

    Runs `batch_size` images at a time (fewer: the next power of two above N), padding the
    last batch, so the network compiles once per batch size whatever the image size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = to_uint8(images)
    n = len(images)
    batch_size = min(batch_size, 1 << (n - 1).bit_length())
    out = []
    for start in range(0, n, batch_size):
        batch = images[start:start + batch_size]
        pad = batch_size - len(batch)
        if pad:
            batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], np.uint8)])
        features = jax.device_get(_network(params, _preprocess(batch)))
        out.append(features[:batch_size - pad])
    return np.concatenate(out)


# ----------------------------------------------------------------------------- saving

def default_inception_dir() -> str:
    """$GDJAX_INCEPTION_DIR, or `~/.cache/gdjax/inception`."""
    path = os.environ.get(ENV_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "gdjax",
                                                    "inception")
    return os.path.abspath(path)


def fid_unavailable_message(path: str | None = None) -> str:
    """Why FID cannot be computed and how to make it available (get and convert the weights)."""
    path = os.path.abspath(path or default_inception_dir())
    return (f"FID is unavailable: no converted Inception-v3 weights in {path} (no {META_FILE}). "
            f"Download the FID Inception weights (the TF 2015-12-05 graph ported to PyTorch), "
            f"either {TORCH_FIDELITY_URL} or the same weights from pytorch-fid, "
            f"{PYTORCH_FID_URL}, then convert them once (needs torch): "
            f"`python -m launch.convert_inception --src <the .pth file> --dst {path}`. "
            f"Another directory can be chosen with ${ENV_DIR}.")


def _shape_problems(shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> list[str]:
    expected = param_shapes()
    name = "/".join
    problems = [f"{name(p)}: expected shape {expected[p]}, found {shapes[p]}"
                for p in sorted(set(shapes) & set(expected)) if shapes[p] != expected[p]]
    problems += [f"unexpected {name(p)}" for p in sorted(set(shapes) - set(expected))]
    missing = sorted(set(expected) - set(shapes))
    if missing:
        problems.append(f"{len(missing)} missing, the first {name(missing[0])}")
    return problems


def save_inception(path: str, params, *, source: str = "", sha256: str = "") -> None:
    """Writes converted params (Orbax, path/params) and a JSON record (path/inception.json)
    of where they came from. The JSON goes last, atomically: without it the directory counts
    as empty. Params of another shape are a ValueError."""
    flat = traverse_util.flatten_dict(params)
    problems = _shape_problems({p: tuple(np.shape(v)) for p, v in flat.items()})
    if problems:
        raise ValueError("params are not InceptionV3's: " + "; ".join(problems[:10]))
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    meta_path = os.path.join(path, META_FILE)
    if os.path.exists(meta_path):
        os.remove(meta_path)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, PARAMS_DIR), params, force=True)
        ckptr.wait_until_finished()
    meta = {"format": FORMAT, "version": 1, "feature_dim": FEATURE_DIM, "source": source,
            "sha256": sha256}
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(meta_path + ".tmp", meta_path)


def _check_saved(path: str) -> None:
    meta_path = os.path.join(path, META_FILE)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e}); convert the weights again "
                         "with `python -m launch.convert_inception`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else meta
        raise ValueError(f"{meta_path} is not a gdjax Inception record (format {found!r}, "
                         f"expected {FORMAT!r})")
    params_dir = os.path.join(path, PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise FileNotFoundError(f"{params_dir} is missing. " + fid_unavailable_message(path))
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.metadata(params_dir).item_metadata.tree
    flat = traverse_util.flatten_dict(tree)
    problems = _shape_problems({p: tuple(m.shape) for p, m in flat.items()})
    if problems:
        raise ValueError(f"{params_dir} does not hold InceptionV3 params: "
                         + "; ".join(problems[:10]) + ". Convert the weights again with "
                         "`python -m launch.convert_inception`.")


def load_inception(path: str | None = None):
    """Params saved by `save_inception` (default `default_inception_dir()`), as float32 jax
    arrays. FileNotFoundError with `fid_unavailable_message` when there are none; ValueError
    naming the file when they are not InceptionV3's."""
    path = os.path.abspath(path or default_inception_dir())
    if not os.path.isfile(os.path.join(path, META_FILE)):
        raise FileNotFoundError(fid_unavailable_message(path))
    _check_saved(path)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    template = traverse_util.unflatten_dict({
        p: jax.ShapeDtypeStruct(s, jnp.float32, sharding=device)
        for p, s in param_shapes().items()})
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.join(path, PARAMS_DIR), template)


def maybe_load_inception(path: str | None = None):
    """`load_inception(path)`, or None with a warning saying how to get the weights."""
    try:
        return load_inception(path)
    except FileNotFoundError as e:
        log.warning("%s", e)
        return None
