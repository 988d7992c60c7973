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
