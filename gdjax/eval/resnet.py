"""torchvision's ResNet-18 in Flax Linen (NHWC), and torchvision-layout weights in.

The evaluation classifier of REFERENCE §7: a 7x7/2 convolution stem, a 3x3/2 max pool, four
stages of two `BasicBlock`s (64, 128, 256, 512 channels), global average pooling and a linear
head. Module and variable names follow torchvision so that a state dict maps key by key:
Flax `layer2_0/downsample_1/running_var` is torch `layer2.0.downsample.1.running_var`, and a
convolution or linear `kernel` is torch's `weight` (transposed, OIHW -> HWIO, (out, in) ->
(in, out)).

Inputs are NHWC in [-1, 1] with 3 channels; grey images (1 channel) are repeated to 3 channels
by the module itself, so callers pass images as the data sets store them and the stem always
has torchvision's (64, 3, 7, 7) weight. `ResNet18.features` gives the 512-d globally pooled
activations (the features of `fd_classifier`), `logits_and_features` both outputs.

- `variables_from_torch(state_dict)`: a torchvision-layout state dict (numpy arrays or CPU
  tensors) -> `{"params": ..., "batch_stats": ...}`, every key and shape checked;
- `load_torch_state_dict(path)`: reads a `.pth` file (needs torch) into numpy arrays.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

FEATURE_DIM = 512
STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))  # (channels, stride of the first block)
BLOCKS_PER_STAGE = 2
# torch's BatchNorm2d defaults: running = (1 - momentum) * running + momentum * batch.
BN_MOMENTUM = 0.1
BN_EPSILON = 1e-5

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", relu) and its
# linear layers with U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (weight and bias alike).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _linear_bias_init(fan_in: int):
    bound = 1.0 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype,
                                                                     -bound, bound)


class BatchNorm(nn.Module):
    """torch's BatchNorm2d over the last (channel) axis, with torch's variable names.

    Flax's own BatchNorm updates the running variance with the biased batch variance;
    torch uses the unbiased one (times n / (n - 1)) while normalising with the biased one.
    This follows torch, so running statistics agree after training steps too.
    """

    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON

    @nn.compact
    def __call__(self, x, *, train: bool):
        c = x.shape[-1]
        weight = self.param("weight", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        running_mean = self.variable("batch_stats", "running_mean", jnp.zeros, (c,))
        running_var = self.variable("batch_stats", "running_var", jnp.ones, (c,))
        if train:
            axes = tuple(range(x.ndim - 1))
            n = x.size // c
            if n < 2:
                raise ValueError(f"BatchNorm in training needs more than one value per "
                                 f"channel, got input shape {x.shape}: use a larger batch.")
            mean = x.mean(axes)
            var = jnp.square(x - mean).mean(axes)
            if not self.is_initializing():
                m = self.momentum
                stop = jax.lax.stop_gradient
                running_mean.value = (1 - m) * running_mean.value + m * stop(mean)
                running_var.value = (1 - m) * running_var.value + m * stop(var) * n / (n - 1)
        else:
            mean, var = running_mean.value, running_var.value
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * weight + bias


class Conv(nn.Module):
    """A bias-free square convolution padded as torch pads it, (size - 1) // 2 on each side
    ("SAME" would pad stride-2 layers unevenly). Kernel HWIO, named `kernel`.

    On a 1x1 input only the kernel's centre tap meets a pixel (the rest meet padding), so
    the convolution is a matrix product with that tap: the same numbers, but XLA:CPU spent
    about 5x longer on the padded convolution (digits ResNet-18 training step at batch 64,
    2 cores: 0.9 s -> 0.18 s), whose last stages run at 1x1.
    """

    features: int
    size: int
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", _conv_init,
                            (self.size, self.size, x.shape[-1], self.features))
        pad = (self.size - 1) // 2
        if x.shape[1:3] == (1, 1):
            return jnp.einsum("nhwi,io->nhwo", x, kernel[pad, pad])
        return jax.lax.conv_general_dilated(
            x, kernel, (self.stride, self.stride), ((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm, plus the (projected) input: torchvision's
    BasicBlock. The projection (`downsample`, 1x1 convolution and BatchNorm) exists when the
    block changes the stride or the channel count."""

    planes: int
    stride: int = 1
    project: bool = False

    def setup(self):
        self.conv1 = Conv(self.planes, 3, self.stride)
        self.bn1 = BatchNorm()
        self.conv2 = Conv(self.planes, 3)
        self.bn2 = BatchNorm()
        if self.project:
            self.downsample = [Conv(self.planes, 1, self.stride), BatchNorm()]

    def __call__(self, x, *, train: bool):
        out = nn.relu(self.bn1(self.conv1(x), train=train))
        out = self.bn2(self.conv2(out), train=train)
        identity = x
        if self.project:
            conv, bn = self.downsample
            identity = bn(conv(x), train=train)
        return nn.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision's resnet18 with a `num_classes`-way head. Inputs NHWC in [-1, 1] with 1
    (repeated to 3) or 3 channels, any size >= 1 px after the four stride-2 stages
    (16x16 and 32x32 both work; torch's adaptive average pool is a global mean here)."""

    num_classes: int = 10

    def setup(self):
        self.conv1 = Conv(64, 7, 2)
        self.bn1 = BatchNorm()
        in_planes, stages = 64, []
        for planes, stride in STAGES:
            blocks = []
            for b in range(BLOCKS_PER_STAGE):
                s = stride if b == 0 else 1
                blocks.append(BasicBlock(planes, s, project=(s != 1 or in_planes != planes)))
                in_planes = planes
            stages.append(blocks)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Dense(self.num_classes, kernel_init=_linear_init,
                           bias_init=_linear_bias_init(FEATURE_DIM))

    def features(self, x, *, train: bool = False):
        """[N, 512]: the globally average-pooled activations of the last stage."""
        x = to_three_channels(x)
        x = nn.relu(self.bn1(self.conv1(x), train=train))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x, train=train)
        return x.mean(axis=(1, 2))

    def logits_and_features(self, x, *, train: bool = False):
        h = self.features(x, train=train)
        return self.fc(h), h

    def __call__(self, x, *, train: bool = False):
        return self.logits_and_features(x, train=train)[0]


def to_three_channels(x):
    """NHWC images with 3 channels; a single grey channel is repeated (REFERENCE §7)."""
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"ResNet18 reads NHWC images with 1 or 3 channels, got shape "
                         f"{x.shape}")
    return jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def init_variables(rng: jax.Array, num_classes: int = 10, image_size: int = 32):
    """Fresh `{"params", "batch_stats"}` of a ResNet18 (initialised as torchvision does)."""
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return dict(ResNet18(num_classes=num_classes).init(rng, x))


# ----------------------------------------------------------------------------- torch weights in

# Flax list entries ("layer1_0", "downsample_1") are torch list indices ("layer1.0").
_LIST_ENTRY = re.compile(r"^(layer\d|downsample)_(\d+)$")
# torch counts BatchNorm updates; with a fixed momentum the count changes nothing.
_IGNORED_SUFFIX = ".num_batches_tracked"


def torch_key(path: tuple[str, ...]) -> str:
    """The torchvision state-dict key of the Flax variable at `path` (collection first)."""
    _, *modules, leaf = path
    parts = [_LIST_ENTRY.sub(r"\1.\2", m) for m in modules]
    return ".".join(parts + ["weight" if leaf == "kernel" else leaf])


def _to_flax_layout(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:  # conv OIHW -> HWIO
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2:  # linear (out, in) -> (in, out)
        return array.T
    return array


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(flax_shape) == 4:
        h, w, i, o = flax_shape
        return (o, i, h, w)
    return tuple(flax_shape[::-1]) if len(flax_shape) == 2 else tuple(flax_shape)


def variables_from_torch(state_dict: Mapping[str, Any]) -> dict:
    """`{"params", "batch_stats"}` of a ResNet18 from a torchvision-layout state dict.

    The head's size is read from `fc.weight`; every other key and shape must be exactly
    torchvision resnet18's (`*.num_batches_tracked` may be present or not). A missing, extra
    or misshaped key is a ValueError naming it.
    """
    if "fc.weight" not in state_dict:
        raise ValueError("the state dict has no 'fc.weight': not a torchvision ResNet-18 "
                         f"(keys start {sorted(state_dict)[:5]})")
    num_classes = int(np.shape(state_dict["fc.weight"])[0])
    template = jax.eval_shape(lambda: init_variables(jax.random.key(0), num_classes))
    flat = traverse_util.flatten_dict(template)
    wanted = {torch_key(path): path for path in flat}
    given = {k for k in state_dict if not k.endswith(_IGNORED_SUFFIX)}
    missing, extra = sorted(set(wanted) - given), sorted(given - set(wanted))
    if missing or extra:
        raise ValueError(f"the state dict is not torchvision resnet18's: missing keys "
                         f"{missing[:8]}, unexpected keys {extra[:8]}")
    out = {}
    for key, path in wanted.items():
        array = np.asarray(state_dict[key], np.float32)
        expected = _torch_shape(flat[path].shape)
        if array.shape != expected:
            raise ValueError(f"'{key}' has shape {array.shape}, resnet18 with "
                             f"{num_classes} classes needs {expected}")
        out[path] = jnp.asarray(_to_flax_layout(array))
    return traverse_util.unflatten_dict(out)


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """The tensors of a `.pth` state dict (torch.save(model.state_dict())) as numpy arrays.

    Needs torch (requirements-test.txt); reads with `weights_only=True`, so no code in the
    file runs.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no state dict file at {path}")
    try:
        import torch
    except ImportError as e:
        raise ImportError("reading a .pth file needs torch: pip install -r "
                          "requirements-test.txt") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (save one with "
                         f"torch.save(model.state_dict(), path))")
    return {k: v.detach().float().numpy() for k, v in state.items()}
