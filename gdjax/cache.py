"""The user cache directory: what gdjax computes once and reuses across runs.

Trained evaluation classifiers, converted Inception weights and the real images' Inception
features live here, never beside the data (a data set may sit in a read-only system folder
such as /usr/share/datasets). The root is `$GDJAX_CACHE_DIR`, else `~/.cache/gdjax`:

    <root>/classifiers/<arch>/<data set>_<size>px_<channels>ch/   (gdjax/eval/classifier.py)
    <root>/inception/                                             (gdjax/eval/inception.py)
    <root>/fid_features/<data set>_<size>px_<channels>ch.npz      (gdjax/eval/fid.py)
    <root>/xla/             JAX's compilation cache of the launchers (gdjax/xla_flags.py)
"""

from __future__ import annotations

import os

ENV_DIR = "GDJAX_CACHE_DIR"


def cache_dir(environ=os.environ) -> str:
    """The absolute cache root: $GDJAX_CACHE_DIR, or ~/.cache/gdjax."""
    root = environ.get(ENV_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "gdjax")
    return os.path.abspath(root)


def cache_path(*parts: str) -> str:
    """`cache_dir()` joined with `parts` (nothing is created)."""
    return os.path.join(cache_dir(), *parts)
