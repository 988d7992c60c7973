"""The paper's comparison on the embedded digits: strategies x seeds, then the report.

    python -m launch.reproduce                        # naive, cumulative, generative replay,
                                                      # generative distillation; seeds 42 69 1714
    python -m launch.reproduce --variants=naive,generative_distillation --seeds=42 \
        --root=runs/quick --config.train.steps_per_experience=100

Every run goes to <root>/<variant>_seed<seed> and the report (report.md, CSVs, PNGs) to
<root>/report. Started again with the same arguments, it skips finished runs and resumes an
interrupted one from its last checkpoint.
"""

import os

from gdjax import xla_flags

xla_flags.set_cpu_defaults()  # before jax starts: XNNPACK convolutions on CPU

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import base  # noqa: E402
from gdjax import sweep  # noqa: E402

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "split_digits.py")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Base run config (its strategy is "
                                "replaced by each variant, its seed by each seed).",
                                lock_config=True)
flags.DEFINE_list("variants", ["naive", "cumulative", "generative_replay",
                               "generative_distillation"], "Strategy variants (configs/base.py).")
flags.DEFINE_list("seeds", ["42", "69", "1714"], "Seeds.")
flags.DEFINE_string("root", "runs/reproduce_digits", "Where the runs and the report go.")


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    runs = sweep.make_runs(f.config, f.variants, f.seeds, with_variant=base.with_variant)
    paths = sweep.run_sweep(runs, f.root)
    print(f"report: {paths.get('report.md', os.path.join(f.root, 'report'))}")


if __name__ == "__main__":
    app.run(main)
