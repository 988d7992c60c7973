"""What the studies share: one score for a set of samples, the area under an FID curve,
resumable result files, and line plots.

A study scores samples with one number against the test images of the classes seen:
Inception FID (`metric="fid"`, the paper's) or the Fréchet distance on the evaluation
classifier's features (`metric="fd_classifier"`, cheap enough for 2 CPU cores, never
comparable with published FIDs; the figures say which one they show).
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from gdjax import figures, files
from gdjax.eval import hooks, metrics

METRICS = ("fid", "fd_classifier")
METRIC_AXIS = {"fid": "FID (Inception-v3)",
               "fd_classifier": "Fréchet distance on the evaluation classifier's features\n"
                                "(not comparable with published FIDs)"}


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"study.metric={metric!r} is unknown; use one of {METRICS} (fid: "
                         f"Inception-v3, needs its weights; fd_classifier: the evaluation "
                         f"classifier's features, cheap on a CPU).")


trapezoid_auc = metrics.trapezoid_auc  # the AUCs of the studies and the report


class Scorer:
    """`scorer(run, classes, samples, seed) -> float`: the study's metric of samples
    ([N, H, W, C] in [0, 1]) against the test images of `classes`, with the run's
    evaluation hook's classifier and Inception weights (loaded once)."""

    def __init__(self, settings, metric: str):
        check_metric(metric)
        self.metric = metric
        self.hook = hooks.default_eval_hook(settings)
        if metric == "fid" and (self.hook is None or self.hook.fid is None):
            raise FileNotFoundError(
                "study.metric='fid' needs --config.eval.fid=True and the Inception-v3 "
                "weights (`python -m launch.convert_inception --fetch`); or use "
                "--study.metric=fd_classifier, the evaluation classifier's features")
        if metric == "fd_classifier" and (self.hook is None or self.hook.classifier_dir is None):
            raise FileNotFoundError(
                "study.metric='fd_classifier' needs the evaluation classifier: `python -m "
                "launch.train_classifier --config <the config>` or "
                "--config.eval.train_classifier=True")

    @property
    def axis_label(self) -> str:
        return METRIC_AXIS[self.metric]

    def __call__(self, run, classes, samples, seed) -> float:
        hook = self.hook
        if self.metric == "fid":
            return float(hook.fid(run.test_uint8.images, run.test_uint8.labels, classes,
                                  samples, seed=seed, sharding=run.sharding)["fid"])
        variables, meta = hook.classifier()
        ref = hook.reference(run.test, classes, run.sharding)
        _, features = hooks.sample_statistics(
            variables, samples, arch=hook.arch, num_classes=meta["num_classes"],
            batch_size=run.settings.eval.batch_size, sharding=run.sharding)
        return float(metrics.frechet_distance(ref.mu, ref.sigma,
                                              *metrics.feature_statistics(features)))


# ----------------------------------------------------------------------------- result files

class Points:
    """A study's finished points, one JSON line each in `path`, keyed by `key(row)`: a
    study killed at any moment and started again redoes only the points it has no line for
    (a torn last line is dropped)."""

    def __init__(self, path: str, key_fields: Sequence[str]):
        self.path, self.key_fields = path, tuple(key_fields)
        self.rows: list[dict] = []
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        self.rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        break  # the last line, torn by a kill: redone
            files.atomic_write(path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def key(self, row: Mapping) -> tuple:
        return tuple(row[f] for f in self.key_fields)

    def get(self, **key) -> dict | None:
        wanted = tuple(key[f] for f in self.key_fields)
        return next((r for r in self.rows if self.key(r) == wanted), None)

    def add(self, row: dict) -> dict:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)
        return row


def write_csv(path: str, rows: Sequence[Mapping], fields: Sequence[str] | None = None) -> str:
    """`rows` as a CSV with a header (the union of their keys in first-seen order)."""
    import csv
    import io
    if fields is None:
        fields = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return str(files.atomic_write(path, buffer.getvalue()))


# ----------------------------------------------------------------------------- figures

def last_experience_rows(workdirs: Sequence[str], point_of, metrics: Sequence[str]) -> list:
    """Per point (`point_of(run record) -> dict` of the fields that tell the point, e.g.
    strategy and λ) and metric, the mean, SE, std and count over the point's runs (its
    seeds) of the metric at each run's last experience: rows for write_csv."""
    from gdjax import report

    by_point: dict[tuple, list] = {}
    for workdir in workdirs:
        run = report.load_run(workdir)
        point = point_of(run)
        by_point.setdefault(tuple(point.items()), []).append(run)
    rows = []
    for point, group in sorted(by_point.items()):
        last = [r.rows[max(r.rows)] for r in group]
        for metric in metrics:
            values = [row[metric] for row in last if isinstance(row.get(metric), (int, float))]
            if values:
                stat = report.summarize(values)
                rows.append({**dict(point), "metric": metric, "mean": stat.mean,
                             "sem": stat.sem, "std": stat.std, "seeds": stat.n})
    return rows


def line_figure(series: Mapping[str, tuple], *, xlabel: str, ylabel: str, title: str,
                logx: bool = False, hlines: Mapping[str, float] | None = None) -> Figure:
    """One axes, a line per entry of `series` ({label: (x, y) or (x, y, error)}), with
    error bands where given, and dashed horizontal reference lines `hlines`."""
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for label, values in series.items():
        x, y = np.asarray(values[0], np.float64), np.asarray(values[1], np.float64)
        ax.plot(x, y, marker="o", markersize=3, label=label)
        if len(values) > 2 and values[2] is not None:
            err = np.asarray(values[2], np.float64)
            if np.isfinite(err).any():
                ax.fill_between(x, y - err, y + err, alpha=0.2)
    for i, (label, value) in enumerate((hlines or {}).items()):
        ax.axhline(value, linestyle=("--", ":", "-.")[i % 3], color=("0.2", "0.5")[i % 2],
                   linewidth=1, label=label)
    if logx:
        ax.set_xscale("log")
        ticks = sorted({float(v) for values in series.values() for v in values[0]})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def save(fig: Figure, path: str) -> str:
    return figures.save_figure(fig, path)
