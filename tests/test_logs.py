"""Run logging (metric rows across kills and resumes, TensorBoard, progress lines) and grids."""

import io
import json
import math
import re
import struct
import sys
import types
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from gdjax import grid, logs


def read_event_scalars(logdir):
    """(tag, step, value) of every scalar in the event files under `logdir`, the steps of
    SessionLog START (purge) events, and the text summaries by tag; a TFRecord reader
    independent of tensorboardX's writer."""
    from tensorboardX.proto import event_pb2

    scalars, starts = [], []
    texts = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            record = data[offset + 12:offset + 12 + length]  # skip the length and its crc
            offset += 12 + length + 4  # and the data's crc
            event = event_pb2.Event.FromString(record)
            if event.HasField("session_log") and event.session_log.status == 1:
                starts.append(event.step)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.append((value.tag, event.step, value.simple_value))
                elif value.tensor.string_val:
                    texts[value.tag] = value.tensor.string_val[0].decode()
    return scalars, starts, texts


# ----------------------------------------------------------------------------- JSON rows


def test_rows_round_trip_with_numpy_jax_and_non_finite_values(tmp_path):
    with logs.MetricLogger(tmp_path, tensorboard=False) as logger:
        logger.write("train", 1, {"loss": 0.25, "lr": np.float32(1e-3), "n": np.int64(7)})
        logger.write("train", np.int32(2), {"loss": jnp.float32(0.5), "ok": True})
        logger.write("eval", 2, {"nan": math.nan, "pinf": np.float64("inf"), "ninf": -math.inf})

    train = logs.read_metrics(tmp_path, "train")
    assert train == [{"step": 1, "loss": 0.25, "lr": pytest.approx(1e-3), "n": 7},
                     {"step": 2, "loss": 0.5, "ok": 1}]
    assert all(type(row["step"]) is int for row in train)
    assert type(train[0]["n"]) is int and type(train[1]["loss"]) is float
    (ev,) = logs.read_metrics(tmp_path, "eval")
    assert math.isnan(ev["nan"]) and ev["pinf"] == math.inf and ev["ninf"] == -math.inf
    # The file itself is strict JSON: non-finite values are strings, not bare NaN.
    raw = (tmp_path / "metrics" / "eval.jsonl").read_text()
    assert json.loads(raw, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {
        "step": 2, "nan": "nan", "pinf": "inf", "ninf": "-inf"}
    assert logs.read_metrics(tmp_path, "never_written") == []


def test_write_rejects_what_is_not_a_scalar_metric(tmp_path):
    with logs.MetricLogger(tmp_path, tensorboard=False) as logger:
        with pytest.raises(TypeError, match="'loss'.*shape \\(2,\\)"):
            logger.write("train", 1, {"loss": np.zeros(2)})
        with pytest.raises(ValueError, match="reserved"):
            logger.write("train", 1, {"step": 3})
        with pytest.raises(TypeError, match="step"):
            logger.write("train", 1.5, {"loss": 1.0})
        with pytest.raises(ValueError, match="stream name"):
            logger.write("../escape", 1, {"loss": 1.0})


def test_fresh_run_refuses_a_workdir_with_metrics(tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "train.jsonl").write_text("")  # empty files are fine
    logs.MetricLogger(tmp_path, tensorboard=False).close()
    with logs.MetricLogger(tmp_path, tensorboard=False) as logger:
        logger.write("train", 1, {"loss": 1.0})
    with pytest.raises(ValueError, match="already holds metrics.*train.jsonl"):
        logs.MetricLogger(tmp_path, tensorboard=False)


def test_resume_drops_rows_after_the_checkpoint_and_a_torn_last_line(tmp_path):
    with logs.MetricLogger(tmp_path, tensorboard=False) as logger:
        for step in range(1, 6):
            logger.write("train", step, {"loss": 1.0 / step})
        logger.write("eval", 2, {"fid": 30.0})
        logger.write("eval", 4, {"fid": 20.0})
    train_file = tmp_path / "metrics" / "train.jsonl"
    with open(train_file, "a") as f:
        f.write('{"step": 6, "loss": 0.1')  # killed mid-write
    assert [r["step"] for r in logs.read_metrics(tmp_path, "train")] == [1, 2, 3, 4, 5]

    # Killed after logging step 5 with the last checkpoint at step 3: resume from 3.
    with logs.MetricLogger(tmp_path, resume_step=3, tensorboard=False) as logger:
        assert [r["step"] for r in logs.read_metrics(tmp_path, "train")] == [1, 2, 3]
        assert [r["step"] for r in logs.read_metrics(tmp_path, "eval")] == [2]
        for step in range(4, 6):
            logger.write("train", step, {"loss": 1.0 / step})
        logger.write("eval", 4, {"fid": 19.0})

    assert logs.read_metrics(tmp_path, "train") == [
        {"step": s, "loss": 1.0 / s} for s in range(1, 6)]
    assert logs.read_metrics(tmp_path, "eval") == [
        {"step": 2, "fid": 30.0}, {"step": 4, "fid": 19.0}]
    assert train_file.read_text().endswith("}\n")
    assert not list((tmp_path / "metrics").glob(".*tmp"))


def test_resume_before_the_first_checkpoint_and_a_complete_unterminated_line(tmp_path):
    path = tmp_path / "metrics" / "train.jsonl"
    path.parent.mkdir()
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}')  # no final newline
    with logs.MetricLogger(tmp_path, resume_step=2, tensorboard=False) as logger:
        logger.write("train", 3, {"loss": 0.5})  # must not be glued onto the step-2 line
    assert [r["step"] for r in logs.read_metrics(tmp_path, "train")] == [1, 2, 3]
    logs.MetricLogger(tmp_path, resume_step=-1, tensorboard=False).close()
    assert logs.read_metrics(tmp_path, "train") == [] and path.read_text() == ""


def test_a_torn_line_in_the_middle_is_corruption(tmp_path):
    path = tmp_path / "metrics" / "train.jsonl"
    path.parent.mkdir()
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match="train.jsonl:2"):
        logs.read_metrics(tmp_path, "train")


# ----------------------------------------------------------------------------- mirrors


def test_tensorboard_scalars_and_purge_on_resume(tmp_path):
    with logs.MetricLogger(tmp_path, config={"lr": 1e-3}) as logger:
        logger.write("train", 1, {"loss": 0.5})
        logger.write("train", 2, {"loss": 0.25})
        logger.write("eval", 2, {"fid": 12.5})
        logger.flush()
        scalars, starts, texts = read_event_scalars(tmp_path / "tensorboard")
        assert scalars == [("train/loss", 1, 0.5), ("train/loss", 2, 0.25), ("eval/fid", 2, 12.5)]
        assert starts == []
        assert '"lr": 0.001' in texts["config/text_summary"]
    with logs.MetricLogger(tmp_path, resume_step=1) as logger:
        logger.write("train", 2, {"loss": 0.125})
    scalars, starts, _ = read_event_scalars(tmp_path / "tensorboard")
    assert starts == [2]  # TensorBoard hides the killed run's events from step 2 on
    assert scalars[-1] == ("train/loss", 2, 0.125)


def test_mirrors_can_be_off_and_a_missing_wandb_warns_once(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails
    monkeypatch.setattr(logs, "_warned", set())
    with pytest.warns(RuntimeWarning, match="wandb"):
        logs.MetricLogger(tmp_path / "a", tensorboard=False, wandb=True).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logs.MetricLogger(tmp_path / "b", tensorboard=False, wandb=True).close()
    assert not (tmp_path / "a" / "tensorboard").exists()


class StubWandb(types.ModuleType):
    """A `wandb` module that records init, log and finish instead of reaching W&B."""

    def __init__(self):
        super().__init__("wandb")
        self.calls = []
        self.ids = iter(["run1d", "other"])
        self.util = types.SimpleNamespace(generate_id=lambda: next(self.ids))

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return types.SimpleNamespace(
            log=lambda data, step: self.calls.append(("log", data, step)),
            finish=lambda: self.calls.append(("finish",)))


def test_wandb_when_installed_gets_config_rows_and_the_resumed_run_id(tmp_path, monkeypatch):
    stub = StubWandb()
    monkeypatch.setitem(sys.modules, "wandb", stub)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    workdir = tmp_path / "fmnist_gd"
    with logs.MetricLogger(workdir, tensorboard=False, wandb=True,
                           config={"seed": 42}) as logger:
        logger.write("train", 1, {"loss": np.float32(0.5), "experience": 0})
        logger.write("eval", 1, {"fid": float("inf")})
        assert [c[0] for c in stub.calls] == ["init", "log", "log"]  # finish only on close
    init = dict(project="gdjax", name="fmnist_gd", dir=str(workdir), id="run1d",
                resume="allow", config={"seed": 42})
    assert stub.calls == [("init", init), ("log", {"train/loss": 0.5, "train/experience": 0}, 1),
                          ("log", {"eval/fid": math.inf}, 1), ("finish",)]
    # Resumed (after a kill) in the same workdir: the same W&B run continues.
    stub.calls.clear()
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    with logs.MetricLogger(workdir, resume_step=1, tensorboard=False, wandb=True,
                           config={"seed": 42}) as logger:
        logger.write("train", 2, {"loss": 0.25})
    assert stub.calls == [("init", dict(init, project="mine")),
                          ("log", {"train/loss": 0.25}, 2), ("finish",)]
    assert (workdir / "wandb_run_id").read_text() == "run1d"


# ----------------------------------------------------------------------------- progress


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_prints_periodic_lines_with_rate_and_eta():
    clock, out = FakeClock(), io.StringIO()
    bar = logs.Progress(400, "exp 2/5", every_seconds=10, stream=out, clock=clock)
    for _ in range(120):
        clock.now += 0.5 if bar.n < 20 else 0.25  # 2 it/s, then 4 it/s
        bar.update(loss=jnp.float32(0.0412))
    bar.close()
    bar.close()
    assert out.getvalue().splitlines() == [
        "exp 2/5 | step 20/400 (5%) | 2.0 it/s | ETA 3m10s | loss 0.0412",
        "exp 2/5 | step 60/400 (15%) | 4.0 it/s | ETA 1m25s | loss 0.0412",
        "exp 2/5 | step 100/400 (25%) | 4.0 it/s | ETA 1m15s | loss 0.0412",
        "exp 2/5 | step 120/400 (30%) | 3.4 it/s | ETA 1m22s | loss 0.0412",  # mean rate
    ]
    assert "\r" not in out.getvalue()


def test_progress_redraws_in_place_on_a_terminal_and_reports_the_total_time():
    clock, out = FakeClock(), FakeTTY()
    with logs.Progress(3, every_seconds=1, stream=out, clock=clock) as bar:
        for _ in range(3):
            clock.now += 2.0
            bar.update()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.count("\r") == 3  # the finished loop is drawn once, by close()
    assert text.endswith("step 3/3 (100%) | 2.0 s/it | took 6s\n")


# ----------------------------------------------------------------------------- grids


def test_grid_of_hand_made_images_has_the_expected_pixels(tmp_path):
    images = np.array([[[0.0, 1.0], [0.5, 2.0]],     # 2.0 clips to 1
                       [[-1.0, 0.2], [1.0, 1.0]],    # -1 clips to 0; 0.2 -> 51
                       [[1.0, 1.0], [1.0, 1.0]],
                       [[0.0, 0.0], [0.0, 0.0]]], np.float32)[..., None]
    got = grid.make_image_grid(images, nrow=2, pad=1)
    expected = np.array([
        [0,   0,   0, 0,   0,   0, 0],
        [0,   0, 255, 0,   0,  51, 0],
        [0, 128, 255, 0, 255, 255, 0],
        [0,   0,   0, 0,   0,   0, 0],
        [0, 255, 255, 0,   0,   0, 0],
        [0, 255, 255, 0,   0,   0, 0],
        [0,   0,   0, 0,   0,   0, 0]], np.uint8)[..., None]
    np.testing.assert_array_equal(got, expected)

    path = grid.save_image_grid(images, tmp_path / "new" / "dir" / "grid.png", nrow=2)
    with Image.open(path) as png:
        assert png.mode == "L"
        np.testing.assert_array_equal(np.asarray(png), expected[..., 0])
    assert sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]


def test_rgb_grid_layout_upscale_and_png_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(5, 3, 4, 3)).astype(np.float32)
    got = grid.make_image_grid(images, pad=2, upscale=2, pad_value=1.0)
    assert got.shape == (2 * (6 + 2) + 2, 3 * (8 + 2) + 2, 3)  # default nrow = ceil(sqrt(5))
    np.testing.assert_array_equal(got[2:8, 12:20], np.floor(
        images[1] * 255 + 0.5).astype(np.uint8).repeat(2, 0).repeat(2, 1))
    assert (got[10:16, 22:30] == 255).all()  # the empty sixth cell is padding
    path = grid.save_image_grid(jnp.asarray(images), tmp_path / "rgb.png", pad=2, upscale=2,
                                pad_value=1.0)
    with Image.open(path) as png:
        assert png.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(png), got)


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 2, 2, 2), (0, 2, 2, 1)])
def test_grid_rejects_bad_shapes_naming_them(shape):
    with pytest.raises(ValueError, match=re.escape(f"got shape {shape}")):
        grid.make_image_grid(np.zeros(shape))
