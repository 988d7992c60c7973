"""How long a sweep (launch/reproduce.py's arguments) takes on this machine, measured.

    python -m launch.project --config=configs/split_fmnist.py          # the paper's scale
    python -m launch.project --config=configs/split_fmnist_small.py --variants=naive

Times each compiled piece of each variant's runs here (gdjax/projection.py: train steps,
evaluation sampling, the solver's steps, Inception features) and prints what the sweep of
--variants x --seeds would take, per variant and in all. Run it on the machine that will do
the sweep: on 2 CPU cores the paper's Split Fashion-MNIST takes weeks, on an accelerator
hours.
"""

import os

from gdjax import xla_flags

xla_flags.set_cpu_defaults()  # before jax starts: XNNPACK convolutions on CPU

from absl import flags, logging  # noqa: E402

from gdjax import projection  # noqa: E402
from gdjax.run import build  # noqa: E402
from launch import common, reproduce  # noqa: E402  (its flags: --config, --variants, --seeds)

flags.DEFINE_integer("iters", 3, "Timed calls per piece (after one warm-up call).")


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    config_for = reproduce.variant_configs(f)
    rows = []
    for variant in f.variants:
        run = build(config_for(variant), os.path.join("/nonexistent", variant))
        rows.append((variant, len(f.seeds), projection.run_cost(run),
                     projection.measure(run, iters=f.iters)))
    text, _ = projection.table(rows)
    print(text)


if __name__ == "__main__":
    common.run(main)
