"""train.steps_per_call: several train steps in one dispatch (a lax.fori_loop over stacked
batches) give the same run as one step per call: bit for bit for any number of steps per
call above one, and to float32 rounding against the plain one-step call, which XLA compiles
apart from a loop body (gdjax/train_step.py)."""

import os

import numpy as np
import pytest

from gdjax import continual
from gdjax.logs import read_metrics
from tests.conftest import recording_compilations
from tests.helpers import leaves, tiny_config


def test_call_groups_never_cross_a_checkpoint():
    # 10 steps, up to 4 per call, checkpoints every 6: 4, then 2 up to the checkpoint at 6,
    # then 4 to the end; a resume at the checkpoint cuts the same calls.
    assert continual.call_groups(0, 10, 4, 6) == [4, 2, 4]
    assert continual.call_groups(6, 10, 4, 6) == [4]
    assert continual.call_groups(0, 8, 3, 100) == [3, 3, 2]
    assert continual.call_groups(5, 8, 4, 4) == [3]


def _config(n, checkpoint_every=5):
    return tiny_config("full_generation_distillation", steps_per_experience=8,
                       checkpoint_every=checkpoint_every, max_to_keep=10, steps_per_call=n)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (final state, workdir, compilations during the run)}: one step per call, 4
    per call, and 4 per call with checkpoints every 3 steps (other calls: 3, 3, 2)."""
    out, root = {}, tmp_path_factory.mktemp("steps_per_call")
    for name, n, every in (("one", 1, 5), ("four", 4, 5), ("split", 4, 3)):
        with recording_compilations() as counts:
            state = continual.train(_config(n, every), str(root / name))
        out[name] = (state, str(root / name), counts)
    return out


@pytest.mark.slow  # three short runs with loop bodies, slow on XLA:CPU: `pytest -m slow`
def test_steps_per_call_give_the_same_run(runs):
    """8 steps per experience, a row every step. 4 steps per call, with checkpoints every 5
    (calls of 4, 1, 3 in each experience) or every 3 (3, 3, 2), give the same params and
    train and experience rows bit for bit; the loop compiles once per experience (plain,
    then with replay), and not again for other call lengths. Against one step per call: the same rows and
    checkpoint steps, the numbers within float32 rounding as Adam carries it (its
    normalised step turns a last-bit change of a near-zero gradient into up to ~1e-5 of
    a parameter after 16 steps at lr 1e-3: within a tenth of one step, 1e-4)."""
    (one, one_dir, _), (four, four_dir, compiled), (split, split_dir, more) = \
        runs["one"], runs["four"], runs["split"]
    assert compiled.get("train_steps") == 2 and not compiled.get("train_step")
    assert not more.get("train_steps")
    for a, b in zip(leaves(four), leaves(split)):
        np.testing.assert_array_equal(a, b)
    for stream in ("train", "experience"):
        assert read_metrics(four_dir, stream) == read_metrics(split_dir, stream)
    for a, b in zip(leaves(one), leaves(four)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    rows_one, rows_four = read_metrics(one_dir, "train"), read_metrics(four_dir, "train")
    assert [r["step"] for r in rows_four] == [r["step"] for r in rows_one] == list(range(1, 17))
    for r1, r4 in zip(rows_one, rows_four):
        assert r1.keys() == r4.keys() and r1["experience"] == r4["experience"]
        for name in ("loss", "data_loss", "replay_loss", "grad_norm"):
            assert r4[name] == pytest.approx(r1[name], rel=1e-4, abs=1e-7)
    assert sorted(os.listdir(os.path.join(one_dir, "checkpoints"))) == \
        sorted(os.listdir(os.path.join(four_dir, "checkpoints")))


@pytest.mark.slow
def test_a_run_killed_inside_a_call_resumes_to_the_same_end(runs, tmp_path):
    """Killed while the call of experience 1's steps 5..7 is reported (after step 6): the
    resume starts from the checkpoint at its step 5 and ends as the whole run does, bit for
    bit."""
    whole, whole_dir, _ = runs["four"]

    def die(k, s):
        if (k, s) == (1, 6):
            raise KeyboardInterrupt("killed")

    c = _config(4)
    workdir = str(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        continual.train(c, workdir, callbacks=continual.Callbacks(after_step=die))
    assert max(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == "13"
    resumed = continual.train(c, workdir)
    for a, b in zip(leaves(whole), leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    assert read_metrics(whole_dir, "train") == read_metrics(workdir, "train")


def test_steps_per_call_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="train.steps_per_call"):
        continual.train(tiny_config(steps_per_call=0), str(tmp_path))
