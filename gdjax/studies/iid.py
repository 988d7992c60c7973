"""The paper's first study: a teacher trained on every class, distilled into fresh students.

    <root>/teacher/                     train.mode="iid": one experience of every class
    <root>/<method>_steps<n>_seed<s>/    train.mode="iid_distill" from the teacher's
                                         final_params, n teacher DDIM steps (the gaussian
                                         methods run no reverse process: no _steps<n>)
    <root>/report/                      report.md, CSVs and PNGs

Every `study.eval_every` student steps (and at the end) the student is scored at each of
`study.generation_steps` DDIM steps (2, 5, 10, 20: the authors') with the study's metric,
and the area under that curve by the trapezoid rule (`auc`) ranks it; each run keeps its
lowest-AUC parameters in `best_params/` (ties: the later). The report gives, per method
and teacher step count, the best-AUC seed (as the authors report) and the mean ± SE over
seeds of each run's best AUC, and draws the metric against iterations, the best AUC against
teacher steps, and the metric against the student's training wall time.

Every run is an ordinary resumable gdjax run (its evaluations are checkpointed), so the
study killed at any moment and started again with the same arguments ends the same.
"""

from __future__ import annotations

import copy
import logging
import os

import numpy as np

from gdjax import continual, files, rng, rundir, strategies
from gdjax import data as gdata
from gdjax.convert import save_params
from gdjax.eval import sampling
from gdjax.logs import read_metrics
from gdjax.report import STRATEGY_LABELS, summarize
from gdjax.studies import common

log = logging.getLogger(__name__)

METHODS = (strategies.GAUSSIAN, strategies.GAUSSIAN_SYMMETRY, strategies.NO_DISTILLATION,
           strategies.FULL_GENERATION, strategies.PARTIAL_GENERATION)
BEST_PARAMS, BEST_FILE = rundir.BEST_PARAMS, rundir.BEST_FILE


class CurveHook:
    """The evaluation hook of the study's runs: the metric at each generation step count,
    their trapezoid AUC, and (`keep_best`) the params of the lowest AUC so far saved in
    `<workdir>/best_params` with `<workdir>/best.json`.

    Resumable as the run is: a run resumed from an earlier checkpoint redoes the same
    steps bit for bit, so an evaluation it redoes saves the same params again."""

    def __init__(self, scorer: common.Scorer, generation_steps, num_samples: int, *,
                 keep_best: bool = True):
        self.scorer, self.generation_steps = scorer, tuple(int(g) for g in generation_steps)
        self.num_samples, self.keep_best = int(num_samples), keep_best
        common.trapezoid_auc(self.generation_steps, [0.0] * len(self.generation_steps))

    def curve(self, run, params, classes) -> dict[str, float]:
        """{"<metric>_<g>" for each step count g, and "auc"} of `params`."""
        s, row = run.settings, {}
        for g in self.generation_steps:
            samples = sampling.generate(
                run.apply_fn, params, run.schedule, rng.key(s.seed, "study_samples", g),
                num=self.num_samples, image_shape=run.image_shape, num_steps=g,
                eta=s.eval.eta, batch_size=s.eval.batch_size, sharding=run.sharding)
            row[f"{self.scorer.metric}_{g}"] = self.scorer(
                run, classes, samples, rng.numpy_rng(s.seed, "study_score", g))
        row["auc"] = common.trapezoid_auc(self.generation_steps,
                                          [row[f"{self.scorer.metric}_{g}"]
                                           for g in self.generation_steps])
        return row

    def __call__(self, run, k: int, params) -> dict[str, float]:
        row = self.curve(run, params, gdata.seen_classes(run.experiences, k))
        if self.keep_best:
            self._keep(run, params, row["auc"])
        return row

    @staticmethod
    def _keep(run, params, auc: float) -> None:
        path = os.path.join(run.workdir, BEST_FILE)
        best = files.read_json(path)["auc"] if os.path.exists(path) else np.inf
        if auc <= best:
            save_params(os.path.join(run.workdir, BEST_PARAMS), params, run.settings.unet)
            files.write_json(path, {"auc": auc})


def run_name(method: str, teacher_steps: int, seed: int) -> str:
    steps = f"_steps{teacher_steps}" if method in strategies.GENERATIVE_STRATEGIES else ""
    return f"{method}{steps}_seed{seed}"


def plan(study) -> list[tuple[str, int, int]]:
    """(method, teacher steps, seed) of every student run: the generative methods at each
    of `study.teacher_steps_sweep` (and `study.teacher_steps`), the gaussian ones once."""
    for m in study.methods:
        if m not in METHODS:
            raise ValueError(f"study.methods has {m!r}; the IID study distils with {METHODS}")
    sweep = sorted(set(int(n) for n in study.teacher_steps_sweep) | {int(study.teacher_steps)})
    out = []
    for m in study.methods:
        for n in (sweep if m in strategies.GENERATIVE_STRATEGIES else [int(study.teacher_steps)]):
            out += [(m, n, int(seed)) for seed in study.seeds]
    return out


def teacher_config(base, study):
    c = copy.deepcopy(base)
    c.strategy.name = strategies.NAIVE
    c.train.mode = "iid"
    c.train.steps_per_experience = int(study.teacher_training_steps)
    c.solver.enabled = False
    c.eval.every_steps = 0
    return c


def student_config(base, study, teacher_dir: str, method: str, teacher_steps: int, seed: int):
    c = copy.deepcopy(base)
    c.seed = seed
    c.strategy.name = method
    c.strategy.teacher_steps = teacher_steps
    c.train.mode = "iid_distill"
    c.train.teacher_dir = os.path.abspath(teacher_dir)
    c.train.steps_per_experience = int(study.student_steps)
    c.eval.every_steps = int(study.eval_every)
    c.solver.enabled = False
    return c


def run_study(study, base, root: str, *, train_fn=None) -> dict[str, str]:
    """Trains (or resumes, or skips) the teacher and every student run of `study` (the
    ConfigDict of configs/studies.py) from the run config `base`, then writes the report;
    returns its paths. `train_fn(config, workdir, eval_hook=...)`: `continual.train`."""
    from gdjax.run import settings_from_config
    train_fn = train_fn or continual.train
    runs = plan(study)
    teacher = teacher_config(base, study)
    scorer = common.Scorer(settings_from_config(teacher), study.metric)
    hook = lambda keep: CurveHook(scorer, study.generation_steps, study.num_samples,  # noqa: E731
                                  keep_best=keep)
    teacher_dir = os.path.join(root, "teacher")
    log.warning("IID study: the teacher (%d steps on every class)", study.teacher_training_steps)
    train_fn(teacher, teacher_dir, eval_hook=hook(False))
    for i, (method, n, seed) in enumerate(runs):
        log.warning("IID study: run %d/%d %s", i + 1, len(runs), run_name(method, n, seed))
        config = student_config(base, study, rundir.final_params_dir(teacher_dir), method, n,
                                seed)
        train_fn(config, os.path.join(root, run_name(method, n, seed)), eval_hook=hook(True))
    return write_report(study, root, scorer.axis_label)


# ----------------------------------------------------------------------------- the report

def curve_rows(workdir: str) -> list[dict]:
    """A student run's evaluations in order: {"step", "auc", "<metric>_<g>", ...,
    "train_s"} with the student's cumulative training seconds (compilation included,
    evaluation excluded) at each."""
    rows = read_metrics(workdir, "eval") + read_metrics(workdir, "experience")
    timing = read_metrics(workdir, "timing")
    out = []
    for row in sorted(rows, key=lambda r: r["step"]):
        spent = sum(t["train_s"] for t in timing if t["step"] <= row["step"])
        out.append({**{k: v for k, v in row.items()
                       if k not in ("experience", "step_in_experience", "classes_seen")},
                    "train_s": spent})
    return out


def write_report(study, root: str, axis_label: str) -> dict[str, str]:
    out_dir = os.path.join(root, "report")
    os.makedirs(out_dir, exist_ok=True)
    metric, gens = study.metric, [int(g) for g in study.generation_steps]
    teacher = curve_rows(os.path.join(root, "teacher"))[-1]
    long_rows, curves = [], {}
    for method, n, seed in plan(study):
        rows = curve_rows(os.path.join(root, run_name(method, n, seed)))
        curves[(method, n, seed)] = rows
        long_rows += [{"method": method, "label": STRATEGY_LABELS[method], "teacher_steps": n,
                       "seed": seed, **r} for r in rows]
    paths = {"evaluations.csv": common.write_csv(os.path.join(out_dir, "evaluations.csv"),
                                                 long_rows)}
    best = []  # per (method, teacher steps): every seed's best row
    for method in study.methods:
        for n in sorted({n for m, n, _ in curves if m == method}):
            per_seed = {s: min(curves[(m, k, s)], key=lambda r: (r["auc"], -r["step"]))
                        for m, k, s in curves if (m, k) == (method, n)}
            stat = summarize([r["auc"] for r in per_seed.values()])
            seed = min(per_seed, key=lambda s: per_seed[s]["auc"])
            best.append({"method": method, "label": STRATEGY_LABELS[method],
                         "teacher_steps": n, "best_seed": seed,
                         "best_auc": per_seed[seed]["auc"], "best_step": per_seed[seed]["step"],
                         **{f"{metric}_{g}": per_seed[seed][f"{metric}_{g}"] for g in gens},
                         "auc_mean": stat.mean, "auc_sem": stat.sem, "seeds": stat.n})
    paths["best.csv"] = common.write_csv(os.path.join(out_dir, "best.csv"), best)
    main_n = int(study.teacher_steps)

    def main_row(method):
        return next(b for b in best if b["method"] == method
                    and (b["teacher_steps"] == main_n
                         or method not in strategies.GENERATIVE_STRATEGIES))

    # The metric (at the largest step count) against iterations and against training time,
    # for each method's best-AUC seed at the main teacher step count.
    g_last = gens[-1]
    teacher_line = {f"teacher ({g_last} steps)": teacher[f"{metric}_{g_last}"]}
    for name, xkey, xlabel in (("metric_vs_iterations", "step", "student iterations"),
                               ("metric_vs_wall_time", "train_s",
                                "student training wall time (s, compilation included)")):
        series = {}
        for method in study.methods:
            b = main_row(method)
            rows = curves[(method, b["teacher_steps"], b["best_seed"])]
            series[STRATEGY_LABELS[method]] = ([r[xkey] for r in rows],
                                               [r[f"{metric}_{g_last}"] for r in rows])
        fig = common.line_figure(series, xlabel=xlabel, ylabel=axis_label, hlines=teacher_line,
                                 title=f"IID distillation: the student at {g_last} DDIM steps "
                                       f"(best-AUC seed; teacher {main_n} steps)")
        paths[f"{name}.png"] = common.save(fig, os.path.join(out_dir, f"{name}.png"))
    series = {}
    for method in study.methods:
        if method in strategies.GENERATIVE_STRATEGIES:
            rows = [b for b in best if b["method"] == method]
            series[STRATEGY_LABELS[method]] = ([b["teacher_steps"] for b in rows],
                                               [b["auc_mean"] for b in rows],
                                               [b["auc_sem"] for b in rows])
    hlines = {"teacher's own AUC": teacher["auc"]}
    hlines.update({STRATEGY_LABELS[m] + " (no reverse process)": main_row(m)["auc_mean"]
                   for m in study.methods if m not in strategies.GENERATIVE_STRATEGIES})
    fig = common.line_figure(series, xlabel="teacher DDIM steps per replay batch",
                             ylabel=f"best AUC of {metric} over {gens} DDIM steps", logx=True,
                             hlines=hlines, title="IID distillation: best AUC against teacher "
                                                  "steps (mean ± SE over seeds)")
    paths["auc_vs_teacher_steps.png"] = common.save(
        fig, os.path.join(out_dir, "auc_vs_teacher_steps.png"))
    paths["report.md"] = _markdown(study, best, teacher, axis_label, out_dir)
    return paths


def _fmt(v) -> str:
    return "" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.4g}"


def _markdown(study, best, teacher, axis_label, out_dir) -> str:
    metric, gens = study.metric, [int(g) for g in study.generation_steps]
    lines = ["# IID distillation", "",
             f"A teacher trained for {study.teacher_training_steps} steps on every class, "
             f"distilled into fresh students for {study.student_steps} steps, each scored "
             f"every {study.eval_every} steps at {gens} DDIM steps with "
             f"{axis_label.splitlines()[0]} ({study.num_samples} samples); AUC: the trapezoid "
             f"rule over those step counts, lower is better. Seeds: "
             f"{', '.join(str(s) for s in study.seeds)}.", "",
             f"The teacher: AUC {_fmt(teacher['auc'])}, "
             + ", ".join(f"{g} steps {_fmt(teacher[f'{metric}_{g}'])}" for g in gens) + ".", "",
             "| method | teacher steps | best seed | best AUC | at step | "
             + " | ".join(f"{metric} @{g}" for g in gens) + " | AUC over seeds (mean ± SE) |",
             "|" + "---|" * (6 + len(gens))]
    for b in best:
        steps = b["teacher_steps"] if b["method"] in strategies.GENERATIVE_STRATEGIES else "-"
        spread = _fmt(b["auc_mean"]) + (f" ± {_fmt(b['auc_sem'])}" if b["seeds"] > 1 else "")
        lines.append(f"| {b['label']} | {steps} | {b['best_seed']} | {_fmt(b['best_auc'])} | "
                     f"{b['best_step']} | "
                     + " | ".join(_fmt(b[f"{metric}_{g}"]) for g in gens) + f" | {spread} |")
    lines += ["", "![metric against iterations](metric_vs_iterations.png)", "",
              "![best AUC against teacher steps](auc_vs_teacher_steps.png)", "",
              "![metric against training time](metric_vs_wall_time.png)", ""]
    return str(files.atomic_write(os.path.join(out_dir, "report.md"), "\n".join(lines)))
