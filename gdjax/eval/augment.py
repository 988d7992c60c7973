"""The evaluation classifier's training augmentations, in JAX, for use inside a jitted step.

REFERENCE §7 trains the ResNet-18 with torchvision's RandomHorizontalFlip, RandomRotation(10),
RandomAffine(translate=(0.1, 0.1)) and additive Gaussian noise (std 0.1, after normalising to
[-1, 1]). Here, on a batch NHWC in [-1, 1], each image independently:

- is mirrored left-right with probability 1/2 (when `flip`);
- is rotated by an angle drawn uniformly from [-degrees, degrees] (positive: counter-clockwise
  as displayed) about its centre, then shifted by a whole number of pixels,
  round(U(-translate * size, translate * size)) along each axis, as torchvision draws them;
  both in one nearest-neighbour resampling (torchvision's default interpolation) that gives
  the same image as the two in turn, uncovered pixels black (-1);
- gets N(0, noise_std²) noise added to every pixel and channel (no clipping, as there).

`augment(rng, images, settings)` is a pure function of its key, so a training run is
deterministic from its seed.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

# Pixels that the rotation or shift uncovers: black, torchvision's fill 0 before [-1, 1].
FILL = -1.0


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """What `augment` does; hashable, so it can key a cache of compiled steps."""

    flip: bool = True
    degrees: float = 10.0
    translate: float = 0.1   # the largest shift, as a fraction of the image size
    noise_std: float = 0.1

    def __post_init__(self):
        for name in ("degrees", "translate", "noise_std"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"Augmentation.{name}={value!r} must be a finite number >= 0")
        if self.translate >= 1:
            raise ValueError(f"Augmentation.translate={self.translate} is a fraction of the "
                             f"image size and must be < 1")

    @property
    def is_identity(self) -> bool:
        return not self.flip and self.degrees == 0 and self.translate == 0 \
            and self.noise_std == 0


NONE = Augmentation(flip=False, degrees=0.0, translate=0.0, noise_std=0.0)


def warp(images, *, degrees, shift, fill: float = FILL):
    """Images [N, H, W, C] rotated by `degrees` [N] about their centres, then shifted by
    `shift` [N, 2] = (down, right) pixels; nearest-neighbour, uncovered pixels `fill`."""
    return jax.vmap(lambda im, a, s: _warp_one(im, a, s, fill))(images, degrees, shift)


def _warp_one(image, degrees, shift, fill):
    h, w, _ = image.shape
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0  # the centre between the middle pixels
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                          indexing="ij")
    y, x = ys - cy - shift[0], xs - cx - shift[1]
    # Output pixel -> source pixel: the inverse of a counter-clockwise (as displayed, rows
    # down) rotation.
    theta = jnp.deg2rad(degrees)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    src_x = cos * x - sin * y + cx
    src_y = sin * x + cos * y + cy
    iy = jnp.floor(src_y + 0.5).astype(jnp.int32)
    ix = jnp.floor(src_x + 0.5).astype(jnp.int32)
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    # As torchvision rotates onto the image's own frame before it shifts, a pixel whose
    # pre-shift position lies outside the frame is black even where the turned image has one.
    py, px = ys - shift[0], xs - shift[1]
    inside &= (py >= 0) & (py <= h - 1) & (px >= 0) & (px <= w - 1)
    picked = image[jnp.clip(iy, 0, h - 1), jnp.clip(ix, 0, w - 1)]
    return jnp.where(inside[..., None], picked, jnp.asarray(fill, image.dtype))


def augment(rng: jax.Array, images, settings: Augmentation):
    """`images` [N, H, W, C] in [-1, 1] augmented as `settings` says (see the module doc)."""
    if images.ndim != 4:
        raise ValueError(f"augment takes a batch NHWC, got shape {images.shape}")
    if settings.is_identity:
        return images
    n, h, w, _ = images.shape
    k_flip, k_angle, k_shift, k_noise = jax.random.split(rng, 4)
    if settings.flip:
        mirror = jax.random.bernoulli(k_flip, 0.5, (n,))
        images = jnp.where(mirror[:, None, None, None], images[:, :, ::-1], images)
    if settings.degrees or settings.translate:
        degrees = jax.random.uniform(k_angle, (n,), minval=-settings.degrees,
                                     maxval=settings.degrees)
        reach = jnp.array([settings.translate * h, settings.translate * w])
        shift = jnp.round(jax.random.uniform(k_shift, (n, 2), minval=-reach, maxval=reach))
        images = warp(images, degrees=degrees, shift=shift)
    if settings.noise_std:
        images = images + settings.noise_std * jax.random.normal(k_noise, images.shape,
                                                                 images.dtype)
    return images
