"""What every launcher shares: the locked `--config` flag, and gdjax's errors as one line.

    from launch import common
    CONFIG = common.define_config_flag(default_path, "Run config file[:variant].")
    ...
    if __name__ == "__main__":
        common.run(main)

`run(main)` is absl's `app.run` that prints an error gdjax raises for bad input (a missing
data set, an unknown strategy, a corrupt file, a full disk, NaN losses) as one line, `gdjax:
<message>`, and exits with status 2; `--traceback` shows the whole traceback instead.
"""

from __future__ import annotations

import sys

from absl import app, flags

_TRACEBACK = flags.DEFINE_bool("traceback", False, "On an error, print the whole traceback "
                               "instead of its one-line message.")


def define_config_flag(default: str, help_string: str):
    """`--config` as a locked ml_collections config file flag.

    ml_collections applies `--config.x.y=...` overrides while the flag is defined and
    reports a misspelt key with a three-part traceback; this turns that into one line
    naming the override, the suggestion and where the keys are defined (exit status 2).
    """
    from ml_collections import config_flags
    try:
        return config_flags.DEFINE_config_file("config", default, help_string, lock_config=True)
    except (AttributeError, KeyError) as e:
        print(unknown_key_message(str(e), sys.argv[1:]), file=sys.stderr)
        raise SystemExit(2) from None


def unknown_key_message(error: str, argv: list[str]) -> str:
    """One line from ml_collections' misspelt-key error and the command line."""
    # ml_collections' text, nested in reprs: "'\\'batchsize\\'\\nDid you mean ...?'"
    text = error.replace("\\n", "\n").replace("\\'", "'").strip("'\"")
    key, _, hint = text.partition("\n")
    key = key.strip("'\"").split('"')[1] if key.startswith("Key") else key.strip("'\"")
    given = [a for a in argv if a.startswith("--config.")
             and key in a.split("=", 1)[0][len("--config."):].split(".")]
    where = f" in {given[0]}" if given else ""
    return (f"gdjax: unknown config key {key!r}{where}. {hint.strip()} "
            f"Every key is defined, with its default, in configs/base.py.").replace("  ", " ")


def config_file_module(config_flag):
    """The Python module of a `--config` flag's file (its path without the `:variant`)."""
    import importlib.util

    from ml_collections import config_flags
    path = config_flags.get_config_filename(config_flag).split(":")[0]
    spec = importlib.util.spec_from_file_location("gdjax_launch_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.path = path
    return module


def variant_configs(config_flag, *, before_overrides=lambda config, module: config):
    """config_for(variant): the `--config` file's `get_config(variant)`, passed through
    `before_overrides(config, the file's module)`, then with the command line's `--config.x.y` overrides; its `.path`
    is the file's."""
    from ml_collections import config_flags
    module = config_file_module(config_flag)
    overrides = config_flags.get_override_values(config_flag)

    def config_for(variant):
        config = before_overrides(module.get_config(variant), module)
        config.update_from_flattened_dict(overrides)
        return config

    config_for.path = module.path
    return config_for


# The errors gdjax raises for input it cannot use; anything else is a bug and keeps its
# traceback.
def _input_errors() -> tuple[type, ...]:
    from gdjax import continual, rundir
    from gdjax.checkpoint import CheckpointError, CheckpointWriteError
    from gdjax.eval.solver import NonFiniteSolverLossError
    return (ValueError, FileNotFoundError, ImportError, rundir.DiskFullError, CheckpointError,
            CheckpointWriteError, continual.NonFiniteLossError, NonFiniteSolverLossError)


def run(main) -> None:
    """`app.run(main)`, gdjax's input errors printed as one line with exit status 2."""
    def guarded(argv):
        try:
            return main(argv)
        except _input_errors() as e:
            if _TRACEBACK.value:
                raise
            print(f"gdjax: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    app.run(guarded)
