"""Sampling cost: what a trained model's samples are worth against what they cost.

    <root>/teacher/          the IID teacher (study.params_dir empty), trained as in the IID study
    <root>/steps.jsonl       per DDIM step count: the metric of study.num_samples samples and
                             their sampling seconds (compilation excluded)
    <root>/counts.jsonl      per (number of samples, repeat): the metric at study.count_steps
    <root>/report/           report.md, CSVs and PNGs

The repeats of one sample count draw disjoint rows of one noise draw (repeat r of n samples:
rows r*n..(r+1)*n - 1), so their spread is the metric's own sampling noise. Every point is
written as it is finished; the study started again redoes only the missing ones.
"""

from __future__ import annotations

import logging
import os
import time

import jax

from gdjax import continual, files, rng, rundir
from gdjax.convert import restore_params
from gdjax.eval import sampling
from gdjax.logs import Progress
from gdjax.report import summarize
from gdjax.run import build
from gdjax.studies import common, iid

log = logging.getLogger(__name__)


def model(study, base, root: str, *, train_fn=None):
    """(the run the samples are scored in, the params scored): `study.params_dir`, or the
    IID teacher trained (or resumed) into <root>/teacher."""
    config = iid.teacher_config(base, study)
    teacher_dir = os.path.join(root, "teacher")
    params_dir = study.params_dir
    if not params_dir:
        (train_fn or continual.train)(config, teacher_dir)
        params_dir = rundir.final_params_dir(teacher_dir)
    run = build(config, teacher_dir)
    unet_config, params = restore_params(params_dir)
    if unet_config != run.settings.unet:
        raise ValueError(f"study.params_dir={params_dir!r} holds a {unet_config} model, but "
                         f"the run config's is {run.settings.unet}: pass the --config the "
                         f"model was trained with.")
    return run, jax.device_put(params, run.replicated)


def _draw(run, params, key, *, num: int, steps: int, first_row: int = 0):
    e = run.settings.eval
    return sampling.generate(run.apply_fn, params, run.schedule, key, num=num,
                             image_shape=run.image_shape, num_steps=steps, eta=e.eta,
                             batch_size=e.batch_size, sharding=run.sharding,
                             first_row=first_row)


def run_study(study, base, root: str, *, train_fn=None) -> dict[str, str]:
    common.check_metric(study.metric)
    run, params = model(study, base, root, train_fn=train_fn)
    scorer = common.Scorer(run.settings, study.metric)
    classes = run.experiences[0]  # train.mode="iid": every class
    seed, metric = run.settings.seed, study.metric
    steps = common.Points(os.path.join(root, "steps.jsonl"), ["steps"])
    todo = [int(g) for g in study.generation_steps if steps.get(steps=int(g)) is None]
    progress = Progress(len(todo), "sampling cost: DDIM step counts", unit="count")
    for g in todo:
        key = rng.key(seed, "study_steps", g)
        # One batch of the timed draw's shape compiles its sampler; the timed draw does not.
        _draw(run, params, key, num=min(run.settings.eval.batch_size, study.num_samples),
              steps=g)
        start = time.perf_counter()
        samples = _draw(run, params, key, num=study.num_samples, steps=g)
        seconds = time.perf_counter() - start
        steps.add({"steps": g, metric: scorer(run, classes, samples,
                                              rng.numpy_rng(seed, "study_steps", g)),
                   "sample_s": seconds, "ms_per_image": 1e3 * seconds / study.num_samples})
        progress.update(1)
    progress.close()
    counts = common.Points(os.path.join(root, "counts.jsonl"), ["count", "repeat"])
    todo = [(int(n), r) for n in study.sample_counts for r in range(study.repeats)
            if counts.get(count=int(n), repeat=r) is None]
    progress = Progress(len(todo), "sampling cost: sample counts", unit="set")
    for n, r in todo:
        samples = _draw(run, params, rng.key(seed, "study_counts", n), num=n,
                        steps=study.count_steps, first_row=r * n)
        counts.add({"count": n, "repeat": r, "first_row": r * n,
                    metric: scorer(run, classes, samples,
                                   rng.numpy_rng(seed, "study_counts", n, r))})
        progress.update(1)
    progress.close()
    return write_report(study, root, steps.rows, counts.rows, scorer.axis_label)


def write_report(study, root: str, step_rows, count_rows, axis_label: str) -> dict[str, str]:
    out_dir = os.path.join(root, "report")
    os.makedirs(out_dir, exist_ok=True)
    metric = study.metric
    step_rows = sorted((r for r in step_rows if r["steps"] in set(study.generation_steps)),
                       key=lambda r: r["steps"])
    summary = []
    for n in sorted(set(int(c) for c in study.sample_counts)):
        values = [r[metric] for r in count_rows if r["count"] == n]
        stat = summarize(values)
        summary.append({"count": n, "mean": stat.mean, "sem": stat.sem, "std": stat.std,
                        "repeats": stat.n})
    paths = {"steps.csv": common.write_csv(os.path.join(out_dir, "steps.csv"), step_rows),
             "counts.csv": common.write_csv(os.path.join(out_dir, "counts.csv"), summary)}
    x = [r["steps"] for r in step_rows]
    fig = common.line_figure({"the model": (x, [r[metric] for r in step_rows])},
                             xlabel="DDIM generation steps", ylabel=axis_label, logx=True,
                             title=f"Sample quality against generation steps "
                                   f"({study.num_samples} samples)")
    paths["metric_vs_steps.png"] = common.save(fig, os.path.join(out_dir, "metric_vs_steps.png"))
    fig = common.line_figure({"sampling time": (x, [r["ms_per_image"] for r in step_rows])},
                             xlabel="DDIM generation steps", ylabel="ms per image "
                             "(compilation excluded)", logx=True,
                             title=f"Sampling cost against generation steps "
                                   f"({jax.devices()[0].device_kind})")
    paths["time_vs_steps.png"] = common.save(fig, os.path.join(out_dir, "time_vs_steps.png"))
    fig = common.line_figure(
        {f"mean ± std over {study.repeats} disjoint sample sets":
         ([s["count"] for s in summary], [s["mean"] for s in summary],
          [s["std"] for s in summary])},
        xlabel="number of samples", ylabel=axis_label, logx=True,
        title=f"The metric against the number of samples ({study.count_steps} DDIM steps)")
    paths["metric_vs_samples.png"] = common.save(
        fig, os.path.join(out_dir, "metric_vs_samples.png"))
    lines = ["# Sampling cost", "",
             f"Metric: {axis_label.splitlines()[0]}, against the test images of every class.",
             "", f"| DDIM steps | {metric} | ms per image |", "|---|---|---|"]
    lines += [f"| {r['steps']} | {r[metric]:.4g} | {r['ms_per_image']:.3g} |" for r in step_rows]
    lines += ["", f"| samples | {metric} mean | std ({study.repeats} disjoint sets) |",
              "|---|---|---|"]
    lines += [f"| {s['count']} | {s['mean']:.4g} | {s['std']:.3g} |" for s in summary]
    lines += ["", "![metric against steps](metric_vs_steps.png)", "",
              "![time against steps](time_vs_steps.png)", "",
              "![metric against samples](metric_vs_samples.png)", ""]
    paths["report.md"] = str(files.atomic_write(os.path.join(out_dir, "report.md"),
                                                "\n".join(lines)))
    return paths
