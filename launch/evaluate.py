"""Re-evaluate a saved run: every saved generator scored again by the evaluation hook.

    python -m launch.evaluate --workdir=runs/digits_full_generation_distillation_seed42
    python -m launch.evaluate --workdir=<run> --experiences=3,4 --num_samples=10000

Rows go to <workdir>/metrics/evaluation.jsonl (a re-evaluated experience replaces its row);
`python -m launch.report --stream=evaluation` reports them.
"""

from gdjax import xla_flags

xla_flags.set_defaults()  # before jax starts: XNNPACK on CPU, the compile cache

from absl import flags, logging  # noqa: E402

from configs import base  # noqa: E402
from gdjax.eval import rescore  # noqa: E402
from launch import common  # noqa: E402

flags.DEFINE_string("workdir", None, "The run directory (holding config.json).", required=True)
flags.DEFINE_list("experiences", None, "0-based experiences to evaluate (default: every one "
                  "with saved params).")
flags.DEFINE_integer("num_samples", None, "Samples per evaluation (default: the run's "
                     "eval.num_samples).", lower_bound=1)
flags.register_validator("experiences", lambda ks: ks is None or all(k.isdigit() for k in ks),
                         "--experiences takes 0-based experience indices, e.g. --experiences=0,4")


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    experiences = flags.FLAGS.experiences
    rows = rescore.evaluate_run(
        flags.FLAGS.workdir, base.get_config(), num_samples=flags.FLAGS.num_samples,
        experiences=None if experiences is None else [int(k) for k in experiences])
    for row in rows:
        values = ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                           if k not in ("step", "experience") and not k.startswith("gen_frac"))
        print(f"experience {row['experience']}: {values}")
    print(f"wrote {len(rows)} row(s) to {flags.FLAGS.workdir}/metrics/{rescore.STREAM}.jsonl")


if __name__ == "__main__":
    common.run(main)
