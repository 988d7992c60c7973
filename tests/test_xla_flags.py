"""CPU XLA defaults: added when absent, never overriding what the user set."""

from gdjax import xla_flags


def test_adds_defaults_and_keeps_user_flags():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    flags = xla_flags.set_cpu_defaults(env)
    assert flags.startswith("--xla_force_host_platform_device_count=8 ")
    for flag in xla_flags.CPU_FLAGS:
        assert flag in flags
    assert xla_flags.set_cpu_defaults(env) == flags  # idempotent


def test_user_choice_of_the_same_flag_wins():
    env = {"XLA_FLAGS": "--xla_cpu_experimental_xnn_fusion_type="}
    flags = xla_flags.set_cpu_defaults(env)
    assert flags.count("xla_cpu_experimental_xnn_fusion_type") == 1
    assert "--xla_cpu_experimental_ynn_fusion_type=" in flags
    assert xla_flags.set_cpu_defaults({}) == " ".join(xla_flags.CPU_FLAGS)


def test_compilation_cache_goes_to_the_gdjax_cache_unless_the_user_set_one(tmp_path):
    env = {"GDJAX_CACHE_DIR": str(tmp_path)}
    assert xla_flags.set_compilation_cache(env) == str(tmp_path / "xla")
    assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "xla")
    assert env["JAX_COMPILATION_CACHE_MAX_SIZE"] == str(2 << 30)  # bounded, LRU
    assert xla_flags.set_compilation_cache({"JAX_COMPILATION_CACHE_DIR": "/elsewhere"}) == \
        "/elsewhere"
    off = {"JAX_COMPILATION_CACHE_DIR": ""}
    assert xla_flags.set_compilation_cache(off) is None and off["JAX_COMPILATION_CACHE_DIR"] == ""
    both = {"GDJAX_CACHE_DIR": str(tmp_path)}
    assert xla_flags.set_defaults(both) == " ".join(xla_flags.CPU_FLAGS)
    assert both["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "xla")


def test_a_launchers_compilations_land_in_the_cache(tmp_path):
    """What the launchers set is what JAX reads: a program compiled after set_defaults()
    is written under <GDJAX_CACHE_DIR>/xla."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(GDJAX_CACHE_DIR=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    code = ("from gdjax import xla_flags; xla_flags.set_defaults(); import jax; "
            "print(jax.jit(lambda x: x * 2 + 1)(3.0))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "7.0", done.stderr[-2000:]
    assert os.listdir(tmp_path / "xla"), "nothing was cached"


def test_the_runtime_requirements_carry_what_the_cache_needs():
    """JAX reads and writes no persistent cache entry without `filelock` once a size limit
    is set (it warns on every compilation instead). The test environment gets filelock
    through torch, so the test above passes there either way: the runtime's own
    requirements.txt (the main job's install) must name it."""
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "requirements.txt")) as f:
        names = {re.split(r"[=<>\[ ]", line.strip(), maxsplit=1)[0].lower()
                 for line in f if line.strip() and not line.startswith("#")}
    assert "filelock" in names
    assert xla_flags.CACHE_MAX_BYTES > 0
