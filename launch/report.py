"""Aggregate runs (strategies x seeds) into the paper's table, CSV files and plots.

    python -m launch.report --runs='runs/digits_*' --out=reports/digits
    python -m launch.report --runs=runs/a,runs/b,'sweep/*/seed*' --out=reports/x --stream=evaluation
    python -m launch.report --runs='old/*' --out=reports/old --count_flops   # runs of an older
                                              # gdjax: count their FLOPs first (compute.jsonl)

Writes report.md, last_experience.tex, last_experience.csv, per_experience.csv, <metric>.png,
class_histogram.png, metrics_vs_compute.png, metrics_vs_wall_time.png, summary.json and
samples.png into --out: mean ± standard error over seeds with the
sample std beside it, the entries overlapping the best in bold, strategies in the paper's words
(see gdjax/report.py).
"""

from absl import flags

from gdjax import report
from launch import common

flags.DEFINE_list("runs", None, "Run directories and/or glob patterns (quote them), "
                  "comma-separated.", required=True)
flags.DEFINE_string("out", "report", "Output directory.")
flags.DEFINE_bool("count_flops", False, "First write metrics/compute.jsonl (the generator's "
                  "model FLOPs per experience, from config.json) into runs of an older gdjax "
                  "that have none, so that the report's Compute section covers them.")
flags.DEFINE_enum("stream", "experience", ["experience", "evaluation"],
                  "Metric rows to report: written during training, or by launch/evaluate.py.")


def main(argv):
    del argv
    workdirs = report.find_runs(flags.FLAGS.runs)
    if flags.FLAGS.count_flops:
        from gdjax import compute
        for workdir in workdirs:
            if compute.write_missing_rows(workdir):
                print(f"counted the generator's FLOPs of {workdir}")
    written = report.write_report(workdirs, flags.FLAGS.out, stream=flags.FLAGS.stream)
    print(f"{len(workdirs)} runs -> {len(written)} files in {flags.FLAGS.out}:")
    for name in written:
        print(f"  {name}")


if __name__ == "__main__":
    common.run(main)
