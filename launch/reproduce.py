"""The paper's comparison: strategies x seeds on one benchmark config, then the report.

    python -m launch.reproduce                        # Split Digits: naive, cumulative,
                                                      # generative replay, generative
                                                      # distillation; seeds 42 69 1714
    python -m launch.reproduce --config=configs/split_fmnist_small.py   # real Fashion-MNIST
    python -m launch.reproduce --variants=naive,generative_distillation --seeds=42 \\
        --root=runs/quick --steps_per_experience=100

Each variant's config is the config file's `get_config(variant)` (so each strategy gets its
own lambda, configs/base.py) with the command line's `--config.x.y` overrides on top. A
config file may declare a schedule for sweeps (`SWEEP = {"steps_per_experience": ...,
"solver_epochs": ...}`): the digits cut their generator steps to fit 12 runs in about 40 minutes on 2 CPU
cores. --steps_per_experience / --solver_epochs override it; 0 keeps the config's own.

Every run goes to <root>/<variant>_seed<seed> (default root: runs/reproduce_<config name>)
and the report (report.md, CSVs, LaTeX, PNGs) to <root>/report. Started again with the same
arguments, it skips finished runs and resumes an interrupted one from its last checkpoint.
"""

import os

from gdjax import xla_flags

xla_flags.set_defaults()  # before jax starts: XNNPACK on CPU, the compile cache

from absl import flags, logging  # noqa: E402

from gdjax import sweep  # noqa: E402
from launch import common  # noqa: E402

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "split_digits.py")
common.define_config_flag(_DEFAULT_CONFIG, "Base run config (its strategy is replaced by each "
                   "variant, its seed by each seed).")
flags.DEFINE_list("variants", ["naive", "cumulative", "generative_replay",
                               "generative_distillation"], "Strategy variants (configs/base.py).")
flags.DEFINE_list("seeds", ["42", "69", "1714"], "Seeds.")
flags.DEFINE_string("root", None, "Where the runs and the report go (default: "
                    "runs/reproduce_<config file name without split_>).")
flags.DEFINE_integer("steps_per_experience", None, "Generator steps per experience (default: "
                     "the config file's SWEEP, else the config's; 0: the config's).")
flags.DEFINE_integer("solver_epochs", None, "Solver epochs per experience (default: the "
                     "config file's SWEEP, else the config's; 0: the config's).")


def variant_configs(f):
    """config_for(variant): the --config file's get_config(variant), with the sweep's
    schedule and then the command line's --config.x.y overrides; and the file's path."""
    def with_schedule(config, module):
        schedule = dict(getattr(module, "SWEEP", {}))
        for name in ("steps_per_experience", "solver_epochs"):
            if f[name].value is not None:
                schedule[name] = f[name].value
        if schedule.get("steps_per_experience"):
            config.train.steps_per_experience = schedule["steps_per_experience"]
        if schedule.get("solver_epochs"):
            config.solver.epochs = schedule["solver_epochs"]
        return config

    return common.variant_configs(f["config"], before_overrides=with_schedule)


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    config_for = variant_configs(f)
    name = os.path.splitext(os.path.basename(config_for.path))[0].removeprefix("split_")
    root = f.root or os.path.join("runs", f"reproduce_{name}")
    paths = sweep.run_sweep(sweep.make_runs(config_for, f.variants, f.seeds), root)
    print(f"report: {paths.get('report.md', os.path.join(root, 'report'))}")


if __name__ == "__main__":
    common.run(main)
