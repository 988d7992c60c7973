"""Reports over finished runs: the paper's table (strategies x seeds) as Markdown, LaTeX, CSV
and PNG.

`write_report(workdirs, out_dir)` reads each run's `config.json` and its per-experience metric
rows (`metrics/experience.jsonl`, or with `stream="evaluation"` the rows that
launch/evaluate.py writes), groups the runs by strategy and writes into `out_dir`:

- `report.md`: at the last experience, one table of every metric; then one table per metric
  over the experiences, the figures, and the list of runs used;
- `last_experience.tex`: the paper's metrics at the last experience as a LaTeX table
  (booktabs), strategies as rows, each cell `mean \\pm SE`;
- `last_experience.csv`, `per_experience.csv`: the same numbers in long format, one line per
  (label, metric, experience) with columns `strategy` (the internal `strategy.name`), `label`
  (the name the tables and plots show), `metric`, `experience`, `mean`, `sem`, `std`, `n`;
  every numeric metric of the rows, the per-class fractions `gen_frac_class_<c>` and
  per-experience accuracies `classifier_acc_exp_<j>` included (the tables and plots leave
  those out);
- `<metric>.png`: each metric against the experience, the mean with a ± SE band per strategy;
- `class_histogram.png`: per strategy, the mean (± SE) generated class fractions at the last
  experience against the true class frequencies;
- `samples.png`: the last-experience sample grid of each strategy's first seed, side by side.
- `metrics_vs_compute.png`, `metrics_vs_wall_time.png`: each metric after each experience
  against the generator's model FLOPs (metrics/compute.jsonl) or the wall time
  (metrics/timing.jsonl) spent so far; report.md's "Compute" table gives the whole runs'
  totals and their ratios to generative replay and to cumulative;
- `summary.json`: per strategy its seeds and best seeds (best_seeds: lowest AUC of the
  generative metric over the experiences, lowest solver forgetting), as in the authors' report;
  report.md shows them under "Best seed".

Statistics over seeds, as the authors' report computes them: the mean and its standard error
SE = population std (ddof 0) / sqrt(n); beside them the sample standard deviation std (ddof 1).
The Markdown cells read `mean ± SE (std s)`; with one seed SE and std are NaN in the CSVs and
absent from the tables and plots.

Best entries: per metric at the last experience, the best entry is the lowest mean for a
lower-is-better metric (LOWER_IS_BETTER) and the highest for solver accuracy, chosen, as in
the authors' report, among the strategies other than the reference points naive and
cumulative (NOT_CONTENDERS); every entry whose interval [mean - SE, mean + SE] overlaps the
best's (a single seed: the mean alone) is bold, in the LaTeX and the Markdown table alike.
A metric with no known direction, or a column with no contender, has no bold entry.

Labels are in the paper's words (STRATEGY_LABELS: "generative distillation" for
full_generation_distillation, "generative replay" for no_distillation, ...); runs of one
strategy whose configs differ in more than the seed (bookkeeping keys such as `log.*` aside)
get the differing keys in their label, e.g. `generative distillation (strategy.lambd=3.0)`;
a generator regulariser, a class-conditional model, a moving average of the params,
min-SNR replay timesteps and sampling without DDIM's x0 clip are named in words
(`naive (fine-tuning) + EWC`, `generative distillation, class-conditional`, `generative
distillation, EMA teacher (decay 0.98)`, `generative distillation, min-SNR replay
timesteps (γ = 5.0)`, `generative distillation, DDIM without the x0 clip`).
Metric headers are readable too (METRIC_LABELS, with ↓ lower / ↑ higher is better). File
names keep the internal metric names. Experiences are 0-based, as in the metric files.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import glob
import io
import json
import math
import os
import re
import textwrap
from typing import Iterable, Sequence

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from gdjax import data as gdata
from gdjax import figures, files, regularisers, rundir, strategies
from gdjax.eval import metrics as eval_metrics
from gdjax.logs import read_metrics

# Row keys that say where a row belongs or how it was made (launch/evaluate.py's rows)
# rather than measure anything.
INDEX_KEYS = ("step", "experience", "classes_seen", "num_samples", "eval_steps")
GEN_FRAC = "gen_frac_class_"
TRUE_FRAC = "true_frac_class_"
# Families of per-class or per-experience values: in the CSV files, not in the tables
# and plots (the class histogram shows the fractions).
DETAIL_PREFIXES = (GEN_FRAC, TRUE_FRAC, "classifier_acc_exp_")
# The paper's metrics first, in this order; any others follow alphabetically.
METRIC_ORDER = ("fid", "kid", "kld", "ard", "fd_classifier", "kid_classifier",
                "classifier_accuracy", "classifier_forgetting")
HIGHER_IS_BETTER = frozenset({"classifier_accuracy"})
LOWER_IS_BETTER = frozenset(METRIC_ORDER) - HIGHER_IS_BETTER
# The paper's words for the strategies (gdjax/strategies.py's names) and the metrics.
STRATEGY_LABELS = {
    strategies.NAIVE: "naive (fine-tuning)",
    strategies.CUMULATIVE: "cumulative (joint)",
    strategies.ER: "experience replay",
    strategies.NO_DISTILLATION: "generative replay",
    strategies.FULL_GENERATION: "generative distillation",
    strategies.PARTIAL_GENERATION: "partial generation distillation",
    strategies.TRAJECTORY: "trajectory distillation",
    strategies.GAUSSIAN: "gaussian distillation",
    strategies.GAUSSIAN_SYMMETRY: "gaussian symmetry distillation",
    strategies.LWF: "LwF distillation",
}
METRIC_LABELS = {"fid": "FID", "kid": "KID", "kld": "KLD", "ard": "ARD",
                 "classifier_accuracy": "solver accuracy",
                 "classifier_forgetting": "solver forgetting"}
# The lower and upper reference points: the authors' table never picks them as the best
# entry of a column, though they are bold where their interval overlaps the best's.
NOT_CONTENDERS = frozenset({strategies.NAIVE, strategies.CUMULATIVE})
# Config keys that cannot change a run's numbers (paths, logging, checkpoint cadence: a
# resumed run ends bitwise equal), so runs differing only in them share a label.
BOOKKEEPING_KEYS = frozenset({"seed", "data.data_dir", "data.prefetch", "train.log_every",
                              "train.checkpoint_every", "train.max_to_keep"})
BOOKKEEPING_PREFIXES = ("log.",)
CSV_COLUMNS = ("strategy", "label", "metric", "experience", "mean", "sem", "std", "n")
_FIGURE_NAMES = ("class_histogram", "samples")


@dataclasses.dataclass
class RunRecord:
    """One run: its workdir, config.json, and metric row per experience index."""

    workdir: str
    config: dict
    rows: dict[int, dict]
    label: str = ""

    @property
    def seed(self):
        return self.config.get("seed")

    @property
    def strategy(self) -> str:
        return self.config["strategy"]["name"]

    @property
    def last_experience(self) -> int:
        return max(self.rows)


@dataclasses.dataclass(frozen=True)
class Stat:
    """One metric over n seeds: the mean, its standard error (population std, ddof 0, over
    sqrt(n), as the authors' report) and the sample std (ddof 1); both NaN when n = 1."""

    mean: float
    sem: float
    std: float
    n: int

    @property
    def interval(self) -> tuple[float, float]:
        """[mean - SE, mean + SE]; the mean alone for one seed."""
        half = 0.0 if math.isnan(self.sem) else self.sem
        return self.mean - half, self.mean + half


def summarize(values: Sequence[float]) -> Stat:
    a = np.asarray(values, np.float64)
    if len(a) < 2:
        return Stat(float(a.mean()), math.nan, math.nan, len(a))
    return Stat(float(a.mean()), float(a.std(ddof=0) / math.sqrt(len(a))),
                float(a.std(ddof=1)), len(a))


# label -> metric -> experience -> Stat
Table = dict[str, dict[str, dict[int, Stat]]]


# ----------------------------------------------------------------------------- finding runs

def find_runs(patterns: Iterable[str]) -> list[str]:
    """The run directories named by `patterns` (paths or glob patterns), in the order given,
    each once. Raises if nothing is given or a pattern matches no directory."""
    patterns = [p.strip() for p in patterns if p and p.strip()]
    if not patterns:
        raise ValueError("no runs given: pass --runs=<workdir or glob>[,<workdir or glob>...]")
    found: list[str] = []
    for pattern in patterns:
        is_glob = any(ch in pattern for ch in "*?[")
        matches = sorted(glob.glob(pattern)) if is_glob else [pattern]
        dirs = [os.path.normpath(m) for m in matches if os.path.isdir(m)]
        if not dirs:
            raise FileNotFoundError(f"no runs matched {pattern!r}: no such directory")
        found.extend(d for d in dirs if d not in found)
    return found


def _read_config(workdir: str) -> dict:
    """The run's config.json (`rundir.read_config`), its errors telling what to do here."""
    try:
        config = rundir.read_config(workdir)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"{e} Remove {workdir} from --runs.") from None
    if not all(isinstance(config[s].get("name"), str) for s in ("data", "strategy")):
        raise ValueError(f"{rundir.config_path(workdir)} has no data.name / strategy.name: it "
                         f"is not the config.json of a gdjax run; remove {workdir} from --runs.")
    return config


def load_run(workdir: str, stream: str = "experience") -> RunRecord:
    """A run's config and its rows of `stream` by experience (a repeated experience: the
    last row wins). Raises, naming the run, if it has no config.json or no such rows."""
    config = _read_config(workdir)
    rows: dict[int, dict] = {}
    for row in read_metrics(workdir, stream):
        if not isinstance(row.get("experience"), int):
            raise ValueError(f"{workdir}/metrics/{stream}.jsonl has a row without an integer "
                             f"'experience' (step {row['step']}): not a per-experience stream.")
        rows[row["experience"]] = row
    if not rows:
        hint = ("run `python -m launch.evaluate --workdir` on it first" if stream == "evaluation"
                else "it is not a finished gdjax run: let it finish at least one experience")
        raise ValueError(f"{workdir} has no evaluated experience (no rows in "
                         f"metrics/{stream}.jsonl): {hint}, or remove it from --runs.")
    return RunRecord(workdir, config, rows)


def _check_one_dataset(runs: Sequence[RunRecord]) -> None:
    first = runs[0]
    for run in runs[1:]:
        if run.config["data"]["name"] != first.config["data"]["name"]:
            raise ValueError(
                f"runs of different data sets: {first.workdir} has data.name="
                f"{first.config['data']['name']!r}, {run.workdir} has data.name="
                f"{run.config['data']['name']!r}; report one data set at a time.")


# ----------------------------------------------------------------------------- labels

def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _is_bookkeeping(key: str) -> bool:
    return key in BOOKKEEPING_KEYS or key.startswith(BOOKKEEPING_PREFIXES)


def _varying_keys(configs: Sequence[dict]) -> list[str]:
    """Keys (dotted) whose values differ between `configs`, seed and bookkeeping aside; a
    run of older code lacking a key added since (rundir.ADDED_KEYS) holds its old-code value
    there."""
    flats = [_flatten(rundir.with_added_keys(c)) for c in configs]
    keys = sorted(set().union(*flats))
    # JSON text compares lists and absent keys (None) alike across configs.
    return [k for k in keys if not _is_bookkeeping(k)
            and len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _method_words(run: RunRecord) -> str:
    """What the run adds to its strategy, in words: a generator regulariser, class
    conditioning, a moving average of the params (as the teacher or for evaluation), min-SNR
    replay timesteps, a sampler without the x0 clip; "" for none of them."""
    config = rundir.with_added_keys(run.config)
    strategy, train = config["strategy"], config["train"]
    words = ""
    if strategy["regulariser"] != regularisers.NONE:
        words += f" + {regularisers.LABELS.get(strategy['regulariser'], strategy['regulariser'])}"
    if config["model"]["class_conditional"]:
        words += ", class-conditional"
    if train["ema_decay"] > 0:
        kind = "EMA teacher" if train["ema_teacher"] else "EMA of the params"
        words += f", {kind} (decay {_show(train['ema_decay'])})"
    if strategy["replay_timesteps"] == "min_snr":
        words += f", min-SNR replay timesteps (γ = {_show(strategy['replay_snr_gamma'])})"
    if not config["diffusion"]["clip_sample"]:
        words += ", DDIM without the x0 clip"
    return words


# Config keys a label names in words, not as key=value: they are part of the method.
_NAMED_KEYS = ("strategy.regulariser", "model.class_conditional", "train.ema_decay",
               "train.ema_teacher", "strategy.replay_timesteps", "strategy.replay_snr_gamma",
               "diffusion.clip_sample")


def assign_labels(runs: Sequence[RunRecord]) -> None:
    """Sets each run's label: its strategy in the paper's words, plus the config values that
    set it apart from other runs of that strategy. Raises if one label holds a seed twice."""
    by_method = collections.defaultdict(list)
    for run in runs:  # what _method_words names is part of the method, so of the name
        by_method[(run.strategy, _method_words(run))].append(run)
    for (name, words), group in by_method.items():
        varying = [k for k in _varying_keys([r.config for r in group]) if k not in _NAMED_KEYS]
        for run in group:
            flat = _flatten(rundir.with_added_keys(run.config))
            extra = ", ".join(f"{k}={_show(flat.get(k))}" for k in varying)
            label = STRATEGY_LABELS.get(name, name) + words
            run.label = f"{label} ({extra})" if extra else label
    seen: dict[tuple, str] = {}
    for run in runs:
        other = seen.setdefault((run.label, json.dumps(run.seed)), run.workdir)
        if other != run.workdir:
            raise ValueError(
                f"{other} and {run.workdir} are both {run.label} with seed {run.seed}: the "
                f"same run twice would count as two seeds; remove one from --runs.")


def _label_order(label: str, runs: Sequence[RunRecord]) -> tuple:
    name = runs[0].strategy
    rank = strategies.STRATEGIES.index(name) if name in strategies.STRATEGIES else 99
    return rank, label


def group_runs(runs: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    """label -> its runs sorted by seed; labels in the strategies' canonical order."""
    groups = collections.defaultdict(list)
    for run in runs:
        groups[run.label].append(run)
    ordered = sorted(groups.items(), key=lambda item: _label_order(*item))
    return {label: sorted(rs, key=_seed_order) for label, rs in ordered}


def _seed_order(run: RunRecord) -> tuple:
    return (run.seed if _is_number(run.seed) else math.inf, run.workdir)


def load_runs(workdirs: Sequence[str], stream: str = "experience") -> dict[str, list[RunRecord]]:
    """Loads, checks and labels the runs; returns them grouped as `group_runs` does."""
    if not workdirs:
        raise ValueError("no runs matched: nothing to report.")
    runs = [load_run(w, stream) for w in workdirs]
    _check_one_dataset(runs)
    assign_labels(runs)
    return group_runs(runs)


# ----------------------------------------------------------------------------- statistics

def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def per_experience(groups: dict[str, list[RunRecord]]) -> Table:
    """label -> metric -> experience -> Stat over the label's runs that have that value."""
    table: Table = {}
    for label, runs in groups.items():
        values = collections.defaultdict(lambda: collections.defaultdict(list))
        for run in runs:
            for k, row in run.rows.items():
                for name, value in row.items():
                    if name not in INDEX_KEYS and _is_number(value):
                        values[name][k].append(float(value))
        table[label] = {m: {k: summarize(v) for k, v in sorted(per_k.items())}
                        for m, per_k in values.items()}
    return table


def last_experiences(groups: dict[str, list[RunRecord]]) -> dict[str, int]:
    """label -> the last experience any of its runs reached."""
    return {label: max(r.last_experience for r in runs) for label, runs in groups.items()}


def metric_names(table: Table, *, details: bool = False) -> list[str]:
    """The metrics in `table`, the paper's first; the DETAIL_PREFIXES families only if
    `details`."""
    names = {m for per_metric in table.values() for m in per_metric}
    if not details:
        names = {m for m in names if not m.startswith(DETAIL_PREFIXES)}
    known = [m for m in METRIC_ORDER if m in names]
    return known + sorted(names - set(known))


def _direction(metric: str) -> int:
    """-1 if lower is better, +1 if higher is, 0 if unknown."""
    return -1 if metric in LOWER_IS_BETTER else 1 if metric in HIGHER_IS_BETTER else 0


def best_entries(groups, table: Table, last: dict[str, int], metric: str) -> set[str]:
    """The labels to show in bold for `metric` at their last experience: those whose interval
    overlaps the best contender's (see the module docstring); empty if `metric` has no
    known direction or no contender has a finite mean."""
    stats = {label: table[label].get(metric, {}).get(last[label]) for label in groups}
    stats = {label: s for label, s in stats.items() if s is not None and math.isfinite(s.mean)}
    contenders = [label for label in stats if groups[label][0].strategy not in NOT_CONTENDERS]
    if not _direction(metric) or not contenders:
        return set()
    pick = min if _direction(metric) < 0 else max  # the first of equal means
    low, high = stats[pick(contenders, key=lambda label: stats[label].mean)].interval
    return {label for label, s in stats.items()
            if s.interval[0] <= high and s.interval[1] >= low}


# ----------------------------------------------------------------------------- best seeds

# The per-experience metric whose area under the curve ranks a strategy's seeds, the first
# of these that every run of the strategy has at each of its experiences (the authors rank by
# FID; a run with FID at its last experience only falls back to fd_classifier).
AUC_METRICS = ("fid", "fd_classifier", "kld")
FORGETTING = "classifier_forgetting"


@dataclasses.dataclass(frozen=True)
class BestSeed:
    """A strategy's best seed by `criterion` (`<metric>_auc` or `classifier_forgetting`):
    its `value` there and its metrics at its last experience."""

    criterion: str
    seed: object
    value: float
    last: dict[str, float]


def _curve(run: RunRecord, metric: str) -> list[float] | None:
    """`metric` at each of the run's experiences in order; None if any is missing."""
    values = [run.rows[k].get(metric) for k in sorted(run.rows)]
    return [float(v) for v in values] if all(_is_number(v) for v in values) else None


def auc_metric(runs: Sequence[RunRecord]) -> str | None:
    """The first of AUC_METRICS present at every experience of every run (two or more
    experiences each); None if none is."""
    for metric in AUC_METRICS:
        curves = [_curve(r, metric) for r in runs]
        if all(c is not None and len(c) >= 2 for c in curves):
            return metric
    return None


def _last_metrics(run: RunRecord) -> dict[str, float]:
    row = run.rows[run.last_experience]
    return {m: float(v) for m, v in row.items()
            if m not in INDEX_KEYS and _is_number(v) and not m.startswith(DETAIL_PREFIXES)}


def best_seeds(runs: Sequence[RunRecord]) -> list[BestSeed]:
    """The authors' summary of one strategy's seeds: the seed with the lowest area under its
    AUC metric's curve over the experiences (the trapezoid rule at unit spacing, as their
    torch.trapz), and the seed with the lowest solver forgetting at its last experience
    (where the runs record it); ties keep the first seed in order."""
    best = []
    metric = auc_metric(runs)
    if metric is not None:
        aucs = [eval_metrics.trapezoid_auc(range(len(c)), c)
                for c in (_curve(r, metric) for r in runs)]
        i = int(np.argmin(aucs))
        best.append(BestSeed(f"{metric}_auc", runs[i].seed, aucs[i], _last_metrics(runs[i])))
    forgetting = [r.rows[r.last_experience].get(FORGETTING) for r in runs]
    if all(_is_number(v) and math.isfinite(v) for v in forgetting):
        i = int(np.argmin(forgetting))
        best.append(BestSeed(FORGETTING, runs[i].seed, float(forgetting[i]),
                             _last_metrics(runs[i])))
    return best


def summary(groups: dict[str, list[RunRecord]]) -> dict:
    """summary.json: per label, its strategy, seeds and best seeds (best_seeds)."""
    return {label: {"strategy": runs[0].strategy, "seeds": [r.seed for r in runs],
                    "best": [dataclasses.asdict(b) for b in best_seeds(runs)]}
            for label, runs in groups.items()}


# ----------------------------------------------------------------------------- compute

# metrics/compute.jsonl's parts of the generator's FLOPs (gdjax/compute.py), and their sum.
FLOP_PARTS = ("student_flops", "teacher_sampling_flops", "teacher_labelling_flops")
GENERATOR_FLOPS = "generator_flops"
COST_LABELS = {GENERATOR_FLOPS: "generator TFLOP", "student_flops": "student",
               "teacher_sampling_flops": "teacher sampling",
               "teacher_labelling_flops": "teacher labelling", "wall_s": "wall time (min)"}


def _per_experience(rows: Sequence[dict], key: str) -> dict[int, float]:
    """`key` summed per experience over the `rows` that have it."""
    sums: dict[int, float] = collections.defaultdict(float)
    for row in rows:
        if isinstance(row.get("experience"), int) and _is_number(row.get(key)):
            sums[row["experience"]] += float(row[key])
    return dict(sums)


@functools.lru_cache(maxsize=None)
def _cost_rows(workdir: str) -> tuple[tuple, tuple]:
    """(compute rows, timing rows) of a run, read once per report."""
    return (tuple(read_metrics(workdir, "compute")), tuple(read_metrics(workdir, "timing")))


def run_costs(run: RunRecord) -> dict[str, dict[int, float]]:
    """cost -> experience -> value of one run: the generator's FLOPs and their parts
    (metrics/compute.jsonl) and the wall seconds (metrics/timing.jsonl), each only where
    the run has it at every one of its experiences."""
    flops, timing = _cost_rows(run.workdir)
    costs = {key: _per_experience(flops, key) for key in (GENERATOR_FLOPS, *FLOP_PARTS)}
    costs["wall_s"] = _per_experience(timing, "wall_s")
    return {key: {k: v[k] for k in sorted(run.rows)} for key, v in costs.items()
            if all(k in v for k in run.rows)}


def cost_table(groups) -> dict[str, dict[str, Stat]]:
    """label -> cost -> Stat over its runs of the whole run's total (sum over experiences)."""
    table = {}
    for label, runs in groups.items():
        totals = collections.defaultdict(list)
        for run in runs:
            for key, per_k in run_costs(run).items():
                totals[key].append(sum(per_k.values()))
        table[label] = {key: summarize(v) for key, v in totals.items()}
    return table


def _reference_label(groups, strategy: str) -> str | None:
    return next((label for label, runs in groups.items() if runs[0].strategy == strategy), None)


def _ratio(stats: dict[str, Stat], ref: dict[str, Stat] | None, key: str) -> str:
    if ref is None or key not in stats or key not in ref or not ref[key].mean:
        return "–"
    return f"{stats[key].mean / ref[key].mean:.3g}x"


def _cost_lines(groups) -> list[str]:
    table = cost_table(groups)
    if not any(table.values()):
        return ["No compute: no run has metrics/compute.jsonl or metrics/timing.jsonl rows "
                "at every experience."]
    refs = {s: _reference_label(groups, s) for s in (strategies.NO_DISTILLATION,
                                                    strategies.CUMULATIVE)}
    ref_names = {s: STRATEGY_LABELS[s] for s in refs}
    header = ["strategy", *(COST_LABELS[k] for k in (GENERATOR_FLOPS, *FLOP_PARTS))]
    header += [f"FLOPs x {ref_names[s]}" for s in refs]
    header += [COST_LABELS["wall_s"]] + [f"time x {ref_names[s]}" for s in refs]
    rows = []
    for label, stats in table.items():
        flops = [f"{stats[k].mean / 1e12:.4g}" if k in stats else "–"
                 for k in (GENERATOR_FLOPS, *FLOP_PARTS)]
        wall = stats.get("wall_s")
        minutes = "–" if wall is None else _cell(
            Stat(wall.mean / 60, wall.sem / 60, wall.std / 60, wall.n), wall.n)
        rows.append([label, *flops,
                     *(_ratio(stats, table.get(refs[s]), GENERATOR_FLOPS) for s in refs),
                     minutes, *(_ratio(stats, table.get(refs[s]), "wall_s") for s in refs)])
    return ["Per strategy, over the whole run (all experiences), the mean over seeds: the "
            "generator's model FLOPs (products and convolutions of its train step, "
            "gdjax/compute.py; TFLOP = 1e12) and their parts, and the wall time of the run "
            "(training, the solver and evaluation included; `mean ± SE (std s)` in minutes), "
            "each also as a multiple of generative replay's and cumulative's. The solver's "
            "and the evaluation's FLOPs are not counted.", ""] + _table(header, rows)


def cost_figure(groups, table: Table, cost: str) -> Figure | None:
    """Each paper metric after experience k against the cost (`generator_flops` or
    `wall_s`) spent up to the end of k: per label the means over its runs."""
    metrics = [m for m in METRIC_ORDER if any(m in t for t in table.values())]
    curves = {}
    for label, runs in groups.items():
        per_run = [run_costs(r).get(cost) for r in runs]
        if per_run and all(per_run):
            ks = sorted(set.intersection(*(set(c) for c in per_run)))
            spent = np.mean([np.cumsum([c[k] for k in ks]) for c in per_run], axis=0)
            curves[label] = (ks, spent / (1e12 if cost == GENERATOR_FLOPS else 60))
    if not curves or not metrics:
        return None
    cols = min(len(metrics), 3)
    rows = -(-len(metrics) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows), layout="constrained")
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        for label, (ks, spent) in curves.items():
            stats = table[label].get(metric, {})
            pts = [(x, stats[k].mean) for k, x in zip(ks, spent) if k in stats]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xlabel("generator TFLOP spent (model FLOPs)" if cost == GENERATOR_FLOPS
                      else "wall time spent (minutes)")
        ax.set_ylabel(_header(metric))
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    what = "the generator's FLOPs" if cost == GENERATOR_FLOPS else "wall time"
    fig.suptitle(f"Each metric after each experience against {what} spent so far "
                 "(mean over seeds)", fontsize=10)
    return fig


# ----------------------------------------------------------------------------- files

def _atomic_write(path: str, data: bytes | str) -> str:
    return str(files.atomic_write(path, data))


_save_figure = figures.save_figure


def _csv_rows(groups, table: Table, experiences: dict[str, Sequence[int]]) -> list[tuple]:
    rows = []
    for label, per_metric in table.items():
        strategy = groups[label][0].strategy
        for metric in metric_names({label: per_metric}, details=True):
            for k in experiences[label]:
                if k in per_metric[metric]:
                    s = per_metric[metric][k]
                    rows.append((strategy, label, metric, k, repr(s.mean), repr(s.sem),
                                 repr(s.std), s.n))
    return rows


def _write_csv(path: str, rows: list[tuple]) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(rows)
    return _atomic_write(path, text.getvalue().encode("utf-8"))


def _figure_file(metric: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", metric)
    return f"metric_{name}.png" if name in _FIGURE_NAMES else f"{name}.png"


def write_report(workdirs: Sequence[str], out_dir: str, *,
                 stream: str = "experience") -> dict[str, str]:
    """Writes the report of `workdirs` into `out_dir`; returns {file name: path written}."""
    _cost_rows.cache_clear()  # the files may have changed since an earlier report
    groups = load_runs(list(workdirs), stream)
    table = per_experience(groups)
    last = last_experiences(groups)
    os.makedirs(out_dir, exist_ok=True)
    out = functools.partial(os.path.join, out_dir)
    all_k = {label: sorted({k for r in runs for k in r.rows}) for label, runs in groups.items()}
    written = {
        "per_experience.csv": _write_csv(out("per_experience.csv"),
                                         _csv_rows(groups, table, all_k)),
        "last_experience.csv": _write_csv(out("last_experience.csv"), _csv_rows(
            groups, table, {label: [k] for label, k in last.items()})),
        "last_experience.tex": _atomic_write(out("last_experience.tex"), latex_table(
            groups, table, last).encode("utf-8")),
        "summary.json": _atomic_write(out("summary.json"), json.dumps(
            summary(groups), indent=2, default=str).encode("utf-8")),
    }
    for metric in metric_names(table):
        written[_figure_file(metric)] = _save_figure(
            metric_figure(table, metric), out(_figure_file(metric)))
    histogram = class_histogram_figure(groups, last)
    if histogram is not None:
        written["class_histogram.png"] = _save_figure(histogram, out("class_histogram.png"))
    for cost, name in ((GENERATOR_FLOPS, "metrics_vs_compute.png"),
                       ("wall_s", "metrics_vs_wall_time.png")):
        fig = cost_figure(groups, table, cost)
        if fig is not None:
            written[name] = _save_figure(fig, out(name))
    samples = samples_figure(groups, last)
    if samples is not None:
        written["samples.png"] = _save_figure(samples, out("samples.png"), tight=True)
    text = markdown(groups, table, last, figures=[n for n in written if n.endswith(".png")],
                    stream=stream)
    written["report.md"] = _atomic_write(out("report.md"), text.encode("utf-8"))
    return written


# ----------------------------------------------------------------------------- Markdown

def _cell(stat: Stat | None, n_runs: int, *, bold: bool = False) -> str:
    """`mean ± SE (std s)`; one seed: the mean alone; `n=k` when fewer seeds than the row."""
    if stat is None:
        return "–"
    text, notes = f"{stat.mean:.4g}", []
    if not math.isnan(stat.sem):
        text += f" ± {stat.sem:.2g}"
        notes.append(f"std {stat.std:.2g}")
    if stat.n != n_runs:
        notes.append(f"n={stat.n}")
    text += f" ({', '.join(notes)})" if notes else ""
    return f"**{text}**" if bold else text


def _header(metric: str) -> str:
    """The metric's readable name with ↓ (lower is better) or ↑ (higher is better)."""
    arrow = {-1: " ↓", 1: " ↑", 0: ""}[_direction(metric)]
    return METRIC_LABELS.get(metric, metric) + arrow


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    def line(cells):  # a "|" inside a cell (a config value in a label) would split it
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    return [line(header), "|" + "---|" * len(header)] + [line(row) for row in rows]


def _classes_seen(runs: Sequence[RunRecord], k: int) -> str:
    seen = sorted({r.rows[k].get("classes_seen") for r in runs if k in r.rows}, key=str)
    return "/".join(str(s) for s in seen)


def _last_table(groups, table: Table, last: dict[str, int], metrics: list[str]) -> list[str]:
    bold = {m: best_entries(groups, table, last, m) for m in metrics}
    rows = []
    for label, runs in groups.items():
        k, n = last[label], sum(last[label] in r.rows for r in runs)
        cells = [_cell(table[label].get(m, {}).get(k), n, bold=label in bold[m])
                 for m in metrics]
        rows.append([label, str(n), str(k), _classes_seen(runs, k), *cells])
    header = ["strategy", "n", "experience", "classes seen",
              *(f"{_header(m)} (mean ± SE)" for m in metrics)]
    return _table(header, rows)


def _metric_table(groups, table: Table, metric: str) -> list[str]:
    ks = sorted({k for per_metric in table.values() for k in per_metric.get(metric, {})})
    rows = [[label, *(_cell(table[label].get(metric, {}).get(k),
                            sum(k in r.rows for r in runs)) for k in ks)]
            for label, runs in groups.items()]
    return _table(["strategy", *map(str, ks)], rows)


def _runs_table(groups) -> list[str]:
    rows = [[label, str(r.seed), str(r.last_experience), f"`{r.workdir}`"]
            for label, runs in groups.items() for r in runs]
    return _table(["strategy", "seed", "last experience", "workdir"], rows)


def _best_seed_lines(groups) -> list[str]:
    rows = [(label, b) for label, runs in groups.items() for b in best_seeds(runs)]
    if not rows:
        return ["No best seed: no metric of AUC_METRICS at every experience of every run, "
                "and no solver forgetting."]
    shown = [m for m in METRIC_ORDER if any(m in b.last for _, b in rows)]
    lines = ["As in the authors' report: per strategy, the seed with the lowest area under "
             "the curve of its metric over the experiences (trapezoid rule, unit spacing; "
             f"the first of {', '.join(AUC_METRICS)} that every run records at every "
             "experience), and the seed with the lowest solver forgetting at the last "
             "experience; then that seed's metrics at its last experience "
             "([summary.json](summary.json)).", ""]
    body = [[label, b.criterion.replace("classifier_forgetting", "solver forgetting"),
             str(b.seed), f"{b.value:.4g}", *(f"{b.last[m]:.4g}" if m in b.last else "–"
                                              for m in shown)] for label, b in rows]
    return lines + _table(["strategy", "best by", "seed", "value",
                           *(_header(m) for m in shown)], body)


def _reference_points() -> str:
    names = sorted(NOT_CONTENDERS, key=strategies.STRATEGIES.index)
    return " and ".join(STRATEGY_LABELS[name] for name in names)


def markdown(groups, table: Table, last: dict[str, int], *, figures: Sequence[str],
             stream: str) -> str:
    """The text of report.md."""
    runs = [r for rs in groups.values() for r in rs]
    metrics = metric_names(table)
    lines = [f"# gdjax report: {runs[0].config['data']['name']}", "",
             f"Runs: {len(runs)}; strategies: {len(groups)}; rows of `metrics/{stream}.jsonl`. "
             "Each cell is `mean ± SE (std s)` over seeds: SE is the standard error of the "
             "mean, the population standard deviation (ddof 0) over sqrt(n), as in the "
             "authors' report; std is the sample standard deviation (ddof 1); n is the "
             "number of seeds (one seed: the mean alone; `n=k` marks a cell with fewer "
             "seeds than its row). Experiences are 0-based, as in the metric files; "
             "↓ lower is better, ↑ higher is better.", "",
             "## At the last experience", "",
             "**Bold**: per column, the entries whose interval mean ± SE overlaps that of the "
             "best entry (lowest mean for ↓, highest for ↑), the best being chosen, as in the "
             f"authors' report, among the strategies other than {_reference_points()}; "
             "the interval of a single seed is its mean. The same table for LaTeX: "
             "[last_experience.tex](last_experience.tex).", ""]
    lines += _last_table(groups, table, last, metrics)
    lines += ["", "## Per experience", "",
              "Columns are experiences; each cell is `mean ± SE (std s)` over seeds."]
    for metric in metrics:
        lines += ["", f"### {_header(metric)}", ""] + _metric_table(groups, table, metric)
    lines += ["", "## Best seed", ""] + _best_seed_lines(groups)
    lines += ["", "## Compute", ""] + _cost_lines(groups)
    lines += ["", "## Figures", ""]
    lines += [f"![{name[:-4]}]({name})" for name in figures]
    if "class_histogram.png" not in figures:
        lines.append("No class histogram: no row carries `gen_frac_class_<c>` fractions.")
    if "samples.png" not in figures:
        lines.append("No sample grids: no run has `samples/experience_<k>.png`.")
    lines += ["", "## Runs", ""] + _runs_table(groups) + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- LaTeX

_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                   "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                   "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}",
                   "|": r"\textbar{}"}


def latex_escape(text: str) -> str:
    """`text` with LaTeX's special characters escaped (one pass: nothing is escaped twice)."""
    return re.sub(r"[\\&%$#_{}~^<>|]", lambda m: _LATEX_SPECIALS[m.group()], text)


def _latex_header(metric: str) -> str:
    arrow = {-1: r" $\downarrow$", 1: r" $\uparrow$", 0: ""}[_direction(metric)]
    return latex_escape(METRIC_LABELS.get(metric, metric)) + arrow


def _decimals(stats: Iterable[Stat]) -> int:
    """3, as in the authors' table, or more where the column's largest |mean| would keep
    fewer than 3 significant digits (a KID of 0.0012)."""
    top = max((abs(s.mean) for s in stats if math.isfinite(s.mean)), default=0.0)
    return max(3, 2 - math.floor(math.log10(top))) if top > 0 else 3


def _latex_cell(stat: Stat | None, n_runs: int, decimals: int, bold: bool) -> str:
    if stat is None:
        return "--"
    text = f"{stat.mean:.{decimals}f}"
    if not math.isnan(stat.sem):
        text += rf" $\pm$ {stat.sem:.{decimals}f}"
    if stat.n != n_runs:
        text += f" ($n{{=}}{stat.n}$)"
    return rf"\textbf{{{text}}}" if bold else text


def latex_table(groups, table: Table, last: dict[str, int]) -> str:
    """The text of last_experience.tex: a booktabs table, one row per label, one column per
    paper metric (METRIC_ORDER; every metric if none is present) at the label's last
    experience, cells mean ± SE, the entries of `best_entries` in bold."""
    metrics = [m for m in metric_names(table) if m in METRIC_ORDER] or metric_names(table)
    stat = {(label, m): table[label].get(m, {}).get(last[label]) for label in groups
            for m in metrics}
    decimals = {m: _decimals(stat[label, m] for label in groups
                             if stat[label, m] is not None)
                for m in metrics}
    bold = {m: best_entries(groups, table, last, m) for m in metrics}
    rows = []
    for label, runs in groups.items():
        n = sum(last[label] in r.rows for r in runs)
        cells = [_latex_cell(stat[label, m], n, decimals[m], label in bold[m]) for m in metrics]
        rows.append("    " + " & ".join([latex_escape(label), *cells]) + r" \\")
    name = latex_escape(str(next(iter(groups.values()))[0].config["data"]["name"]))
    caption = (rf"{name}, last experience: mean $\pm$ standard error over seeds (population "
               r"standard deviation over $\sqrt{n}$). Bold: the interval overlaps the best "
               rf"entry's, the best chosen among strategies other than "
               rf"{latex_escape(_reference_points())}.")
    return "\n".join([
        r"% gdjax report (gdjax/report.py); needs \usepackage{booktabs}",
        r"\begin{table}[t]", r"  \centering", rf"  \caption{{{caption}}}",
        r"  \label{tab:last_experience}", rf"  \begin{{tabular}}{{l{'c' * len(metrics)}}}",
        r"    \toprule",
        "    " + " & ".join(["strategy", *map(_latex_header, metrics)]) + r" \\",
        r"    \midrule", *rows, r"    \bottomrule", r"  \end{tabular}", r"\end{table}", ""])


# ----------------------------------------------------------------------------- figures

def metric_figure(table: Table, metric: str) -> Figure:
    """`metric` against the experience: per label the mean, and a ± SE band."""
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for label, per_metric in table.items():
        stats = per_metric.get(metric)
        if not stats:
            continue
        ks = np.array(sorted(stats))
        mean = np.array([stats[k].mean for k in ks])
        sem = np.nan_to_num(np.array([stats[k].sem for k in ks]))  # one seed: no band
        line, = ax.plot(ks, mean, marker="o", label=label)
        ax.fill_between(ks, mean - sem, mean + sem, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("experience (0-based)")
    ax.set_ylabel(_header(metric))
    ax.set_title(f"{_header(metric)}: mean over seeds, band ± standard error")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _class_fractions(row: dict, prefix: str) -> dict[int, float]:
    return {int(name[len(prefix):]): float(v) for name, v in row.items()
            if name.startswith(prefix) and name[len(prefix):].isdigit()}


def true_frequencies(run: RunRecord, k: int, num_classes: int) -> np.ndarray:
    """The true class frequencies after experience k: the row's `true_frac_class_<c>` if it
    has them, else uniform over the classes seen (the run's class order, from its config)."""
    logged = _class_fractions(run.rows[k], TRUE_FRAC)
    if logged:
        return np.array([logged.get(c, 0.0) for c in range(num_classes)])
    d = run.config["data"]
    order = gdata.resolve_class_order(num_classes, seed=run.seed,
                                      fixed_order=tuple(d.get("class_order") or ()) or None)
    # As continual.build cuts them: one experience of every class unless continual.
    n_exp = d["n_experiences"] if run.config["train"].get("mode", "continual") == "continual" else 1
    seen = gdata.seen_classes(gdata.make_experiences(order, n_exp), k)
    freq = np.zeros(num_classes)
    freq[list(seen)] = 1.0 / len(seen)
    return freq


def _histogram_data(runs: Sequence[RunRecord], k: int):
    """(generated fractions [n_runs, C], true frequencies [n_runs, C]) of the runs with class
    fractions at experience k, or None if none has them."""
    rows = [(r, _class_fractions(r.rows[k], GEN_FRAC)) for r in runs if k in r.rows]
    rows = [(r, fr) for r, fr in rows if fr]
    if not rows:
        return None
    num_classes = max(max(fr) for _, fr in rows) + 1
    gen = np.array([[fr.get(c, 0.0) for c in range(num_classes)] for _, fr in rows])
    true = np.array([true_frequencies(r, k, num_classes) for r, _ in rows])
    return gen, true


def class_histogram_figure(groups, last: dict[str, int]) -> Figure | None:
    """Per label: mean (± SE over seeds) generated class fractions at its last experience,
    beside the true frequencies; None when no run logged class fractions."""
    data = {label: _histogram_data(runs, last[label]) for label, runs in groups.items()}
    data = {label: d for label, d in data.items() if d is not None}
    if not data:
        return None
    fig = Figure(figsize=(6.4, 0.6 + 2.2 * len(data)), layout="constrained")
    axes = fig.subplots(len(data), 1, squeeze=False)[:, 0]
    for ax, (label, (gen, true)) in zip(axes, data.items()):
        sem = gen.std(axis=0, ddof=0) / math.sqrt(len(gen)) if len(gen) > 1 else None
        figures.draw_class_histogram(
            ax, true.mean(axis=0), gen.mean(axis=0), error=sem,
            title=f"{label}: experience {last[label]}, n={len(gen)}",
            generated_label="generated (mean ± standard error)")
    return fig


def _first_grid(runs: Sequence[RunRecord], k: int) -> tuple[RunRecord, str] | None:
    """(run, path) of the sample grid of experience k of the first seed that has one."""
    for run in runs:
        path = os.path.join(run.workdir, "samples", f"experience_{k}.png")
        if os.path.isfile(path):
            return run, path
    return None


def samples_figure(groups, last: dict[str, int], *, columns: int = 4) -> Figure | None:
    """The last-experience sample grids of each label's first seed, titled by label; None
    when no run has one."""
    grids = {label: _first_grid(runs, last[label]) for label, runs in groups.items()}
    grids = {label: found for label, found in grids.items() if found is not None}
    if not grids:
        return None
    ncols = min(columns, len(grids))
    nrows = -(-len(grids) // ncols)
    fig = Figure(figsize=(3.2 * ncols, 3.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (label, (run, path)) in zip(axes, grids.items()):
        with Image.open(path) as image:
            ax.imshow(np.asarray(image.convert("RGB")), interpolation="nearest")
        ax.set_title(textwrap.fill(f"{label}, seed {run.seed}, experience {last[label]}", 34),
                     fontsize=8)
    for ax in axes:
        ax.axis("off")
    return fig
