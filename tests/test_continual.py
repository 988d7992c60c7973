"""End-to-end runs of the experience loop on the digits: every strategy, resumption, configs."""

import json
import os

import jax
import numpy as np
import pytest

from configs import split_digits
from gdjax import continual, strategies
from gdjax.logs import read_metrics


def tiny_config(strategy="full_generation_distillation", **train):
    c = split_digits.get_config()
    c.strategy.name = strategy
    c.model.name = "tiny"
    c.data.n_experiences = 2
    c.train.batch_size = 8
    c.train.steps_per_experience = 4
    c.train.log_every = 1
    c.train.checkpoint_every = 3
    c.eval.steps = 2
    c.eval.grid_samples = 4
    c.log.tensorboard = False
    c.strategy.er_buffer_size = 20
    c.solver.epochs = 1
    c.solver.batch_size = 32
    for key, value in train.items():
        setattr(c.train, key, value)
    return c


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("name", strategies.STRATEGIES)
def test_every_strategy_runs_end_to_end(name, tmp_path):
    workdir = str(tmp_path / name)
    state = continual.train(tiny_config(name), workdir)
    assert int(state.step) == 8 and int(state.experience) == 1
    rows = read_metrics(workdir, "train")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) for r in rows)
    has_replay = name not in (strategies.NAIVE, strategies.CUMULATIVE)
    assert all(r["replay_loss"] == 0 for r in rows[:4])  # no teacher in the first experience
    assert all((r["replay_loss"] > 0) == has_replay for r in rows[4:])
    assert [r["experience"] for r in read_metrics(workdir, "experience")] == [0, 1]
    for k in (0, 1):
        assert os.path.getsize(os.path.join(workdir, "samples", f"experience_{k}.png")) > 0
    assert os.listdir(os.path.join(workdir, "checkpoints"))
    assert json.load(open(os.path.join(workdir, "config.json")))["strategy"]["name"] == name


def test_resumed_run_ends_bitwise_equal(tmp_path, monkeypatch):
    config = tiny_config("full_generation_distillation")
    whole = continual.train(config, str(tmp_path / "whole"))

    # Kill the second run at the 6th step: the checkpoints at steps 3 and 4 (end of
    # experience 0) exist, step 5 ran and was logged but never checkpointed.
    real_write = continual.MetricLogger.write
    calls = {"n": 0}

    def dying_write(self, stream, step, metrics):
        real_write(self, stream, step, metrics)
        if stream == "train" and step == 6:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(continual.MetricLogger, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        continual.train(config, str(tmp_path / "resumed"))
    monkeypatch.setattr(continual.MetricLogger, "write", real_write)
    resumed = continual.train(config, str(tmp_path / "resumed"))

    for a, b in zip(leaves(whole), leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    rows_whole = read_metrics(str(tmp_path / "whole"), "train")
    rows_resumed = read_metrics(str(tmp_path / "resumed"), "train")
    assert rows_whole == rows_resumed


def test_workdir_of_another_config_is_refused(tmp_path):
    workdir = str(tmp_path / "run")
    continual.train(tiny_config("naive"), workdir)
    with pytest.raises(ValueError, match="different config"):
        continual.train(tiny_config("naive", learning_rate=0.5), workdir)


@pytest.mark.parametrize("key, value, message", [
    ("strategy.name", "distillation", "strategy.name='distillation' is unknown"),
    ("train.criterion", "l1", "train.criterion='l1' is unknown"),
    ("train.batch_size", 0, "train.batch_size=0"),
    ("train.mode", "joint", "train.mode='joint'"),
    ("strategy.teacher_steps", 0, "strategy.teacher_steps=0"),
])
def test_bad_values_fail_before_anything_runs(key, value, message, tmp_path):
    c = tiny_config()
    section, name = key.split(".")
    setattr(c[section], name, value)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        continual.train(c, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_misspelt_key_is_an_error():
    c = split_digits.get_config()
    with pytest.raises(AttributeError):
        c.train.batchsize = 3


def test_bad_class_order_and_unknown_variant(tmp_path):
    c = tiny_config()
    c.data.class_order = (0, 1, 2, 3, 4, 5, 6, 7, 8, 8)
    with pytest.raises(ValueError, match="class"):
        continual.train(c, str(tmp_path))
    with pytest.raises(ValueError, match="variant"):
        split_digits.get_config("distil")


def test_iid_training_then_distillation_into_a_fresh_student(tmp_path):
    teacher_run = str(tmp_path / "iid")
    c = tiny_config("naive", mode="iid")
    state = continual.train(c, teacher_run)
    assert int(state.step) == 4  # one experience holding every class
    assert read_metrics(teacher_run, "experience")[0]["classes_seen"] == 10

    c = tiny_config("gaussian_distillation", mode="iid_distill",
                    teacher_dir=os.path.join(teacher_run, "final_params"))
    student = continual.train(c, str(tmp_path / "distill"))
    rows = read_metrics(str(tmp_path / "distill"), "train")
    assert all(r["data_loss"] == 0 and r["replay_loss"] > 0 for r in rows)
    assert rows[0]["loss"] == rows[0]["replay_loss"]
    moved = [float(np.abs(a - b).max()) for a, b in zip(leaves(student.params), leaves(state.params))]
    assert max(moved) > 0

    c.train.teacher_dir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="teacher_dir"):
        continual.train(c, str(tmp_path / "distill2"))


@pytest.mark.parametrize("module", ["split_digits", "split_fmnist", "split_mnist", "split_cifar10"])
def test_every_config_variant_is_valid(module):
    import importlib
    from configs import base
    from gdjax.config import validate_config
    get_config = importlib.import_module(f"configs.{module}").get_config
    for variant, strategy in base.VARIANTS.items():
        c = get_config(variant)
        assert c.strategy.name == strategy
        validate_config(c)


def test_missing_data_directory_is_named(tmp_path):
    from configs import split_fmnist
    c = split_fmnist.get_config("naive")
    c.data.data_dir = str(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="absent"):
        continual.train(c, str(tmp_path / "run"))
