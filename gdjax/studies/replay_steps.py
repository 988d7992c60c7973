"""Replay steps: the solver's accuracy and forgetting, and the generator's quality, against the
DDIM steps the replay images take (the authors' generate_fid_accuracy study).

    <root>/<strategy>_steps<n>_seed<s>/   an ordinary continual run with eval.steps = n: the
                                          solver's replay images and the evaluation's
                                          samples take n DDIM steps, as the authors'
                                          --generation_steps sets both
    <root>/report/                        the sweep's report over all of them (each entry
                                          labelled with its eval.steps), replay_steps.csv,
                                          accuracy_vs_steps.png, forgetting_vs_steps.png,
                                          <metric>_vs_steps.png and
                                          <metric>_vs_accuracy.png (each point one step count)

The runs go one after another through `gdjax.sweep.run_sweep`: killed at any moment and
started again, the study skips the finished runs and resumes the interrupted one.
"""

from __future__ import annotations

import copy
import os

from matplotlib.figure import Figure

from gdjax import sweep
from gdjax.report import METRIC_LABELS, STRATEGY_LABELS
from gdjax.studies import common

ACCURACY, FORGETTING = "classifier_accuracy", "classifier_forgetting"


def plan(study, config_for) -> list[tuple[str, object]]:
    """(run name, config) of every (strategy, DDIM steps, seed)."""
    runs = []
    for name in study.strategies:
        for steps in study.generation_steps:
            for seed in study.seeds:
                c = copy.deepcopy(config_for(name))
                c.strategy.name, c.eval.steps, c.seed = name, int(steps), int(seed)
                if not c.solver.enabled:
                    raise ValueError("the replay-steps study reads the solver's accuracy: "
                                     "leave --config.solver.enabled=True")
                runs.append((f"{name}_steps{int(steps)}_seed{seed}", c))
    return runs


def run_study(study, config_for, root: str, *, train_fn=None, hook_fn=None) -> dict[str, str]:
    """`config_for(strategy)`: the run config of a strategy (the config file's variant)."""
    common.check_metric(study.metric)
    runs = plan(study, config_for)
    paths = sweep.run_sweep(runs, root, train_fn=train_fn, hook_fn=hook_fn)
    paths.update(write_figures(study, root, [os.path.join(root, n) for n, _ in runs]))
    return paths


def _series(rows, metric):
    """{label: (steps, mean, SE)} of `metric`, steps increasing."""
    series = {}
    for label in dict.fromkeys(r["label"] for r in rows):
        points = sorted((r["steps"], r["mean"], r["sem"]) for r in rows
                        if r["label"] == label and r["metric"] == metric)
        if points:
            series[label] = tuple(zip(*points))
    return series


def metric_vs_accuracy_figure(rows, metric: str) -> Figure | None:
    """The solver's accuracy against the generator's `metric` after the last experience, a
    point per step count (annotated), a line per strategy."""
    quality, accuracy = _series(rows, metric), _series(rows, ACCURACY)
    labels = [label for label in quality if label in accuracy]
    if not labels:
        return None
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for label in labels:
        by_steps = dict(zip(accuracy[label][0], accuracy[label][1]))
        points = sorted((x, by_steps[s], s) for s, x in zip(quality[label][0], quality[label][1])
                        if s in by_steps)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        for x, y, s in points:
            ax.annotate(f"{s} steps", (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
    name = METRIC_LABELS.get(metric, metric)
    ax.set_xlabel(f"{name} of the generator's samples")
    ax.set_ylabel("solver accuracy")
    ax.set_title(f"Solver accuracy against the generator's {name} after the last experience, "
                 "as the replay's DDIM steps vary (means over seeds)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def write_figures(study, root: str, workdirs) -> dict[str, str]:
    """replay_steps.csv (strategy, DDIM steps, metric, mean, SE, std, seeds at the last
    experience) and the figures."""
    out_dir = os.path.join(root, "report")

    def point(run):
        name = run.config["strategy"]["name"]
        return {"strategy": name, "label": STRATEGY_LABELS[name],
                "steps": int(run.config["eval"]["steps"])}

    rows = common.last_experience_rows(workdirs, point, (study.metric, ACCURACY, FORGETTING))
    paths = {"replay_steps.csv": common.write_csv(os.path.join(out_dir, "replay_steps.csv"),
                                                  rows)}
    for metric, file in ((ACCURACY, "accuracy_vs_steps.png"),
                         (FORGETTING, "forgetting_vs_steps.png"),
                         (study.metric, f"{study.metric}_vs_steps.png")):
        series = _series(rows, metric)
        if series:
            label = METRIC_LABELS.get(metric, metric)
            fig = common.line_figure(series, xlabel="DDIM steps of the replay images",
                                     ylabel=label, logx=True,
                                     title=f"{label} after the last experience against the "
                                           "replay's DDIM steps (mean ± SE over seeds)")
            paths[file] = common.save(fig, os.path.join(out_dir, file))
    fig = metric_vs_accuracy_figure(rows, study.metric)
    if fig is not None:
        file = f"{study.metric}_vs_accuracy.png"
        paths[file] = common.save(fig, os.path.join(out_dir, file))
    return paths
