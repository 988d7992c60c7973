"""The reproduction sweep (launch/reproduce.py): every (variant, seed) run, resumable, then
one report."""

import copy
import json
import os

import pytest

from configs import base
from gdjax import continual, sweep
from gdjax.logs import read_metrics
from tests.helpers import tiny_config


def make_runs(config, variants, seeds):
    return sweep.make_runs(lambda v: base.with_variant(copy.deepcopy(config), v), variants,
                           seeds)


def small_config():
    c = tiny_config()
    c.train.steps_per_experience = 2
    c.solver.enabled = False
    return c


def test_runs_get_each_variant_and_seed():
    runs = make_runs(small_config(), ["naive", "generative_distillation"], ["42", "7"])
    assert [name for name, _ in runs] == ["naive_seed42", "naive_seed7",
                                          "generative_distillation_seed42",
                                          "generative_distillation_seed7"]
    assert [(c.strategy.name, c.seed) for _, c in runs] == [
        ("naive", 42), ("naive", 7), ("full_generation_distillation", 42),
        ("full_generation_distillation", 7)]
    with pytest.raises(ValueError, match="unknown config variant 'distil'"):
        make_runs(small_config(), ["distil"], ["42"])


def seed_hook(config):
    """A stand-in evaluation: kld = seed / 1000 + experience, so the report's mean is known."""
    return lambda run, k, params: {"kld": config.seed / 1000 + k}


@pytest.mark.slow  # a whole sweep of tiny runs, ~18 s
def test_sweep_trains_every_run_then_reports_and_a_rerun_trains_nothing(tmp_path):
    runs = make_runs(small_config(), ["naive", "generative_replay"], ["42", "69"])
    root = str(tmp_path / "sweep")
    paths = sweep.run_sweep(runs, root, hook_fn=seed_hook)
    for name, config in runs:
        workdir = os.path.join(root, name)
        assert [r["step"] for r in read_metrics(workdir, "train")] == [1, 2, 3, 4]
        written = json.load(open(os.path.join(workdir, "config.json")))
        assert (written["strategy"]["name"], written["seed"]) == (config.strategy.name,
                                                                  config.seed)
    rows = {}
    with open(paths["last_experience.csv"]) as f:
        header = f.readline().strip().split(",")
        for line in f:
            row = dict(zip(header, line.strip().split(",")))
            rows[(row["strategy"], row["metric"])] = row
    for strategy in ("naive", "no_distillation"):  # last experience: k = 1, seeds 42 and 69
        assert rows[(strategy, "kld")]["n"] == "2"
        assert float(rows[(strategy, "kld")]["mean"]) == pytest.approx((0.042 + 0.069) / 2 + 1)

    calls = []
    sweep.run_sweep(runs, root, hook_fn=seed_hook,
                    train_fn=lambda c, w, eval_hook: calls.append(w) or
                    continual.train(c, w, eval_hook=eval_hook))
    assert len(calls) == 4  # each finished run is resumed at its end: no new rows
    for name, _ in runs:
        assert len(read_metrics(os.path.join(root, name), "train")) == 4


def test_sweep_refuses_duplicate_names(tmp_path):
    runs = make_runs(small_config(), ["naive"], ["42"])
    with pytest.raises(ValueError, match="distinct names"):
        sweep.run_sweep(runs + runs, str(tmp_path))


def parse_reproduce(monkeypatch, *args):
    """launch/reproduce.py's main under `args`, the sweep replaced by a recorder of its runs."""
    from absl import flags
    from launch import reproduce

    recorded = {}

    def fake_sweep(runs, root):
        recorded.update(runs=runs, root=root)
        return {}

    monkeypatch.setattr(sweep, "run_sweep", fake_sweep)
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["reproduce", *args])
    try:
        reproduce.main([])
    finally:
        flags.FLAGS.unparse_flags()
    return recorded


def test_reproduce_command_defaults_and_overrides(monkeypatch, tmp_path):
    """The default sweep: 4 variants x seeds 42, 69, 1714 on split_digits, at 200 generator
    steps and the config's 10 solver epochs; 0 keeps the config's 300; flags narrow the
    sweep and set the solver's epochs.

    (The 0 case runs first: main() sets the halved schedule on the parsed config.)"""
    got = parse_reproduce(monkeypatch, "--steps_per_experience=0", "--solver_epochs=0",
                          "--variants=er", "--seeds=3", f"--root={tmp_path}")
    assert got["root"] == str(tmp_path)
    [(name, c)] = got["runs"]
    assert (name, c.strategy.name, c.seed) == ("er_seed3", "er", 3)
    assert (c.train.steps_per_experience, c.solver.epochs) == (300, 10)
    got = parse_reproduce(monkeypatch, "--solver_epochs=4", "--variants=er", "--seeds=3",
                          f"--root={tmp_path}")
    assert (got["runs"][0][1].train.steps_per_experience, got["runs"][0][1].solver.epochs) \
        == (200, 4)

    got = parse_reproduce(monkeypatch)
    assert got["root"] == "runs/reproduce_digits"
    assert [name for name, _ in got["runs"]] == [
        f"{v}_seed{s}" for v in ("naive", "cumulative", "generative_replay",
                                 "generative_distillation") for s in (42, 69, 1714)]
    assert {c.strategy.name for _, c in got["runs"]} == {
        "naive", "cumulative", "no_distillation", "full_generation_distillation"}
    for _, c in got["runs"]:
        assert (c.data.name, c.train.steps_per_experience, c.solver.epochs) == ("digits", 200, 10)

