"""Test-session settings: fast XLA:CPU compilation for the many small jitted functions.

The suite compiles dozens of small programs whose run time is negligible; LLVM's
optimisation passes dominate their compile time (several seconds per random-number draw
on XLA:CPU), so the tests ask for the unoptimised backend. Numerics are unchanged.
Must run before jax is imported, hence here.
"""

import os

_FAST_COMPILE = "--xla_backend_optimization_level=0"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
