"""Test-session settings: fast XLA:CPU compilation for the many small jitted functions.

The suite compiles dozens of small programs whose run time is negligible; LLVM's
optimisation passes dominate their compile time (several seconds per random-number draw
on XLA:CPU), so the tests ask for the unoptimised backend, and for XLA:CPU's older LLVM
fusion emitters, which compile a train step of the tiny UNet about a quarter faster than the
MLIR ones (13.7-14.3 s -> 9.6-11.0 s for the distillation step, 2 cores). Results differ
by float32 rounding only; where that is amplified (the ResNet-18's train-mode gradients,
5% apart between the two emitters, as torch's float32 is from its float64) the test compares
in float64. Must run before jax is imported, hence here.
"""

import atexit
import contextlib
import os
import shutil
import tempfile

import pytest

for _flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One XLA compilation cache for the whole session, shared by both pytest-xdist workers
# (they inherit the controller's environment) and the subprocesses the tests start: many
# tests compile the same programs (the tiny UNet's steps, its sampler, the classifiers'),
# and each compilation is seconds on XLA:CPU. jax.log_compiles reports a program before the
# cache is asked, so the compile-once checks count as without it. Removed by the process
# that made it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="gdjax-test-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

# Hermetic caches: trained classifiers, Inception weights and features go to a fresh
# directory per test session (gdjax/cache.py), never into the user's ~/.cache/gdjax.
_CACHE = tempfile.mkdtemp(prefix="gdjax-test-cache-")
os.environ["GDJAX_CACHE_DIR"] = _CACHE
os.environ.pop("GDJAX_INCEPTION_DIR", None)
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


@pytest.fixture
def no_system_data(monkeypatch, tmp_path_factory):
    """No system copy of any data set (Debian's /usr/share/datasets): a test sees only the
    files it writes."""
    from gdjax.data import sources

    empty = str(tmp_path_factory.mktemp("no_system_datasets"))
    monkeypatch.setattr(sources, "SYSTEM_DIRS",
                        {name: os.path.join(empty, name) for name in sources.SYSTEM_DIRS})


@contextlib.contextmanager
def recording_compilations():
    """Yields a Counter of the XLA compilations inside the block by function name
    ("train_step", "solver_step", "sample", ...), read from jax.log_compiles' records: a
    compile-once check through JAX's own logging."""
    import collections
    import logging
    import re

    import jax

    counts = collections.Counter()

    class Recorder(logging.Handler):
        def emit(self, record):
            found = re.match(r"Compiling jit\((\w+)\)", record.getMessage())
            if found:
                counts[found.group(1)] += 1

    handler, logger = Recorder(), logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield counts
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def compilations():
    """`recording_compilations` over the whole test."""
    with recording_compilations() as counts:
        yield counts


# The files with the most work (seconds of one worker on 2 cores, --durations), run first:
# each worker takes the next file when it is free (--dist loadfile), so the long ones do
# not start last and leave one worker idle at the end.
HEAVIEST_FIRST = ("test_reliability.py", "test_continual.py", "test_eval_hook.py",
                  "test_train_step.py", "test_benchmark.py", "test_bf16.py", "test_unet.py",
                  "test_solver.py", "test_ema.py", "test_resnet.py", "test_inception.py",
                  "test_report.py", "test_solver_baselines.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file
