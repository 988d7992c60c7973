"""The paper's studies, one command each, resumable, into one folder with report.md.

    python -m launch.study --study=configs/studies.py:iid_distillation
    python -m launch.study --study=configs/studies.py:sampling_cost \
        --study.params_dir=runs/study_iid_distillation_digits/teacher/final_params
    python -m launch.study --study=configs/studies.py:lambda --config=configs/split_fmnist_small.py
    python -m launch.study --study=configs/studies.py:iid_distillation --study.seeds="(42,)" \
        --study.student_steps=100 --config.model.name=tiny --root=runs/quick_iid

The runs come from `--config` (default: the digits) with its `--config.x.y` overrides, the
study's own settings from configs/studies.py with `--study.x` overrides. Everything goes to
--root (default: runs/study_<study>_<config file name without split_>); started again with the
same arguments, a study skips what it finished and resumes what it was doing.
"""

import os

from gdjax import xla_flags

xla_flags.set_defaults()  # before jax starts: XNNPACK on CPU, the compile cache

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from gdjax import studies  # noqa: E402
from launch import common  # noqa: E402

_HERE = os.path.dirname(__file__)
common.define_config_flag(os.path.join(_HERE, "..", "configs", "split_digits.py"),
                          "Run config file (each study sets the strategy, mode and steps of "
                          "its runs).")
config_flags.DEFINE_config_file("study", os.path.join(_HERE, "..", "configs", "studies.py"),
                                "Study config file:<study name>.", lock_config=True)
flags.DEFINE_string("root", None, "Where the study's runs and report go (default: "
                    "runs/study_<study>_<config file name without split_>).")


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    config_for = common.variant_configs(f["config"])
    name = os.path.splitext(os.path.basename(config_for.path))[0].removeprefix("split_")
    root = f.root or os.path.join("runs", f"study_{f.study.name}_{name}")
    paths = studies.run(f.study, config_for, root)
    print(f"report: {paths.get('report.md', os.path.join(root, 'report'))}")


if __name__ == "__main__":
    common.run(main)
