"""λ: each strategy's continual run at each of its lambdas, every metric against λ.

    <root>/<strategy>_lambda<λ>_seed<s>/   an ordinary continual run (configs' variant of
                                           that strategy, strategy.lambd = λ)
    <root>/report/                         the sweep's report over all of them (each entry
                                           labelled with its strategy.lambd), plus
                                           lambda.csv and <metric>_vs_lambda.png

The runs go one after another through `gdjax.sweep.run_sweep`: killed at any moment and
started again, the study skips the finished runs and resumes the interrupted one.
"""

from __future__ import annotations

import copy
import os

from gdjax import strategies, sweep
from gdjax.report import METRIC_LABELS, STRATEGY_LABELS
from gdjax.studies import common

# The metrics plotted against λ (each one that the runs report).
PLOTTED = ("fid", "kid", "kld", "ard", "fd_classifier", "kid_classifier",
           "classifier_accuracy", "classifier_forgetting")


def _tag(value: float) -> str:
    return f"{float(value):g}"


def plan(study, config_for) -> list[tuple[str, object]]:
    """(run name, config) of every (strategy, λ, seed)."""
    runs = []
    for name, lambdas in study.lambdas.items():
        if name not in strategies.TEACHER_STRATEGIES:
            raise ValueError(f"study.lambdas has {name!r}, which has no lambda; use "
                             f"strategies of {strategies.TEACHER_STRATEGIES}")
        for lambd in lambdas:
            for seed in study.seeds:
                c = copy.deepcopy(config_for(name))
                c.strategy.name, c.strategy.lambd, c.seed = name, float(lambd), int(seed)
                runs.append((f"{name}_lambda{_tag(lambd)}_seed{seed}", c))
    return runs


def run_study(study, config_for, root: str, *, train_fn=None, hook_fn=None) -> dict[str, str]:
    """`config_for(strategy)`: the run config of a strategy (the config file's variant)."""
    runs = plan(study, config_for)
    paths = sweep.run_sweep(runs, root, train_fn=train_fn, hook_fn=hook_fn)
    paths.update(write_lambda_figures(study, root, [os.path.join(root, n) for n, _ in runs]))
    return paths


def write_lambda_figures(study, root: str, workdirs) -> dict[str, str]:
    """lambda.csv (strategy, λ, metric, mean, SE, std, seeds at the last experience) and a
    figure per metric against λ."""
    out_dir = os.path.join(root, "report")

    def point(run):
        name = run.config["strategy"]["name"]
        return {"strategy": name, "label": STRATEGY_LABELS[name],
                "lambda": float(run.config["strategy"]["lambd"])}

    rows = common.last_experience_rows(workdirs, point, PLOTTED)
    paths = {"lambda.csv": common.write_csv(os.path.join(out_dir, "lambda.csv"), rows)}
    for metric in PLOTTED:
        series = {}
        for name in study.lambdas:
            points = sorted((r["lambda"], r["mean"], r["sem"]) for r in rows
                            if r["strategy"] == name and r["metric"] == metric)
            if points:
                series[STRATEGY_LABELS[name]] = tuple(zip(*points))
        if series:
            label = METRIC_LABELS.get(metric, metric)
            fig = common.line_figure(series, xlabel="λ (weight of the replay loss)",
                                     ylabel=label, logx=True,
                                     title=f"{label} after the last experience against λ "
                                           f"(mean ± SE over seeds)")
            paths[f"{metric}_vs_lambda.png"] = common.save(
                fig, os.path.join(out_dir, f"{metric}_vs_lambda.png"))
    return paths
