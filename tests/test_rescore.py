"""Tests of gdjax/eval/rescore.py and launch/evaluate.py: re-evaluating a saved run.

The runs are written by the tests as continual.train leaves them (config.json through the
run directory's writer, generators through `save_params` in `experience_params/experience_<k>`),
with distinct random parameters per experience so that a fake hook can tell which generator
it was given. One test runs `python -m launch.evaluate` with the real hook and a randomly
initialised evaluation classifier, and checks kld and ard against the test labels.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import base
from gdjax import report, rundir, unet
from gdjax.eval import rescore as evaluate
from gdjax.run import config_as_json, settings_from_config
from gdjax import data as gdata
from gdjax.convert import save_params
from gdjax.eval import classifier as cls
from gdjax.eval import metrics
from gdjax.logs import read_metrics
from tests.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_config(data_dir):
    config = tiny_config("naive")
    config.solver.enabled = False
    config.data.data_dir = str(data_dir)
    return config


def random_params(config, seed):
    unet_config = unet.get_unet_config(config.model.name)
    return unet.init_params(unet_config, jax.random.key(seed)), unet_config


def checksum(params) -> float:
    return float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(params)))


def write_run(workdir, config, experiences=(0, 1), *, final=False):
    """config.json plus a generator per experience; returns {k: checksum of its params}."""
    os.makedirs(workdir, exist_ok=True)
    rundir.write_config(str(workdir), config_as_json(config))
    sums = {}
    for k in experiences:
        params, unet_config = random_params(config, seed=100 + k)
        path = (os.path.join(workdir, "final_params") if final
                else rundir.experience_params_dir(str(workdir), k))
        save_params(path, params, unet_config)
        sums[k] = checksum(params)
    return sums


class FakeHook:
    """Records each call; returns the checksum of the params it was given."""

    def __init__(self, offset=0.0):
        self.calls, self.offset = [], offset

    def __call__(self, run, k, params):
        self.calls.append((k, run.settings.eval.num_samples))
        return {"checksum": checksum(params) + self.offset, "kld": np.float32(0.25 * k)}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    config = run_config(root / "data")
    return str(root / "run"), write_run(root / "run", config)


# ----------------------------------------------------------------------------- the config

def test_config_round_trips_through_json():
    config = run_config("/somewhere")
    config.data.class_order = (3, 1, 4, 0, 5, 9, 2, 6, 8, 7)
    config.strategy.lambd = 3.0
    values = json.loads(json.dumps(config.to_dict(), default=str))
    assert values["data"]["class_order"] == [3, 1, 4, 0, 5, 9, 2, 6, 8, 7]  # JSON has no tuples
    rebuilt = evaluate.config_from_json(values, base.get_config())
    assert rebuilt.to_dict() == config.to_dict()
    assert rebuilt.data.class_order == (3, 1, 4, 0, 5, 9, 2, 6, 8, 7)


def test_keys_a_config_json_lacks_keep_the_defaults():
    values = json.loads(json.dumps(run_config("/x").to_dict(), default=str))
    del values["eval"]["grid_samples"]  # a run older than the key
    assert evaluate.config_from_json(values, base.get_config()).eval.grid_samples == 100


# ----------------------------------------------------------------------------- evaluation

def test_every_saved_generator_is_evaluated(saved_run):
    workdir, sums = saved_run
    hook = FakeHook()
    rows = evaluate.evaluate_run(workdir, base.get_config(), num_samples=7, eval_hook=hook)
    assert hook.calls == [(0, 7), (1, 7)]
    # 4 steps per experience; 2 experiences of 5 classes; the hook got experience k's params.
    assert [(r["step"], r["experience"], r["classes_seen"]) for r in rows] == [(4, 0, 5),
                                                                              (8, 1, 10)]
    assert [r["checksum"] for r in rows] == [sums[0], sums[1]]
    assert sums[0] != sums[1]
    assert all(r["num_samples"] == 7 and r["eval_steps"] == 2 for r in rows)
    written = read_metrics(workdir, "evaluation")
    assert written == [{**r, "kld": float(r["kld"])} for r in rows]
    # The report reads these rows as it reads the training-time ones.
    out = report.write_report([workdir], os.path.join(workdir, "report"), stream="evaluation")
    assert {"checksum.png", "kld.png"} <= set(out) and "num_samples.png" not in out
    assert "| naive (fine-tuning) | 1 | 1 | 10 | 0.25 | " in open(out["report.md"]).read()


def test_re_evaluation_replaces_only_its_rows(tmp_path):
    workdir = str(tmp_path / "run")
    sums = write_run(workdir, run_config(tmp_path / "data"))
    evaluate.evaluate_run(workdir, base.get_config(), eval_hook=FakeHook())
    hook = FakeHook(offset=1000.0)
    evaluate.evaluate_run(workdir, base.get_config(), experiences=[1], eval_hook=hook)
    assert hook.calls == [(1, 1000)]  # the run's own eval.num_samples
    rows = read_metrics(workdir, "evaluation")
    assert [r["experience"] for r in rows] == [0, 1]
    assert [r["checksum"] for r in rows] == [sums[0], sums[1] + 1000.0]
    assert sorted(os.listdir(os.path.join(workdir, "metrics"))) == ["evaluation.jsonl"]


def test_final_params_stand_for_the_last_experience(tmp_path):
    workdir = str(tmp_path / "run")
    sums = write_run(workdir, run_config(tmp_path / "data"), experiences=(1,), final=True)
    rows = evaluate.evaluate_run(workdir, base.get_config(), eval_hook=FakeHook())
    assert [(r["experience"], r["step"], r["checksum"]) for r in rows] == [(1, 8, sums[1])]


@pytest.mark.slow  # a run then launch.evaluate with the real hook, ~10 s
def test_launch_evaluate_with_the_real_hook(tmp_path):
    """`python -m launch.evaluate` on experience 1 (16 samples, a classifier of 1 epoch): kld
    and ard follow from the logged generated fractions and the digits' test labels."""
    config = run_config(tmp_path / "data")
    if "classifier" in config.eval:  # configs that choose the evaluation architecture
        config.eval.classifier = "simple_cnn"  # the fastest to train and run
    workdir = str(tmp_path / "run")
    write_run(workdir, config)
    # Into the hook's default place (the session's cache dir, inherited by the subprocess).
    cls.train_for_settings(settings_from_config(config), epochs=1, batch_size=512)
    result = subprocess.run([sys.executable, "-m", "launch.evaluate", f"--workdir={workdir}",
                             "--experiences=1", "--num_samples=16"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "wrote 1 row(s)" in result.stdout
    row, = read_metrics(workdir, "evaluation")
    assert (row["experience"], row["step"], row["num_samples"]) == (1, 8, 16)
    gen = np.array([row[f"gen_frac_class_{c}"] for c in range(10)])
    assert gen.sum() == pytest.approx(1.0) and np.all(gen * 16 == np.round(gen * 16))
    _, test = gdata.load_dataset("digits", image_size=16, channels=1)
    true = metrics.class_frequencies(test.labels, 10)  # all 10 classes seen after experience 1
    assert row["kld"] == pytest.approx(metrics.kld(true, gen), rel=1e-9)
    assert row["ard"] == pytest.approx(0.5 * np.abs(true - gen).sum(), rel=1e-9)
    assert np.isfinite(row["fd_classifier"]) and np.isfinite(row["kid_classifier"])
    assert os.path.getsize(os.path.join(workdir, "samples", "histogram_experience_1.png")) > 0


# ----------------------------------------------------------------------------- errors

def test_a_workdir_without_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run has no config.json: not a gdjax run"):
        evaluate.evaluate_run(str(tmp_path / "run"), base.get_config(), eval_hook=FakeHook())


@pytest.mark.parametrize("content, message", [
    ('{"_class_name": "UNet2DModel", "sample_size": 32}',
     r"config.json is not a gdjax run config: it has no data, model, diffusion"),
    ("[1, 2", r"config.json is not valid JSON"),
])
def test_a_config_json_of_another_project(tmp_path, content, message):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        evaluate.evaluate_run(str(tmp_path), base.get_config(), eval_hook=FakeHook())


@pytest.mark.parametrize("section, key, value, message", [
    ("strategy", "temperature", 2.0, r"sets strategy.temperature, which configs/base.py does not"),
    ("train", "batch_size", "eight", r"train.batch_size='eight' does not fit"),
])
def test_config_values_that_do_not_fit(tmp_path, section, key, value, message):
    values = json.loads(json.dumps(run_config(tmp_path).to_dict(), default=str))
    values[section][key] = value
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match=message) as e:
        evaluate.evaluate_run(str(tmp_path), base.get_config(), eval_hook=FakeHook())
    assert str(tmp_path / "config.json") in str(e.value)


def test_no_saved_generator(tmp_path):
    workdir = str(tmp_path / "run")
    write_run(workdir, run_config(tmp_path / "data"), experiences=())
    with pytest.raises(FileNotFoundError, match="must finish an experience first") as e:
        evaluate.evaluate_run(workdir, base.get_config(), eval_hook=FakeHook())
    assert os.path.join(workdir, "experience_params") in str(e.value)
    assert os.path.join(workdir, "final_params") in str(e.value)


def test_unsaved_experience_and_another_model(saved_run, tmp_path):
    workdir, _ = saved_run
    absent = r"no saved generator for experience\(s\) \[4\]; saved: \[0, 1\]"
    with pytest.raises(ValueError, match=absent):
        evaluate.evaluate_run(workdir, base.get_config(), experiences=[1, 4], eval_hook=FakeHook())
    other = str(tmp_path / "other")
    config = run_config(tmp_path / "data")
    write_run(other, config)
    config.model.name = "digits"  # config.json now names a different UNet than the saved one
    rundir.write_config(other, config_as_json(config))
    with pytest.raises(ValueError, match=r"experience_0 holds a UNet .* model.name='digits'"):
        evaluate.evaluate_run(other, base.get_config(), eval_hook=FakeHook())
