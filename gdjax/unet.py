"""The denoiser: diffusers' `UNet2DModel` (default options) as a Flax Linen module.

`UNet(config)(x, t)` maps noisy NHWC images `x` [B, H, W, C] and timesteps `t` ([B] or a
scalar, int or float) to the predicted noise, with the shape of `x`.

The layout follows diffusers so that weights convert key by key (see `gdjax/convert.py`):
a sinusoidal time projection and a two-layer time MLP, `conv_in`, down blocks (ResNet blocks,
optional self-attention, a stride-2 conv), a mid block (ResNet, attention, ResNet), up blocks
that concatenate the stored skips in reverse order (ResNet blocks, optional attention, nearest
x2 upsampling + conv), then GroupNorm, SiLU and `conv_out`. Flax module names mirror the torch
attribute paths with `.N` written `_N` (`down_blocks_0/resnets_0/conv1`).

Parameters are always float32; activations are computed in `config.dtype`, with GroupNorm
statistics, the time embedding and the attention softmax kept in float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D")
_DTYPES = ("float32", "bfloat16", "float16")

# Options of diffusers' UNet2DModel that gdjax implements only at their default value.
_FIXED_DIFFUSERS_OPTIONS = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attn_norm_num_groups": None,
    "resnet_time_scale_shift": "default",
    "class_embed_type": None,
}
# Config keys that never change the computation of a positional-embedding UNet2DModel.
_IGNORED_DIFFUSERS_KEYS = ("num_train_timesteps",)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of a `UNet2DModel`; field names are diffusers' config.json keys.

    Hashable (tuples only), so it can be a static argument of `jax.jit`. `attention_head_dim`
    None means one head as wide as the block, as in diffusers. Construction validates.
    """

    sample_size: int
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    attention_head_dim: int | None = 8
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    add_attention: bool = True
    # Class conditioning (diffusers' nn.Embedding class embedding, added to the time
    # embedding): the number of labels, a null label for classifier-free guidance included
    # where one is wanted; None: unconditional.
    num_class_embeds: int | None = None
    dtype: str = "float32"

    def __post_init__(self):
        # Lists (from JSON or callers) become tuples so that the config stays hashable.
        for name in ("block_out_channels", "down_block_types", "up_block_types"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        self.validate()

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    def attention_widths(self) -> list[tuple[str, int]]:
        """(field, width) of every place with attention, for validation and head counts."""
        widths = [(f"down_block_types[{i}]", w)
                  for i, (kind, w) in enumerate(zip(self.down_block_types, self.block_out_channels))
                  if kind.startswith("Attn")]
        reversed_widths = self.block_out_channels[::-1]
        widths += [(f"up_block_types[{i}]", w)
                   for i, (kind, w) in enumerate(zip(self.up_block_types, reversed_widths))
                   if kind.startswith("Attn")]
        if self.add_attention:
            widths.append(("add_attention", self.block_out_channels[-1]))
        return widths

    def validate(self) -> None:
        """Raises ValueError naming the first offending field and its value."""
        _check_types(self)
        _check_blocks(self)
        _check_widths(self)
        _check_sizes(self)

    def to_diffusers(self) -> dict[str, Any]:
        """Keyword arguments for `diffusers.UNet2DModel(**...)` (also its config.json keys)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "dtype"}
        for name in ("block_out_channels", "down_block_types", "up_block_types"):
            out[name] = list(out[name])
        out.update(_FIXED_DIFFUSERS_OPTIONS)
        return out

    @classmethod
    def from_diffusers(cls, config: dict[str, Any], dtype: str = "float32") -> "UNetConfig":
        """Reads a diffusers UNet2DModel config.json dict; rejects options gdjax lacks."""
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        widths = config.get("block_out_channels") or [0]
        for key, default in _FIXED_DIFFUSERS_OPTIONS.items():
            value = config.pop(key, default)
            if key == "time_embedding_dim" and value == 4 * widths[0]:
                continue  # spelling out the default width is fine
            if value != default:
                raise ValueError(
                    f"diffusers config {key}={value!r} is not supported by gdjax.unet "
                    f"(only the default {default!r} is implemented)")
        for key in _IGNORED_DIFFUSERS_KEYS:
            config.pop(key, None)
        fields = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise ValueError(f"diffusers config has keys gdjax.unet does not know: {unknown}")
        missing = sorted(f for f in fields - set(config) if f not in _OPTIONAL_FIELDS)
        if missing:
            raise ValueError(f"diffusers config lacks required keys: {missing}")
        config["sample_size"] = _square_size(config["sample_size"])
        return cls(**config, dtype=dtype)


_OPTIONAL_FIELDS = {f.name for f in dataclasses.fields(UNetConfig)
                    if f.default is not dataclasses.MISSING}


def _square_size(size) -> int:
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"UNetConfig.sample_size={size!r}: only square sizes are supported")
        size = size[0]
    return size


def _fail(field: str, value, why: str):
    raise ValueError(f"UNetConfig.{field}={value!r}: {why}")


def _check_types(c: UNetConfig) -> None:
    for name in ("sample_size", "in_channels", "out_channels", "layers_per_block",
                 "norm_num_groups"):
        value = getattr(c, name)
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            _fail(name, value, "must be a positive int")
    if not c.block_out_channels or any(
            not isinstance(w, (int, np.integer)) or w < 1 for w in c.block_out_channels):
        _fail("block_out_channels", c.block_out_channels, "must be a non-empty tuple of positive ints")
    if not c.norm_eps > 0:
        _fail("norm_eps", c.norm_eps, "must be > 0")
    if c.dtype not in _DTYPES:
        _fail("dtype", c.dtype, f"must be one of {_DTYPES}")
    head = c.attention_head_dim
    if head is not None and (not isinstance(head, (int, np.integer)) or head < 1):
        _fail("attention_head_dim", head, "must be a positive int or None")
    classes = c.num_class_embeds
    if classes is not None and (not isinstance(classes, (int, np.integer))
                                or isinstance(classes, bool) or classes < 1):
        _fail("num_class_embeds", classes, "must be a positive int or None (unconditional)")


def _check_blocks(c: UNetConfig) -> None:
    n = len(c.block_out_channels)
    for field, known in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
        kinds = getattr(c, field)
        for i, kind in enumerate(kinds):
            if kind not in known:
                _fail(f"{field}[{i}]", kind, f"unknown block type; known: {known}")
        if len(kinds) != n:
            _fail(field, kinds, f"has {len(kinds)} blocks but block_out_channels has {n}")


def _check_widths(c: UNetConfig) -> None:
    for w in c.block_out_channels:
        if w % c.norm_num_groups:
            _fail("block_out_channels", c.block_out_channels,
                  f"width {w} is not divisible by norm_num_groups={c.norm_num_groups}")
    if c.attention_head_dim is not None:
        for field, w in c.attention_widths():
            if w % c.attention_head_dim:
                _fail("attention_head_dim", c.attention_head_dim,
                      f"does not divide width {w} of the attention at {field}")
    half = c.block_out_channels[0] // 2
    if half - c.freq_shift == 0:
        _fail("freq_shift", c.freq_shift, f"equals half the time embedding width ({half})")


def _check_sizes(c: UNetConfig) -> None:
    factor = 2 ** (len(c.block_out_channels) - 1)
    if c.sample_size % factor:
        _fail("sample_size", c.sample_size,
              f"must be divisible by {factor} (2**(number of blocks - 1) downsamplings)")


# ---------------------------------------------------------------- named configs

def _named_configs() -> dict[str, UNetConfig]:
    return {
        # The paper's Fashion-MNIST / MNIST denoiser.
        "ddim_medium": UNetConfig(
            sample_size=32, in_channels=1, out_channels=1,
            block_out_channels=(64, 128, 256, 512), layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D")),
        # The paper's CIFAR-10 denoiser.
        "ddim_medium_3ch": UNetConfig(
            sample_size=32, in_channels=3, out_channels=3,
            block_out_channels=(128, 256, 256, 256), layers_per_block=2,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
        # A small model for the 8x8 scikit-learn digits resized to 16x16: CPU-trainable.
        # Attention in the mid block only (shared/DIGITS.md): attention at 8x8 cost a
        # third of the train step on XLA:CPU (generative distillation 349 -> 226 ms).
        "digits": UNetConfig(
            sample_size=16, in_channels=1, out_channels=1,
            block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3),
        # For fast tests; still has one attention block of each kind plus the mid attention.
        "tiny": UNetConfig(
            sample_size=16, in_channels=1, out_channels=1,
            block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D")),
    }


def get_unet_config(name: str, **overrides) -> UNetConfig:
    """A named architecture (`ddim_medium`, `ddim_medium_3ch`, `digits`, `tiny`), overridable."""
    configs = _named_configs()
    if name not in configs:
        raise ValueError(f"unknown UNet config {name!r}; known: {sorted(configs)}")
    return dataclasses.replace(configs[name], **overrides)


# ---------------------------------------------------------------- layers

def _torch_default_init(fan_in: int):
    """Kernel and bias initialisers matching torch's defaults for Conv2d/Linear.

    Training from scratch then starts where the paper's diffusers models start.
    """
    bound = 1.0 / math.sqrt(fan_in)
    kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

    def bias(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return kernel, bias


def _conv(x, features: int, name: str, dtype, kernel: int = 3, stride: int = 1):
    # Explicit symmetric padding: "SAME" would pad (0, 1) for stride 2, unlike torch's padding=1.
    pad = kernel // 2
    k_init, b_init = _torch_default_init(kernel * kernel * x.shape[-1])
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), dtype=dtype, param_dtype=jnp.float32,
                   kernel_init=k_init, bias_init=b_init, name=name)(x)


def _dense(x, features: int, name: str, dtype):
    k_init, b_init = _torch_default_init(x.shape[-1])
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=k_init, bias_init=b_init, name=name)(x)


def _group_norm(x, groups: int, eps: float, name: str, dtype):
    # Two-pass variance: closer to torch than E[x^2] - E[x]^2 (and safer in bf16).
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
                        use_fast_variance=False, name=name)(x)


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [B, dim] of timesteps [B], in float32 (as DDPM / diffusers)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
    parts = [jnp.cos(angles), jnp.sin(angles)] if flip_sin_to_cos else [jnp.sin(angles), jnp.cos(angles)]
    emb = jnp.concatenate(parts, axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """The time MLP: linear -> SiLU -> linear."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, emb):
        emb = _dense(emb.astype(self.dtype), self.features, "linear_1", self.dtype)
        return _dense(nn.silu(emb), self.features, "linear_2", self.dtype)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, time embedding added in between, 1x1 conv shortcut."""

    out_channels: int
    groups: int
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb):
        h = _conv(nn.silu(_group_norm(x, self.groups, self.eps, "norm1", self.dtype)),
                  self.out_channels, "conv1", self.dtype)
        h = h + _dense(nn.silu(temb), self.out_channels, "time_emb_proj", self.dtype)[:, None, None, :]
        h = _conv(nn.silu(_group_norm(h, self.groups, self.eps, "norm2", self.dtype)),
                  self.out_channels, "conv2", self.dtype)
        if x.shape[-1] != self.out_channels:
            x = _conv(x, self.out_channels, "conv_shortcut", self.dtype, kernel=1)
        return x + h


class SpatialAttention(nn.Module):
    """Residual multi-head self-attention over the H*W positions, GroupNorm first."""

    head_dim: int | None
    groups: int
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, height, width, c = x.shape
        head_dim = self.head_dim or c
        heads = c // head_dim
        h = _group_norm(x, self.groups, self.eps, "group_norm", self.dtype).reshape(b, height * width, c)
        q, k, v = (_dense(h, heads * head_dim, name, self.dtype).reshape(b, -1, heads, head_dim)
                   for name in ("to_q", "to_k", "to_v"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        # Softmax in float32 whatever the compute dtype (diffusers' upcast_softmax).
        weights = jax.nn.softmax(logits / math.sqrt(head_dim), axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, -1, heads * head_dim)
        out = _dense(out, c, "to_out_0", self.dtype)
        return x + out.reshape(b, height, width, c)


class Downsample2D(nn.Module):
    """3x3 conv with stride 2 and padding 1."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _conv(x, x.shape[-1], "conv", self.dtype, stride=2)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(x, x.shape[-1], "conv", self.dtype)


class DownBlock(nn.Module):
    """DownBlock2D / AttnDownBlock2D: returns the output and the skips it stores."""

    out_channels: int
    num_layers: int
    attention: bool
    add_downsample: bool
    groups: int
    eps: float
    head_dim: int | None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb):
        skips = []
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, self.eps, self.dtype,
                              name=f"resnets_{i}")(x, temb)
            if self.attention:
                x = SpatialAttention(self.head_dim, self.groups, self.eps, self.dtype,
                                     name=f"attentions_{i}")(x)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """UpBlock2D / AttnUpBlock2D: each ResNet first concatenates the latest remaining skip."""

    out_channels: int
    num_layers: int
    attention: bool
    add_upsample: bool
    groups: int
    eps: float
    head_dim: int | None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, skips: Sequence[jax.Array], temb):
        skips = list(skips)
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
            x = ResnetBlock2D(self.out_channels, self.groups, self.eps, self.dtype,
                              name=f"resnets_{i}")(x, temb)
            if self.attention:
                x = SpatialAttention(self.head_dim, self.groups, self.eps, self.dtype,
                                     name=f"attentions_{i}")(x)
        if self.add_upsample:
            x = Upsample2D(self.dtype, name="upsamplers_0")(x)
        return x


class MidBlock(nn.Module):
    """UNetMidBlock2D: ResNet, optional attention, ResNet at the lowest resolution."""

    groups: int
    eps: float
    head_dim: int | None
    add_attention: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb):
        c = x.shape[-1]
        x = ResnetBlock2D(c, self.groups, self.eps, self.dtype, name="resnets_0")(x, temb)
        if self.add_attention:
            x = SpatialAttention(self.head_dim, self.groups, self.eps, self.dtype,
                                 name="attentions_0")(x)
        return ResnetBlock2D(c, self.groups, self.eps, self.dtype, name="resnets_1")(x, temb)


class UNet(nn.Module):
    """`UNet(config)(x, t)`: noise prediction for NHWC `x` and timesteps `t` ([B] or scalar);
    with `config.num_class_embeds`, `UNet(config)(x, t, class_labels)` ([B] ints)."""

    config: UNetConfig

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, class_labels=None) -> jax.Array:
        c = self.config
        c.validate()  # cheap, and runs at trace time, before XLA compiles anything
        dtype = jnp.dtype(c.dtype)
        factor = 2 ** (len(c.block_out_channels) - 1)
        if x.ndim != 4 or x.shape[-1] != c.in_channels or (x.shape[1] % factor
                                                           or x.shape[2] % factor):
            raise ValueError(f"UNet expects NHWC input with {c.in_channels} channels and sides "
                             f"divisible by {factor}, got shape {x.shape}")
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        temb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        temb = TimestepEmbedding(c.time_embed_dim, dtype, name="time_embedding")(temb)
        if c.num_class_embeds is not None:
            if class_labels is None:
                raise ValueError(f"this UNet is class-conditional (num_class_embeds="
                                 f"{c.num_class_embeds}): pass class_labels [B]")
            labels = jnp.broadcast_to(jnp.asarray(class_labels, jnp.int32), (x.shape[0],))
            temb = temb + nn.Embed(c.num_class_embeds, c.time_embed_dim, dtype=dtype,
                                   name="class_embedding")(labels)
        elif class_labels is not None:
            raise ValueError("class_labels given to an unconditional UNet: set "
                             "num_class_embeds in its config to condition on classes")

        h = _conv(x.astype(dtype), c.block_out_channels[0], "conv_in", dtype)
        skips = [h]
        h = self._down(h, temb, skips)
        h = MidBlock(c.norm_num_groups, c.norm_eps, c.attention_head_dim, c.add_attention,
                     dtype, name="mid_block")(h, temb)
        h = self._up(h, temb, skips)

        h = nn.silu(_group_norm(h, c.norm_num_groups, c.norm_eps, "conv_norm_out", dtype))
        return _conv(h, c.out_channels, "conv_out", dtype).astype(x.dtype)

    def _down(self, h, temb, skips: list):
        c = self.config
        n = len(c.block_out_channels)
        for i, (kind, width) in enumerate(zip(c.down_block_types, c.block_out_channels)):
            h, block_skips = DownBlock(
                width, c.layers_per_block, kind == "AttnDownBlock2D", i < n - 1,
                c.norm_num_groups, c.norm_eps, c.attention_head_dim, jnp.dtype(c.dtype),
                name=f"down_blocks_{i}")(h, temb)
            skips.extend(block_skips)
        return h

    def _up(self, h, temb, skips: list):
        c = self.config
        n = len(c.block_out_channels)
        num_layers = c.layers_per_block + 1
        for i, (kind, width) in enumerate(zip(c.up_block_types, c.block_out_channels[::-1])):
            block_skips = skips[-num_layers:]
            del skips[-num_layers:]
            h = UpBlock(
                width, num_layers, kind == "AttnUpBlock2D", i < n - 1,
                c.norm_num_groups, c.norm_eps, c.attention_head_dim, jnp.dtype(c.dtype),
                name=f"up_blocks_{i}")(h, block_skips, temb)
        return h


# ---------------------------------------------------------------- parameters

def init_params(config: UNetConfig, rng: jax.Array) -> dict:
    """Fresh float32 parameters (a plain nested dict) for `UNet(config)`.

    Same distribution as the modules' own initialisers (torch's defaults: conv and linear
    weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), GroupNorm scale 1 and bias 0),
    but drawn in one random call: `UNet(config).init` has one threefry per parameter, which
    takes XLA:CPU tens of seconds to compile.
    """
    flat = flax.traverse_util.flatten_dict(param_shapes(config))
    return flax.traverse_util.unflatten_dict(_draw_params(flat, rng))


def _leaf_bound(path: tuple[str, ...], flat: dict) -> float | None:
    """The half-width of a leaf's uniform init, or None for a GroupNorm (constant) leaf
    (and for the class embedding, drawn from N(0, 1) as torch's nn.Embedding)."""
    kernel = flat.get(path[:-1] + ("kernel",))
    if kernel is None:
        return None
    return 1.0 / math.sqrt(np.prod(kernel.shape[:-1]))


def _draw_params(flat: dict, rng: jax.Array) -> dict:
    bounds = {path: _leaf_bound(path, flat) for path in flat}
    random_paths = [p for p in flat if bounds[p] is not None]
    sizes = [int(np.prod(flat[p].shape)) for p in random_paths]
    # Cut on the host: slicing ~100 pieces inside XLA would cost more compile than it saves.
    u = np.asarray(jax.random.uniform(rng, (sum(sizes),), jnp.float32, -1.0, 1.0))
    chunks = dict(zip(random_paths, np.split(u, np.cumsum(sizes)[:-1])))
    params = {}
    for i, (path, leaf) in enumerate(flat.items()):
        if path[-1] == "embedding":
            params[path] = np.asarray(jax.random.normal(jax.random.fold_in(rng, i), leaf.shape,
                                                        jnp.float32))
        elif bounds[path] is not None:
            params[path] = chunks[path].reshape(leaf.shape) * np.float32(bounds[path])
        else:
            params[path] = np.full(leaf.shape, 1.0 if path[-1] == "scale" else 0.0, np.float32)
    return jax.device_put(params)


def param_shapes(config: UNetConfig) -> dict:
    """The parameter pytree of `UNet(config)` as `jax.ShapeDtypeStruct`s; allocates nothing."""
    config.validate()
    x = jax.ShapeDtypeStruct((1, config.sample_size, config.sample_size, config.in_channels),
                             jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    labels = () if config.num_class_embeds is None else (t,)
    return jax.eval_shape(UNet(config).init, jax.random.key(0), x, t, *labels)["params"]


def param_count(params) -> int:
    """Total number of scalars in a parameter pytree."""
    return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree.leaves(params)))
