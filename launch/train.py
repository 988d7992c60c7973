"""Train a diffusion model over a sequence of experiences.

    python -m launch.train                      # split_digits, generative distillation, ./runs/
    python -m launch.train --config=configs/split_fmnist.py:generative_distillation \
        --config.strategy.teacher_steps=10 --workdir=runs/fmnist_gd

Restarting with the same --workdir resumes the run from its last checkpoint; --overwrite
starts it over (a workdir of another config is refused without it).
"""

import os

from gdjax import xla_flags

xla_flags.set_defaults()  # before jax starts: XNNPACK on CPU, the compile cache

from absl import flags, logging  # noqa: E402

from gdjax import continual, run  # noqa: E402
from gdjax.eval import hooks  # noqa: E402
from launch import common  # noqa: E402

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "split_digits.py")
common.define_config_flag(_DEFAULT_CONFIG, "Run config file[:variant].")
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and samples go "
                    "(default: runs/<config>_<variant>_seed<seed>).")
flags.DEFINE_bool("overwrite", False, "Delete the workdir's checkpoints, metrics and samples "
                  "first (needed to reuse a workdir of another config).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        # Orbax logs every checkpoint step at INFO; progress lines go to stderr anyway.
        logging.set_verbosity(logging.WARNING)
    if flags.FLAGS.distributed:
        import jax
        jax.distributed.initialize()
    settings = run.settings_from_config(flags.FLAGS.config)
    workdir = flags.FLAGS.workdir or os.path.join(
        "runs", f"{settings.data.name}_{settings.strategy.name}_seed{settings.seed}")
    logging.info("workdir: %s", workdir)
    continual.train(settings, workdir, eval_hook=hooks.default_eval_hook(settings),
                    overwrite=flags.FLAGS.overwrite)


if __name__ == "__main__":
    common.run(main)
