"""Aggregate runs (strategies x seeds) into the paper's table, CSV files and plots.

    python -m launch.report --runs='runs/digits_*' --out=reports/digits
    python -m launch.report --runs=runs/a,runs/b,'sweep/*/seed*' --out=reports/x --stream=evaluation

Writes report.md, last_experience.tex, last_experience.csv, per_experience.csv, <metric>.png,
class_histogram.png and samples.png into --out: mean ± standard error over seeds with the
sample std beside it, the entries overlapping the best in bold, strategies in the paper's words
(see gdjax/report.py).
"""

from absl import flags

from gdjax import report
from launch import common

flags.DEFINE_list("runs", None, "Run directories and/or glob patterns (quote them), "
                  "comma-separated.", required=True)
flags.DEFINE_string("out", "report", "Output directory.")
flags.DEFINE_enum("stream", "experience", ["experience", "evaluation"],
                  "Metric rows to report: written during training, or by launch/evaluate.py.")


def main(argv):
    del argv
    workdirs = report.find_runs(flags.FLAGS.runs)
    written = report.write_report(workdirs, flags.FLAGS.out, stream=flags.FLAGS.stream)
    print(f"{len(workdirs)} runs -> {len(written)} files in {flags.FLAGS.out}:")
    for name in written:
        print(f"  {name}")


if __name__ == "__main__":
    common.run(main)
