"""The paper's comparison on the embedded digits: strategies x seeds, then the report.

    python -m launch.reproduce                        # naive, cumulative, generative replay,
                                                      # generative distillation; seeds 42 69 1714
    python -m launch.reproduce --variants=naive,generative_distillation --seeds=42 \
        --root=runs/quick --steps_per_experience=100

To fit 12 runs in about 40 minutes on 2 CPU cores, the sweep halves the digits schedule by
default: 200 generator steps per experience (the default run takes 300) and 5 solver epochs
(10); --steps_per_experience=0 --solver_epochs=0 keep the config's own values.

Every run goes to <root>/<variant>_seed<seed> and the report (report.md, CSVs, PNGs) to
<root>/report. Started again with the same arguments, it skips finished runs and resumes an
interrupted one from its last checkpoint.
"""

import os

from gdjax import xla_flags

xla_flags.set_cpu_defaults()  # before jax starts: XNNPACK convolutions on CPU

from absl import app, flags, logging  # noqa: E402

from configs import base  # noqa: E402
from gdjax import sweep  # noqa: E402
from gdjax.config import define_config_flag  # noqa: E402

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "split_digits.py")
define_config_flag(_DEFAULT_CONFIG, "Base run config (its strategy is replaced by each "
                   "variant, its seed by each seed).")
flags.DEFINE_list("variants", ["naive", "cumulative", "generative_replay",
                               "generative_distillation"], "Strategy variants (configs/base.py).")
flags.DEFINE_list("seeds", ["42", "69", "1714"], "Seeds.")
flags.DEFINE_string("root", "runs/reproduce_digits", "Where the runs and the report go.")
flags.DEFINE_integer("steps_per_experience", 200, "Generator steps per experience (0: the "
                     "config's).")
flags.DEFINE_integer("solver_epochs", 5, "Solver epochs per experience (0: the config's).")


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    config = f.config
    if f.steps_per_experience:
        config.train.steps_per_experience = f.steps_per_experience
    if f.solver_epochs:
        config.solver.epochs = f.solver_epochs
    runs = sweep.make_runs(config, f.variants, f.seeds, with_variant=base.with_variant)
    paths = sweep.run_sweep(runs, f.root)
    print(f"report: {paths.get('report.md', os.path.join(f.root, 'report'))}")


if __name__ == "__main__":
    app.run(main)
