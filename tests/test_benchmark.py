"""The speed study's library: every row for both frameworks, the JSON, a PyTorch baseline
that really trains and samples like gdjax, and FLOP counts against independent numbers."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdjax import benchmark, convert, ddim, unet
from gdjax.schedule import make_schedule

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

TINY = unet.get_unet_config("tiny")


# A train row without and with a teacher, and sampling: each compiled row costs seconds
# here. Every other row, both frameworks, but the plain step at 2B (the same step on twice
# the rows): the device check's dry run (slow, tests/test_device_check.py).
ROWS = (benchmark.PLAIN, benchmark.GD, benchmark.SAMPLE)


@pytest.fixture(scope="module")
def result():
    cfg = benchmark.BenchConfig(model="tiny", batch=2, iters=2, warmup=0, torch_threads=1,
                                rows=ROWS)
    return benchmark.run(cfg, argv=["test_benchmark"])


def test_each_row_for_both_frameworks(result):
    pairs = {(s["row"], s["framework"]) for s in result["summary"]}
    assert pairs == {(r, f) for r in ROWS for f in ("gdjax", "pytorch")}
    table = result["table"].splitlines()
    assert len(table) == 2 + 2 * len(ROWS)
    for row in ROWS:
        assert sum(line.startswith(f"| {row} |") for line in table) == 2


def test_ratios_throughput_and_flops_are_positive_finite(result):
    for s in result["summary"]:
        assert s["median_ms"] > 0 and s["min_ms"] <= s["median_ms"] <= s["max_ms"]
        assert math.isfinite(s["images_per_s"]) and s["images_per_s"] > 0
        assert s["tflops"] is not None and math.isfinite(s["tflops"]) and s["tflops"] > 0
        assert s["fraction_of_peak"] is None  # CPU: peak unknown
        if s["framework"] == "pytorch":
            assert math.isfinite(s["ratio"]) and s["ratio"] > 0
        else:
            assert s["compile_s"] > 0
    for t in result["timings"]:
        assert len(t["times_s"]) == 2


def test_json_is_written_and_reloads(result, tmp_path):
    path = tmp_path / "bench.json"
    benchmark.write_json(result, str(path))
    back = json.loads(path.read_text())
    assert back["summary"] == json.loads(json.dumps(result["summary"]))
    assert back["command"] == "test_benchmark" and back["date"]
    assert back["versions"]["jax"] == jax.__version__ and back["versions"]["torch"]
    assert back["hardware"]["cpu_count"] >= 1 and back["hardware"]["platform"] == "cpu"
    assert len(back["load_average_start"]) == len(back["load_average_end"]) == 3
    assert "xla_flags" in back and len(back["timings"]) == 2 * len(ROWS)


def _baseline():
    return benchmark.TorchBaseline(TINY, threads=2, seed=0)


def _inputs(rows=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((rows, 1, 16, 16), generator=g)
    t = torch.randint(0, 1000, (rows,), generator=g)
    return x, t, torch.randn((rows, 1, 16, 16), generator=g)


def test_torch_step_loss_is_the_mse_and_params_move():
    base = _baseline()
    x, t, target = _inputs()
    before = [p.detach().clone() for p in base.model.parameters()]
    with torch.no_grad():
        pred = base.model(x, t).sample.numpy().astype(np.float64)
    expected = np.mean((pred - target.numpy()) ** 2)
    assert base.train_on(x, t, target) == pytest.approx(expected, rel=1e-5)
    moved = [not torch.equal(a, b) for a, b in zip(before, base.model.parameters())]
    assert all(moved)
    # The teacher is a frozen copy: untouched by the student's step.
    for a, b in zip(before, base.teacher.parameters()):
        assert torch.equal(a, b)


def test_torch_replay_loss_weights_data_and_replay_rows():
    base = _baseline()
    x, t, target = _inputs(rows=6, seed=1)
    with torch.no_grad():
        sq = ((base.model(x, t).sample - target) ** 2).numpy().astype(np.float64)
    # Experience 2: data weight 1/3 on the first 2 rows, replay weight 2/3 on the other 4.
    expected = sq[:2].mean() / 3 + 2 * sq[2:].mean() / 3
    got = base.train_on(x, t, target, data_rows=2, experience=2)
    assert got == pytest.approx(expected, rel=1e-5)


def test_torch_teacher_sampler_matches_gdjax_ddim():
    base = _baseline()
    params = convert.params_from_torch_state_dict(base.teacher.state_dict(), TINY)
    noise = torch.randn((3, 1, 16, 16), generator=torch.Generator().manual_seed(2))
    ours = base.sample(base.teacher, noise, 2).numpy()
    model = unet.UNet(TINY)
    x = jnp.asarray(noise.numpy().transpose(0, 2, 3, 1))
    ref = ddim.reverse_process(lambda x, t: model.apply({"params": params}, x, t),
                               make_schedule(), x, num_steps=2)
    np.testing.assert_allclose(ours, np.asarray(ref).transpose(0, 3, 1, 2), atol=2e-4)


def test_forward_flops_of_tiny_agree_with_the_lowered_hlo():
    compiled = benchmark.forward_flops(TINY)
    lowered = benchmark.forward_flops(TINY, compile=False)
    assert compiled is not None and lowered is not None
    assert 0.5 < compiled / lowered < 2.0
    assert benchmark.forward_flops(TINY, batch=4, compile=False) == pytest.approx(
        4 * lowered, rel=0.05)


def test_forward_flops_of_ddim_medium_match_the_reference_estimate():
    # REFERENCE §3: about 3.98 GFLOP per 32x32 image forward.
    flops = benchmark.forward_flops(unet.get_unet_config("ddim_medium"), compile=False)
    assert 3.98e9 / 1.5 < flops < 3.98e9 * 1.5


def test_row_flops_count_teacher_and_student_forwards():
    f = 10.0
    assert benchmark.row_flops(benchmark.PLAIN, 4, 2, f) == 3 * 4 * f
    assert benchmark.row_flops(benchmark.GD, 4, 2, f) == (3 * 8 + 4 * 3) * f
    assert benchmark.row_flops(benchmark.SAMPLE, 4, 2, f) == 4 * 10 * f
    assert math.isnan(benchmark.row_flops(benchmark.PLAIN, 4, 2, None))


def test_peaks_known_for_accelerators_unknown_for_cpu():
    assert benchmark.peak_tflops("NVIDIA H200", "bfloat16") == 989.0
    assert benchmark.peak_tflops("cpu", "float32") is None


def test_time_calls_times_each_call_after_warmup():
    calls = []
    times, warm = benchmark.time_calls(lambda: calls.append(1), iters=3, warmup=2)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times) and warm >= 0


def test_peak_rss_sees_a_large_allocation_and_resets():
    import mmap

    benchmark.reset_peak_rss()
    base = benchmark.max_rss_bytes()
    # 32 MiB of new pages, written, hence resident (a numpy array could reuse memory the
    # allocator already holds resident from earlier tests, and move no peak)
    big = mmap.mmap(-1, 32 * 2**20)
    big.write(b"\1" * len(big))
    peak = benchmark.max_rss_bytes()
    big.close()
    assert peak >= base + 30 * 2**20
    benchmark.reset_peak_rss()
    assert benchmark.max_rss_bytes() < peak


def test_steps_per_call_rows_time_k_steps_and_report_per_step(monkeypatch):
    """--steps_per_call=3: the train row's compiled call runs 3 steps (its state's step
    counter moves by 3 a call) and the table's times are per step (a third of each call)."""
    seen = []
    real_time_calls = benchmark.time_calls

    def recording(call, **kw):
        times, warm = real_time_calls(call, **kw)
        state, metrics = call()
        seen.append((int(state.step), np.asarray(metrics["loss"]).shape, times))
        return times, warm

    monkeypatch.setattr(benchmark, "time_calls", recording)
    cfg = benchmark.BenchConfig(model="tiny", batch=2, iters=2, warmup=0, torch=False,
                                rows=(benchmark.PLAIN,), steps_per_call=3)
    [timing] = benchmark.jax_rows(cfg, None)
    step, shape, per_call = seen[0]
    assert step == 3 * (2 + 1) and shape == (3,)  # 2 timed calls and ours, 3 steps each
    assert timing.times_s == pytest.approx([t / 3 for t in per_call])


@pytest.mark.parametrize("row", [benchmark.FED, benchmark.FED_INLINE])
def test_fed_rows_train_on_the_pipelines_batches(monkeypatch, row):
    """The prefetch rows feed the step a new batch of the input pipeline each call (gdjax
    only; their PyTorch side is not timed), with (2) or without (0) a background thread."""
    depths, real_iterator = [], benchmark.gdata.batch_iterator

    def recording(images, labels, **kw):
        depths.append(kw["prefetch"])
        it = real_iterator(images, labels, **kw)
        nexts = []

        class Counting:
            def __next__(self):
                nexts.append(1)
                return next(it)

            def close(self):
                it.close()

        recording.nexts = nexts
        return Counting()

    monkeypatch.setattr(benchmark.gdata, "batch_iterator", recording)
    cfg = benchmark.BenchConfig(model="tiny", batch=2, iters=3, warmup=1, torch_threads=1,
                                rows=(row,))
    timings = benchmark.jax_rows(cfg, None) + benchmark.torch_rows(cfg, None)
    assert [(t.row, t.framework) for t in timings] == [(row, "gdjax")]
    assert depths == [benchmark.FED_DEPTH[row]] and benchmark.FED_DEPTH[row] == (
        2 if row == benchmark.FED else 0)
    assert len(recording.nexts) == 1 + 1 + 3  # the compile's batch, warm-up, timed calls
    assert len(timings[0].times_s) == 3 and timings[0].images == 2
