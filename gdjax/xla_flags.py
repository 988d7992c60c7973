"""Default XLA flags for CPU runs, set before JAX starts its backend.

On XLA:CPU the convolutions and matrix products of the UNet run faster through XNNPACK
than through XLA's own emitters (digits UNet, generative-distillation step at batch 64 on
2 cores: 0.48 s -> 0.34 s; see BENCHMARKS.md). Flags the user already set are kept.
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
