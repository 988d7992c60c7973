"""The paper's studies (gdjax/studies/, launch/study.py) and the loop's evaluations within an
experience (eval.every_steps) and timing rows that they read.

The studies' logic is checked on tiny settings, with their numbers read back from the files
they wrote and recomputed here by hand: the trapezoid AUC, the best (lowest-AUC) model and
seed, the cumulative training time, the disjoint sample sets of the sample-count curve, the
mean and spread over repeats, and resumption after a kill.
"""

import csv
import json
import math
import os
import statistics

import jax
import numpy as np
import pytest

from configs import studies as study_configs
from gdjax import compute, continual, rundir, strategies
from gdjax.convert import restore_params
from gdjax.logs import MetricLogger, read_metrics
from gdjax.run import build, settings_from_config
from gdjax.state import initial_state
from gdjax.studies import common, iid, lambdas, replay_steps
from gdjax.studies import sampling as sampling_study
from tests.helpers import leaves, tiny_config


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- pieces

def test_trapezoid_auc_by_hand():
    # (5-2)(10+6)/2 + (10-5)(6+4)/2 + (20-10)(4+3)/2 = 24 + 25 + 35
    assert common.trapezoid_auc([2, 5, 10, 20], [10, 6, 4, 3]) == 84.0
    assert common.trapezoid_auc([1, 3], [2, 2]) == 4.0
    for x, y in (([5, 2], [1, 1]), ([2], [1]), ([2, 5], [1])):
        with pytest.raises(ValueError, match="increasing x"):
            common.trapezoid_auc(x, y)


def test_timer_splits_seconds_by_phase():
    now = [100.0]
    timer = continual.Timer(clock=lambda: now[0])
    now[0] += 3.0  # training
    with timer.phase("solver_s"):
        now[0] += 2.0
    with timer.phase("eval_s"):
        now[0] += 1.5
    with timer.phase("eval_s"):
        now[0] += 0.5
    assert timer.split() == {"wall_s": 7.0, "train_s": 3.0, "solver_s": 2.0, "eval_s": 2.0}
    now[0] += 4.0
    assert timer.split() == {"wall_s": 4.0, "train_s": 4.0}


def test_call_groups_also_end_at_evaluations():
    assert continual.call_groups(0, 10, 4, 6, 4) == [4, 2, 2, 2]
    assert continual.call_groups(0, 10, 4, 6, 0) == [4, 2, 4]


def test_study_and_eval_settings_are_checked():
    c = tiny_config()
    c.eval.every_steps = -1
    with pytest.raises(ValueError, match=r"eval.every_steps=-1 must be an integer >= 0"):
        settings_from_config(c)
    with pytest.raises(ValueError, match="unknown study 'iid'"):
        study_configs.get_config("iid")
    with pytest.raises(ValueError, match="study.metric='inception' is unknown"):
        common.check_metric("inception")
    study = study_configs.get_config("iid_distillation")
    study.methods = ("lwf_distillation",)
    with pytest.raises(ValueError, match="the IID study distils with"):
        iid.plan(study)
    with pytest.raises(AttributeError):
        study_configs.get_config("lambda").seed = 1  # locked: a misspelt key is an error


# ----------------------------------------------------------------------------- the loop

def params_hook(run, k, params):
    """A stand-in evaluation: a number that changes with every update of the params."""
    return {"psum": float(sum(np.abs(p).sum() for p in leaves(params)))}


def test_evaluations_within_an_experience_are_logged_checkpointed_and_resumable(
        tmp_path, monkeypatch):
    c = tiny_config("gaussian_distillation")
    c.eval.every_steps = 2
    whole = str(tmp_path / "whole")
    final = continual.train(c, whole, eval_hook=params_hook)
    rows = read_metrics(whole, "eval")
    # 2 experiences of 4 steps: an evaluation after step 2 of each (step 4 is the end's)
    assert [(r["step"], r["experience"], r["step_in_experience"]) for r in rows] == [
        (2, 0, 2), (6, 1, 2)]
    assert len({r["psum"] for r in rows + read_metrics(whole, "experience")}) == 4
    timing = read_metrics(whole, "timing")
    assert [t["step"] for t in timing] == [2, 4, 6, 8]
    for t in timing:
        assert t["wall_s"] == pytest.approx(t["train_s"] + t.get("eval_s", 0)
                                            + t.get("solver_s", 0))
        assert t["eval_s"] > 0 and t["train_s"] > 0

    # Killed after the evaluation row of step 6 was written, before its checkpoint: the
    # rerun resumes at the start of experience 1 (step 4), drops that row and redoes it.
    real_save = continual.save

    def dying_save(loop, ls, *, experience, step):
        if (experience, step) == (1, 2):
            raise KeyboardInterrupt
        real_save(loop, ls, experience=experience, step=step)

    killed = str(tmp_path / "killed")
    monkeypatch.setattr(continual, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        continual.train(c, killed, eval_hook=params_hook)
    assert [r["step"] for r in read_metrics(killed, "eval")] == [2, 6]
    monkeypatch.setattr(continual, "save", real_save)
    resumed = continual.train(c, killed, eval_hook=params_hook)
    assert read_metrics(killed, "eval") == rows
    assert [t["step"] for t in read_metrics(killed, "timing")] == [2, 4, 6, 8]
    for a, b in zip(leaves(resumed.params), leaves(final.params)):
        np.testing.assert_array_equal(a, b)
    # The generator's FLOPs per experience (gdjax/compute.py): the per-step counts times
    # the steps, gaussian distillation's replay rows labelled, never sampled.
    flops = read_metrics(whole, "compute")
    assert read_metrics(killed, "compute") == flops
    run = build(c, whole)
    counter, ls = compute.GeneratorFlops(run), initial_state(run)
    assert [r["experience"] for r in flops] == [0, 1]
    for k, row in enumerate(flops):
        total, sampling, labelling = counter.per_step(ls, k > 0)
        assert row["generator_steps"] == 4 and row["generator_flops"] == 4 * total
        assert (row["teacher_sampling_flops"], row["teacher_labelling_flops"]) == (
            4 * sampling, 4 * labelling)
        assert row["student_flops"] == pytest.approx(4 * (total - sampling - labelling))
    assert flops[1]["teacher_sampling_flops"] == 0 < flops[1]["teacher_labelling_flops"]
    assert flops[0]["teacher_labelling_flops"] == 0


# ----------------------------------------------------------------------------- IID study

class ScriptedScorer:
    """A stand-in for common.Scorer: returns the scripted values in turn, records the
    samples it was given."""

    metric, axis_label = "fd_classifier", "fd"

    def __init__(self, values=()):
        self.values, self.samples = list(values), []

    def __call__(self, run, classes, samples, seed):
        self.samples.append(np.asarray(samples))
        return float(self.values.pop(0)) if self.values else float(len(self.samples))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    c = tiny_config("naive", mode="iid")
    c.eval.batch_size = 8
    run = build(c, str(tmp_path_factory.mktemp("run")))
    from gdjax import unet
    return run, unet.init_params(run.settings.unet, jax.random.key(0))


def test_curve_hook_scores_each_step_count_and_keeps_the_lowest_auc(tiny_run):
    run, params = tiny_run
    # (2 steps, 5 steps) per call: AUCs 3 * (a + b) / 2 = 15, 9, 12, 9
    scorer = ScriptedScorer([4, 6, 2, 4, 3, 5, 1, 5])
    hook = iid.CurveHook(scorer, (2, 5), num_samples=6)
    versions = [jax.tree.map(lambda p, i=i: p + i, params) for i in range(4)]
    rows = [hook(run, 0, p) for p in versions]
    assert [r["auc"] for r in rows] == [15.0, 9.0, 12.0, 9.0]
    assert (rows[0]["fd_classifier_2"], rows[0]["fd_classifier_5"]) == (4.0, 6.0)
    assert [s.shape for s in scorer.samples] == [(6, 16, 16, 1)] * 8
    best = json.load(open(os.path.join(run.workdir, iid.BEST_FILE)))
    assert best == {"auc": 9.0}
    _, kept = restore_params(os.path.join(run.workdir, iid.BEST_PARAMS))
    for a, b in zip(leaves(kept), leaves(versions[3])):  # a tie keeps the later
        np.testing.assert_array_equal(a, b)


def fake_iid_train(scripts):
    """A stand-in for continual.train in the IID study: writes config.json and the rows
    a run writes (eval, experience and timing streams), AUCs from `scripts[workdir name]`."""

    def train(config, workdir, eval_hook=None):
        name = os.path.basename(workdir)
        aucs = scripts[name]
        os.makedirs(workdir, exist_ok=True)
        rundir.write_config(workdir, config.to_dict())
        every = config.eval.every_steps or config.train.steps_per_experience
        with MetricLogger(workdir, tensorboard=False) as logger:
            for i, auc in enumerate(aucs):
                step = every * (i + 1)
                stream = "experience" if i == len(aucs) - 1 else "eval"
                logger.write(stream, step, {"experience": 0, "auc": auc, "fd_classifier_2": auc,
                                            "fd_classifier_5": auc / 2})
                logger.write("timing", step, {"experience": 0, "wall_s": 3.0 + i,
                                              "train_s": 1.0 + i, "eval_s": 2.0})
        train.calls.append(name)

    train.calls = []
    return train


def test_iid_study_reports_the_best_auc_seed_and_its_spread(tmp_path, monkeypatch):
    study = study_configs.get_config("iid_distillation")
    study.methods = ("gaussian_distillation", "full_generation_distillation")
    study.seeds = (42, 69)
    study.teacher_steps_sweep = (1, 2)
    study.generation_steps = (2, 5)
    study.student_steps, study.eval_every = 4, 2
    scripts = {"teacher": [50.0],
               "gaussian_distillation_seed42": [30.0, 20.0],
               "gaussian_distillation_seed69": [10.0, 25.0],
               "full_generation_distillation_steps1_seed42": [9.0, 8.0],
               "full_generation_distillation_steps1_seed69": [7.0, 7.0],
               "full_generation_distillation_steps2_seed42": [5.0, 6.0],
               "full_generation_distillation_steps2_seed69": [4.0, 3.0]}
    train = fake_iid_train(scripts)
    monkeypatch.setattr(common, "Scorer", lambda settings, metric: ScriptedScorer())
    root = str(tmp_path / "iid")
    paths = iid.run_study(study, tiny_config("naive"), root, train_fn=train)
    assert train.calls == list(scripts)
    teacher = json.load(open(os.path.join(root, "teacher", "config.json")))
    assert (teacher["train"]["mode"], teacher["strategy"]["name"]) == ("iid", "naive")
    student = json.load(open(os.path.join(root, "full_generation_distillation_steps1_seed69",
                                          "config.json")))
    assert (student["train"]["mode"], student["strategy"]["teacher_steps"], student["seed"],
            student["eval"]["every_steps"], student["solver"]["enabled"]) == (
        "iid_distill", 1, 69, 2, False)
    assert student["train"]["teacher_dir"] == os.path.abspath(
        os.path.join(root, "teacher", "final_params"))

    best = {(b["method"], b["teacher_steps"]): b for b in read_csv(paths["best.csv"])}
    g = best[("gaussian_distillation", "2")]
    assert (g["best_seed"], float(g["best_auc"]), g["best_step"]) == ("69", 10.0, "2")
    assert float(g["auc_mean"]) == pytest.approx((20 + 10) / 2)
    assert float(g["auc_sem"]) == pytest.approx(statistics.pstdev([20, 10]) / math.sqrt(2))
    f1 = best[("full_generation_distillation", "1")]
    assert (f1["best_seed"], float(f1["best_auc"]), f1["best_step"]) == ("69", 7.0, "4")
    f2 = best[("full_generation_distillation", "2")]
    assert (f2["best_seed"], float(f2["best_auc"]), float(f2["auc_mean"])) == ("69", 3.0, 4.0)
    assert float(f2["fd_classifier_5"]) == 1.5
    rows = [r for r in read_csv(paths["evaluations.csv"])
            if r["method"] == "gaussian_distillation" and r["seed"] == "42"]
    assert [(r["step"], float(r["train_s"])) for r in rows] == [("2", 1.0), ("4", 3.0)]
    assert rows[0]["label"] == "gaussian distillation"
    text = open(paths["report.md"]).read()
    assert "| generative distillation | 2 | 69 | 3 | 4 |" in text
    for name in ("metric_vs_iterations.png", "auc_vs_teacher_steps.png",
                 "metric_vs_wall_time.png"):
        assert os.path.getsize(paths[name]) > 0


# ----------------------------------------------------------------------------- sampling

def test_sampling_cost_draws_disjoint_sets_and_resumes(tmp_path, tiny_run, monkeypatch):
    run, params = tiny_run
    study = study_configs.get_config("sampling_cost")
    study.generation_steps, study.num_samples = (1, 3), 10
    study.sample_counts, study.repeats, study.count_steps = (4, 8), 3, 2
    draws = []
    real_generate = sampling_study.sampling.generate

    def recording_generate(*args, **kwargs):
        out = real_generate(*args, **kwargs)
        draws.append((kwargs["num"], kwargs["num_steps"], kwargs["first_row"], out))
        return out

    monkeypatch.setattr(sampling_study.sampling, "generate", recording_generate)
    monkeypatch.setattr(sampling_study, "model", lambda *a, **k: (run, params))
    values = iter([1.0, 2.0, 10.0, 12.0])

    class Dying(ScriptedScorer):
        def __call__(self, run, classes, samples, seed):
            super().__call__(run, classes, samples, seed)
            value = next(values, None)
            if value is None:
                raise KeyboardInterrupt  # killed inside the count curve's 3rd set
            return value

    monkeypatch.setattr(common, "Scorer", lambda settings, metric: Dying())
    root = str(tmp_path / "cost")
    with pytest.raises(KeyboardInterrupt):
        sampling_study.run_study(study, None, root)
    # each step count: one warm-up batch of the timed draw's batch shape (eval.batch_size 8),
    # so the timed draw of 10 (two batches of 8) compiles nothing
    assert [(n, steps) for n, steps, _, _ in draws[:4]] == [(8, 1), (10, 1), (8, 3), (10, 3)]
    monkeypatch.setattr(common, "Scorer",
                        lambda settings, metric: ScriptedScorer([14.0, 20.0, 22.0, 24.0, 26.0]))
    draws.clear()
    paths = sampling_study.run_study(study, None, root)
    # only the 4 missing sets were drawn again, each from its own rows
    assert [(n, steps, first) for n, steps, first, _ in draws] == [
        (4, 2, 8), (8, 2, 0), (8, 2, 8), (8, 2, 16)]
    counts = read_csv(paths["counts.csv"])
    assert [(c["count"], float(c["mean"]), float(c["std"])) for c in counts] == [
        ("4", pytest.approx(12.0), pytest.approx(statistics.stdev([10, 12, 14]))),
        ("8", pytest.approx(22.0), pytest.approx(statistics.stdev([20, 22, 24])))]
    steps = read_csv(paths["steps.csv"])
    assert [(s["steps"], float(s["fd_classifier"])) for s in steps] == [("1", 1.0), ("3", 2.0)]
    assert all(float(s["ms_per_image"]) > 0 for s in steps)
    # the 3 sets of 8 are rows 0..23 of one draw, so no two share a sample
    eight = [out for n, _, _, out in draws if n == 8]
    assert not any(np.array_equal(a, b) for i, a in enumerate(eight) for b in eight[i + 1:])
    whole = real_generate(run.apply_fn, params, run.schedule,
                          sampling_study.rng.key(run.settings.seed, "study_counts", 8), num=24,
                          image_shape=run.image_shape, num_steps=2, batch_size=8)
    np.testing.assert_allclose(np.concatenate(eight), whole, atol=1e-6)
    for name in ("metric_vs_steps.png", "time_vs_steps.png", "metric_vs_samples.png"):
        assert os.path.getsize(paths[name]) > 0


# ----------------------------------------------------------------------------- lambda

def test_lambda_study_runs_each_strategy_at_each_lambda_and_plots_it(tmp_path):
    study = study_configs.get_config("lambda")
    study.seeds = (1, 2)
    study.lambdas = {"full_generation_distillation": (0.5, 3.0), "gaussian_distillation": (4.0,)}

    def config_for(name):
        c = tiny_config(name)
        c.train.steps_per_experience = 2
        return c

    runs = lambdas.plan(study, config_for)
    assert [n for n, _ in runs] == [
        "full_generation_distillation_lambda0.5_seed1", "full_generation_distillation_lambda0.5_seed2",
        "full_generation_distillation_lambda3_seed1", "full_generation_distillation_lambda3_seed2",
        "gaussian_distillation_lambda4_seed1", "gaussian_distillation_lambda4_seed2"]
    assert [(c.strategy.lambd, c.seed) for _, c in runs][:3] == [(0.5, 1), (0.5, 2), (3.0, 1)]

    def fake_train(config, workdir, eval_hook=None):
        os.makedirs(workdir, exist_ok=True)
        rundir.write_config(workdir, config.to_dict())
        with MetricLogger(workdir, tensorboard=False) as logger:
            for k in (0, 1):
                logger.write("experience", 2 * (k + 1), {
                    "experience": k, "classes_seen": 5 * (k + 1),
                    "kld": config.strategy.lambd * 10 + config.seed + k})

    paths = lambdas.run_study(study, config_for, str(tmp_path), train_fn=fake_train,
                              hook_fn=lambda c: None)
    rows = {(r["strategy"], float(r["lambda"])): r for r in read_csv(paths["lambda.csv"])
            if r["metric"] == "kld"}
    # the last experience (k = 1): 10 lambda + seed + 1 over seeds 1 and 2
    assert float(rows[("full_generation_distillation", 3.0)]["mean"]) == pytest.approx(32.5)
    assert float(rows[("full_generation_distillation", 3.0)]["sem"]) == pytest.approx(
        statistics.pstdev([32, 33]) / math.sqrt(2))
    assert float(rows[("gaussian_distillation", 4.0)]["mean"]) == pytest.approx(42.5)
    assert os.path.getsize(paths["kld_vs_lambda.png"]) > 0
    assert "report.md" in paths
    with pytest.raises(ValueError, match="has no lambda"):
        study.lambdas = {"naive": (1.0,)}
        lambdas.plan(study, config_for)


# ----------------------------------------------------------------------------- replay steps

def test_replay_steps_study_plots_accuracy_against_steps_and_the_metric(tmp_path):
    study = study_configs.get_config("replay_steps")
    study.seeds = (1, 2)
    study.generation_steps = (2, 10)

    def config_for(name):
        c = tiny_config(name, solver=True)
        c.train.steps_per_experience = 2
        return c

    runs = replay_steps.plan(study, config_for)
    assert [n for n, _ in runs] == [
        "full_generation_distillation_steps2_seed1", "full_generation_distillation_steps2_seed2",
        "full_generation_distillation_steps10_seed1", "full_generation_distillation_steps10_seed2"]
    assert [(c.eval.steps, c.seed) for _, c in runs] == [(2, 1), (2, 2), (10, 1), (10, 2)]

    def fake_train(config, workdir, eval_hook=None):
        os.makedirs(workdir, exist_ok=True)
        rundir.write_config(workdir, config.to_dict())
        n, seed = config.eval.steps, config.seed
        with MetricLogger(workdir, tensorboard=False) as logger:
            for k in (0, 1):
                logger.write("experience", 2 * (k + 1), {
                    "experience": k, "classes_seen": 5 * (k + 1),
                    "fd_classifier": 100.0 / n + seed + k,
                    "classifier_accuracy": 0.05 * n + 0.01 * seed,
                    "classifier_forgetting": 0.5 - 0.02 * n})

    paths = replay_steps.run_study(study, config_for, str(tmp_path), train_fn=fake_train,
                                   hook_fn=lambda c: None)
    rows = {(int(r["steps"]), r["metric"]): r for r in read_csv(paths["replay_steps.csv"])}
    # The last experience (k = 1), over seeds 1 and 2.
    assert float(rows[2, "fd_classifier"]["mean"]) == pytest.approx(50 + 1.5 + 1)
    assert float(rows[10, "classifier_accuracy"]["mean"]) == pytest.approx(0.515)
    assert float(rows[10, "classifier_accuracy"]["sem"]) == pytest.approx(
        statistics.pstdev([0.51, 0.52]) / math.sqrt(2))
    assert float(rows[2, "classifier_forgetting"]["mean"]) == pytest.approx(0.46)
    for name in ("accuracy_vs_steps.png", "forgetting_vs_steps.png",
                 "fd_classifier_vs_steps.png", "fd_classifier_vs_accuracy.png", "report.md"):
        assert os.path.getsize(paths[name]) > 0
    fig = replay_steps.metric_vs_accuracy_figure(
        [{**r, "mean": float(r["mean"]), "sem": float(r["sem"]), "steps": int(r["steps"])}
         for r in rows.values()], "fd_classifier")
    line, = fig.axes[0].get_lines()
    assert line.get_label() == "generative distillation"
    # Sorted by fd_classifier: 100/10 + 1.5 + 1 (10 steps), then 100/2 + 1.5 + 1 (2 steps).
    np.testing.assert_allclose(line.get_xdata(), [12.5, 52.5])
    np.testing.assert_allclose(line.get_ydata(), [0.515, 0.115])
    with pytest.raises(ValueError, match="solver's accuracy"):
        replay_steps.plan(study, lambda name: tiny_config(name, solver=False))


# ----------------------------------------------------------------------------- the command

_COMMAND = """
import json, sys
sys.argv = ["study", "--study=configs/studies.py:iid_distillation", "--study.seeds=(42,69)",
            "--study.student_steps=7", "--config.train.batch_size=32"]
from absl import flags
from gdjax import studies
import launch.study as launcher  # ml_collections reads the overrides from sys.argv here
flags.FLAGS(sys.argv)
studies.run = lambda study, config_for, root: print(json.dumps(dict(
    seeds=list(study.seeds), student_steps=study.student_steps, methods=list(study.methods),
    data=config_for("naive").data.name, batch=config_for("naive").train.batch_size,
    root=root))) or {}
launcher.main([])
"""


def test_study_command_parses_the_study_and_its_overrides():
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _COMMAND], cwd=root, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.splitlines()[0])
    assert got["root"] == "runs/study_iid_distillation_digits"
    assert (got["seeds"], got["student_steps"]) == ([42, 69], 7)
    assert (got["data"], got["batch"]) == ("digits", 32)
    assert strategies.GAUSSIAN_SYMMETRY in got["methods"]

