"""Sample grids: a batch of generated images tiled into one PNG.

`make_image_grid` is the pure numpy tiling (testable pixel by pixel); `save_image_grid`
writes it with pillow, atomically, so a reader never sees half a PNG. Images are NHWC floats
in [0, 1] (map the model's [-1, 1] with `(x + 1) / 2` first); `nrow` is the number of images
per row, as in torchvision's `make_grid`.
"""

from __future__ import annotations

import math
import os
import pathlib

import numpy as np
from PIL import Image


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] floats to uint8, rounding half up like torchvision; NaN becomes 0."""
    images = np.clip(np.nan_to_num(images.astype(np.float32), nan=0.0), 0.0, 1.0)
    return np.floor(images * 255.0 + 0.5).astype(np.uint8)


def make_image_grid(images, nrow: int | None = None, pad: int = 1, *, upscale: int = 1,
                    pad_value: float = 0.0) -> np.ndarray:
    """Tiles images [N, H, W, C] (C = 1 or 3, floats, clipped to [0, 1]) into a uint8 array
    [rows * (H*upscale + pad) + pad, nrow * (W*upscale + pad) + pad, C].

    `nrow` images per row (default ceil(sqrt(N))); a `pad`-pixel border of `pad_value`
    surrounds every image; `upscale` repeats pixels (nearest neighbour) before tiling, so
    8x8 digits stay visible. Empty cells of the last row are padding.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"images must be [N>0, H, W, C in (1, 3)], got shape {images.shape}")
    if upscale < 1 or pad < 0:
        raise ValueError(f"need upscale >= 1 and pad >= 0, got upscale={upscale}, pad={pad}")
    tiles = _to_uint8(images)
    tiles = tiles.repeat(upscale, axis=1).repeat(upscale, axis=2)
    n, h, w, c = tiles.shape
    ncol = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / ncol)
    fill = _to_uint8(np.asarray(pad_value))
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), fill, np.uint8)
    for i in range(n):
        top = pad + (i // ncol) * (h + pad)
        left = pad + (i % ncol) * (w + pad)
        grid[top:top + h, left:left + w] = tiles[i]
    return grid


def save_image_grid(images, path: str | os.PathLike, *, nrow: int | None = None, pad: int = 1,
                    upscale: int = 1, pad_value: float = 0.0) -> pathlib.Path:
    """Writes `make_image_grid(images, ...)` to the PNG `path` (grey for C = 1), creating
    parent directories, through a temporary file and os.replace; returns the path."""
    grid = make_image_grid(images, nrow, pad, upscale=upscale, pad_value=pad_value)
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A per-process name in the same directory: os.replace is then atomic, and open()
    # (unlike mkstemp's 0600) gives the file the usual umask permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            image.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
