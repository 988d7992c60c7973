"""Default XLA flags for CPU runs, and the compilation cache, set before JAX starts.

On XLA:CPU the convolutions and matrix products of the UNet run faster through XNNPACK
than through XLA's own emitters (digits UNet, generative-distillation step at batch 64 on
2 cores: 0.48 s -> 0.34 s; see BENCHMARKS.md). Flags the user already set are kept.

The launchers that train and evaluate also keep JAX's persistent compilation cache in
gdjax's cache directory (`<cache>/xla`, gdjax/cache.py; at most 2 GiB, the least recently
used entries go first): a run resumed after a kill, the next run of a sweep or a rerun of
the same config loads its compiled steps instead of compiling them again (README, "Running
experiments"). `JAX_COMPILATION_CACHE_DIR` set by the user wins; set to nothing, it turns
the cache off.
"""

from __future__ import annotations

import os

CPU_FLAGS = (
    "--xla_cpu_experimental_ynn_fusion_type=",
    "--xla_cpu_experimental_xnn_fusion_type="
    "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
)


def set_cpu_defaults(environ=os.environ) -> str:
    """Adds each CPU default whose flag name XLA_FLAGS does not mention; returns XLA_FLAGS.

    Call before jax is imported (or at least before its first computation). Harmless on
    GPU/TPU hosts: the flags only affect the CPU backend.
    """
    current = environ.get("XLA_FLAGS", "")
    for flag in CPU_FLAGS:
        name = flag.split("=", 1)[0]
        if name not in current:
            current = f"{current} {flag}".strip()
    environ["XLA_FLAGS"] = current
    return current


CACHE_MAX_BYTES = 2 << 30


def set_compilation_cache(environ=os.environ) -> str | None:
    """Points JAX's persistent compilation cache at `<gdjax cache>/xla` unless
    JAX_COMPILATION_CACHE_DIR is set (to a folder, or empty for none); returns the folder,
    None when off. Call before jax is imported."""
    if "JAX_COMPILATION_CACHE_DIR" not in environ:
        from gdjax.cache import cache_dir
        environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(cache_dir(environ), "xla")
        # least recently used entries go past this size (a paper-scale step is ~10 MB)
        environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(CACHE_MAX_BYTES))
    return environ["JAX_COMPILATION_CACHE_DIR"] or None


def set_defaults(environ=os.environ) -> str:
    """`set_cpu_defaults` and `set_compilation_cache`: what a training or evaluation
    launcher sets before jax starts (the benchmarks time compilation, and keep no cache)."""
    set_compilation_cache(environ)
    return set_cpu_defaults(environ)
