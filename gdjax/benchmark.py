"""The speed study: gdjax and a faithful PyTorch baseline timed side by side (BENCHMARKS.md).

Rows (REFERENCE §8): a plain step at batch B and 2B, the generative-distillation step
(teacher DDIM on the replay rows, teacher labelling, student on B + R rows), the plain
generative-replay step (`no_distillation`), the gaussian-distillation step, and DDIM
sampling (10 steps, B images). The PyTorch side is our own baseline written as the
authors' code runs it: diffusers' `UNet2DModel`, Adam, `clip_grad_norm_`, MSE on eps and a
Python loop of DDIM steps for the teacher. Compilation and warm-up are timed apart.

FLOPs are counted from the model, not from the whole step's `cost_analysis`: XLA counts a
`while` loop's body once, so the teacher's scanned reverse process would be undercounted.
One forward per image comes from the compiled forward's `cost_analysis` (else the
lowered, pre-optimisation HLO's) and a train row costs forward x (3 x student rows +
teacher forward rows): the usual estimate of a backward pass as two forwards.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gdjax import data as gdata
from gdjax import ddim, strategies, unet
from gdjax.run import model_apply_fn
from gdjax.schedule import Schedule, make_schedule
from gdjax.train_step import OptimConfig, init_state, make_optimizer, make_train_step

PLAIN, PLAIN_2B, GD, REPLAY, GAUSSIAN, SAMPLE = (
    "plain step (B)", "plain step (2B)", "generative distillation", "generative replay",
    "gaussian distillation", "sampling (DDIM 10)")
ROWS = (PLAIN, PLAIN_2B, GD, REPLAY, GAUSSIAN, SAMPLE)
# Opt-in, gdjax only: the plain step fed by the run's input pipeline (host batches built,
# sharded and placed by gdjax.data.batch_iterator) with its background prefetch, and with
# each batch made inside the timed call: what the prefetch hides.
FED, FED_INLINE = "plain step, pipeline, prefetch 2", "plain step, pipeline, no prefetch"
FED_DEPTH = {FED: 2, FED_INLINE: 0}
ALL_ROWS = ROWS + (FED, FED_INLINE)
SAMPLE_STEPS = 10
# Dense peak TFLOP/s by (device-kind substring, dtype); CPUs are left unknown.
PEAK_TFLOPS = {("H200", "bfloat16"): 989.0, ("H100", "bfloat16"): 989.0,
               ("H200", "float32"): 67.0, ("H100", "float32"): 67.0,
               ("A100", "bfloat16"): 312.0, ("A100", "float32"): 19.5,
               ("TPU v4", "bfloat16"): 275.0, ("TPU v5 lite", "bfloat16"): 197.0,
               ("TPU v5p", "bfloat16"): 459.0}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    model: str = "ddim_medium"
    batch: int = 32
    iters: int = 5
    warmup: int = 1
    teacher_steps: int = 2
    dtype: str = "float32"
    rows: tuple[str, ...] = ROWS
    torch: bool = True
    torch_threads: int = os.cpu_count() or 1
    steps_per_call: int = 1  # gdjax's train rows: k steps per call (train.steps_per_call)


@dataclasses.dataclass
class Timing:
    """One row of one framework: raw seconds per call, compile seconds, the work done."""

    row: str
    framework: str
    times_s: list
    compile_s: float
    images: int
    flops: float
    peak_mem_bytes: int | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)


def time_calls(fn: Callable[[], object], *, iters: int, warmup: int,
               sync: Callable[[object], object] = lambda out: out) -> tuple[list, float]:
    """(seconds of each of `iters` timed calls, seconds of the `warmup` calls together).

    `sync(out)` must wait until the call's work is done (block_until_ready, cuda sync).
    """
    start = time.perf_counter()
    for _ in range(warmup):
        sync(fn())
    warm = time.perf_counter() - start
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return times, warm


def max_rss_bytes() -> int:
    """The process's peak resident memory since the last `reset_peak_rss` (Linux: VmHWM),
    else since it started. Both frameworks share the process, so this is their sum."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def reset_peak_rss() -> None:
    """Starts a new peak-RSS window where Linux allows it (a no-op elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def jax_peak_memory() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


# ---------------------------------------------------------------- FLOPs

def compiled_flops(compiled) -> float | None:
    """`cost_analysis()['flops']` of a compiled function, None where XLA gives none."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 (some backends raise instead of returning None)
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def forward_flops(config: unet.UNetConfig, batch: int = 1, *, compile: bool = True):
    """FLOPs of one forward of `batch` images (compiled cost analysis, else the lowered HLO's;
    `compile=False` takes the lowered HLO's at once); None where neither is available."""
    apply_fn = model_apply_fn(config)
    params = unet.param_shapes(config)
    x = jax.ShapeDtypeStruct((batch, config.sample_size, config.sample_size,
                              config.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    lowered = jax.jit(apply_fn).lower(params, x, t)
    return (compile and compiled_flops(lowered.compile())) or compiled_flops(lowered)


def row_work(row: str, batch: int, teacher_steps: int) -> tuple[int, int, int]:
    """(images per call, student rows trained, teacher forward rows) of a benchmark row.

    Replay rows number B (the baseline's default); a train row's images are the rows the
    student trains on, sampling's the images made.
    """
    if row in (PLAIN, FED, FED_INLINE):
        return batch, batch, 0
    if row == PLAIN_2B:
        return 2 * batch, 2 * batch, 0
    if row == GD:
        return 2 * batch, 2 * batch, batch * (teacher_steps + 1)
    if row == REPLAY:
        return 2 * batch, 2 * batch, batch * teacher_steps
    if row == GAUSSIAN:
        return 2 * batch, 2 * batch, batch
    if row == SAMPLE:
        return batch, 0, batch * SAMPLE_STEPS
    raise ValueError(f"unknown benchmark row {row!r}; known: {ALL_ROWS}")


def row_flops(row: str, batch: int, teacher_steps: int, fwd_per_image: float | None):
    if fwd_per_image is None:
        return float("nan")
    _, student, teacher = row_work(row, batch, teacher_steps)
    return fwd_per_image * (3 * student + teacher)


_ROW_STRATEGY = {PLAIN: strategies.NAIVE, PLAIN_2B: strategies.NAIVE, FED: strategies.NAIVE,
                 FED_INLINE: strategies.NAIVE,
                 GD: strategies.FULL_GENERATION, REPLAY: strategies.NO_DISTILLATION,
                 GAUSSIAN: strategies.GAUSSIAN}


# ---------------------------------------------------------------- gdjax side

def _jax_train_call(cfg: BenchConfig, row: str, config, params, schedule):
    """(compiled step, a no-argument call running it, the compiled program's flops)."""
    strategy = strategies.StrategyConfig(name=_ROW_STRATEGY[row], teacher_steps=cfg.teacher_steps)
    optimizer = make_optimizer(OptimConfig())
    k = cfg.steps_per_call
    step = make_train_step(apply_fn=model_apply_fn(config), schedule=schedule,
                           strategy=strategy, optimizer=optimizer,
                           with_replay=row not in (PLAIN, PLAIN_2B), steps=k)
    rows = 2 * cfg.batch if row == PLAIN_2B else cfg.batch
    size, ch = config.sample_size, config.in_channels
    batch = {"image": jax.random.uniform(jax.random.key(1), (rows, size, size, ch),
                                         minval=-1.0, maxval=1.0)}
    batches = None
    if row in FED_DEPTH:  # host images, as a run's: batched, sharded, placed by the pipeline
        if k > 1:
            raise ValueError(f"row {row!r} times one step per call; use steps_per_call=1")
        host = np.random.default_rng(1).uniform(-1, 1, (8 * rows, size, size, ch))
        batches = gdata.batch_iterator(host.astype(np.float32), np.zeros(8 * rows, np.int32),
                                       batch_size=rows, seed=0, experience=0,
                                       sharding=gdata.data_sharding(),
                                       prefetch=FED_DEPTH[row])
        first = next(batches)
        batch = {"image": first["image"], "mask": first["mask"]}
    if k > 1:  # k batches stacked, all k steps run: (..., batches, count, rng)
        batch = {"image": jnp.broadcast_to(batch["image"], (k,) + batch["image"].shape)}
    teacher = jax.tree.map(jnp.copy, params)  # the state is donated: keep separate buffers
    holder = {"state": init_state(jax.tree.map(jnp.copy, params), optimizer, experience=1)}
    rng = jax.random.key(2)
    extra = (np.int32(k),) if k > 1 else ()  # the step count of a k-step call
    start = time.perf_counter()
    compiled = step.lower(holder["state"], teacher, batch, *extra, rng).compile()
    compile_s = time.perf_counter() - start

    def call():
        feed = batch
        if batches is not None:  # the next batch, ready or made now (no prefetch)
            feed = {name: value for name, value in next(batches).items() if name in batch}
        holder["state"], metrics = compiled(holder["state"], teacher, feed, *extra, rng)
        return holder["state"], metrics

    call.close = batches.close if batches is not None else lambda: None
    return call, compile_s, compiled_flops(compiled)


def _jax_sample_call(cfg: BenchConfig, config, params, schedule):
    apply_fn = model_apply_fn(config)
    shape = (cfg.batch, config.sample_size, config.sample_size, config.in_channels)

    def sample(params, schedule, rng):
        x = jax.random.normal(rng, shape)
        return ddim.reverse_process(lambda x, t: apply_fn(params, x, t), schedule, x,
                                    num_steps=SAMPLE_STEPS)

    start = time.perf_counter()
    compiled = jax.jit(sample).lower(params, schedule, jax.random.key(3)).compile()
    compile_s = time.perf_counter() - start
    return (lambda: compiled(params, schedule, jax.random.key(3))), compile_s, \
        compiled_flops(compiled)


def jax_rows(cfg: BenchConfig, fwd_per_image: float | None) -> list[Timing]:
    """Times every requested row with gdjax's compiled step and sampler."""
    config = unet.get_unet_config(cfg.model, dtype=cfg.dtype)
    params = unet.init_params(config, jax.random.key(0))
    schedule = make_schedule()
    out = []
    for row in cfg.rows:
        reset_peak_rss()
        if row == SAMPLE:
            call, compile_s, xla_flops = _jax_sample_call(cfg, config, params, schedule)
        else:
            call, compile_s, xla_flops = _jax_train_call(cfg, row, config, params, schedule)
        times, warm = time_calls(call, iters=cfg.iters, warmup=cfg.warmup,
                                 sync=jax.block_until_ready)
        getattr(call, "close", lambda: None)()
        if row != SAMPLE and cfg.steps_per_call > 1:  # per train step, as the other rows
            times = [t / cfg.steps_per_call for t in times]
        out.append(Timing(row, "gdjax", times, compile_s, row_work(row, cfg.batch,
                                                                  cfg.teacher_steps)[0],
                          row_flops(row, cfg.batch, cfg.teacher_steps, fwd_per_image),
                          jax_peak_memory() or max_rss_bytes(),
                          {"warmup_s": warm, "xla_cost_analysis_flops": xla_flops}))
    return out


# ---------------------------------------------------------------- PyTorch side

class TorchBaseline:
    """The authors' training and sampling as PyTorch runs them (eager, NCHW, Python loops)."""

    def __init__(self, config: unet.UNetConfig, *, threads: int, seed: int = 0,
                 device: str = "cpu", schedule: Schedule | None = None):
        import copy

        import torch
        from diffusers import UNet2DModel
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.torch, self.device = torch, device
        self.model = UNet2DModel(**config.to_diffusers()).to(device)
        self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=2e-4)
        schedule = schedule or make_schedule()
        self.alphas_cumprod = torch.from_numpy(np.array(schedule.alphas_cumprod)).to(device)
        self.T = schedule.num_train_timesteps

    def add_noise(self, x0, noise, t):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def sample(self, model, noise, num_steps: int):
        """DDIM, trailing grid, eta 0, x0 clipped, from `noise` to clean images (REFERENCE §2)."""
        torch, x = self.torch, noise
        with torch.no_grad():
            for t in ddim.timestep_grid(num_steps, 0, self.T).tolist():
                t_prev = t - self.T // num_steps
                a_t = self.alphas_cumprod[t]
                a_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else torch.tensor(1.0)
                e = model(x, torch.full((x.shape[0],), t, device=self.device)).sample
                x0 = ((x - (1 - a_t).sqrt() * e) / (a_t + 1e-8).sqrt()).clamp(-1, 1)
                x = a_prev.sqrt() * x0 + (1 - a_prev).clamp(0, 1).sqrt() * e
        return x

    def replay(self, strategy: str, shape, teacher_steps: int):
        """(x, t, target) of the replay rows for a generative or gaussian strategy."""
        torch = self.torch
        t = torch.randint(0, self.T, shape[:1], device=self.device)
        noise = torch.randn(shape, device=self.device)
        with torch.no_grad():
            if strategy == strategies.GAUSSIAN:
                return noise, t, self.teacher(noise, t).sample
            x0 = self.sample(self.teacher, torch.randn(shape, device=self.device), teacher_steps)
            x = self.add_noise(x0, noise, t)
            if strategy == strategies.NO_DISTILLATION:
                return x, t, noise
            return x, t, self.teacher(x, t).sample

    def train_on(self, x, t, target, *, data_rows: int | None = None, experience: int = 1):
        """One Adam step on MSE(model(x, t), target); rows past `data_rows` are replay rows,
        weighted 1/(k+1) and 1 - 1/(k+1) for experience k. Returns the loss (a float)."""
        torch = self.torch
        pred = self.model(x, t).sample
        mse = torch.nn.functional.mse_loss
        if data_rows is None or data_rows == x.shape[0]:
            loss = mse(pred, target)
        else:
            w = 1.0 / (experience + 1)
            loss = (w * mse(pred[:data_rows], target[:data_rows])
                    + (1 - w) * mse(pred[data_rows:], target[data_rows:]))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return float(loss.detach())

    def train_step(self, x0, strategy: str = strategies.NAIVE, teacher_steps: int = 2):
        """The whole baseline step on clean images x0 [B, C, H, W]: noising, replay, update."""
        torch = self.torch
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.T, x0.shape[:1], device=self.device)
        x, target = self.add_noise(x0, noise, t), noise
        if strategy == strategies.NAIVE:
            return self.train_on(x, t, target)
        rx, rt, rtarget = self.replay(strategy, tuple(x0.shape), teacher_steps)
        return self.train_on(torch.cat([x, rx]), torch.cat([t, rt]),
                             torch.cat([target, rtarget]), data_rows=x0.shape[0])

    def timed(self, fn, *, iters: int, warmup: int) -> tuple[list, float]:
        """Wall clock on CPU; CUDA events (after a synchronize) on GPU."""
        torch = self.torch
        if self.device == "cpu":
            return time_calls(fn, iters=iters, warmup=warmup)
        times, warm = [], time_calls(fn, iters=0, warmup=warmup,
                                     sync=lambda _: torch.cuda.synchronize())[1]
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return times, warm

    def peak_memory(self) -> int:
        if self.device == "cpu":
            return max_rss_bytes()
        return int(self.torch.cuda.max_memory_allocated())


def torch_rows(cfg: BenchConfig, fwd_per_image: float | None) -> list[Timing]:
    """Times every requested row with the PyTorch baseline."""
    import torch
    config = unet.get_unet_config(cfg.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = TorchBaseline(config, threads=cfg.torch_threads, device=device)
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else None
    shape = (cfg.batch, config.in_channels, config.sample_size, config.sample_size)
    x0 = torch.rand(shape, device=device) * 2 - 1
    out = []
    for row in cfg.rows:
        if row in FED_DEPTH:  # gdjax's own input pipeline: no PyTorch counterpart timed
            continue
        reset_peak_rss()
        if row == SAMPLE:
            fn = lambda: base.sample(base.model, torch.randn(shape, device=device), SAMPLE_STEPS)
        else:
            data = torch.cat([x0, x0]) if row == PLAIN_2B else x0
            fn = (lambda data=data, s=_ROW_STRATEGY[row]:
                  base.train_step(data, s, cfg.teacher_steps))
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            times, warm = base.timed(fn, iters=cfg.iters, warmup=cfg.warmup)
        out.append(Timing(row, "pytorch", times, 0.0, row_work(row, cfg.batch,
                                                               cfg.teacher_steps)[0],
                          row_flops(row, cfg.batch, cfg.teacher_steps, fwd_per_image),
                          base.peak_memory(), {"warmup_s": warm, "device": device}))
    return out


# ---------------------------------------------------------------- report

def hardware() -> dict:
    device = jax.devices()[0]
    return {"platform": device.platform, "device_kind": device.device_kind,
            "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "processor": platform.processor()}


def load_average() -> list | None:
    """1, 5 and 15 minute load averages: CPU timings mean little above ~the core count."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def versions() -> dict:
    out = {"python": platform.python_version(), "jax": jax.__version__}
    for name in ("jaxlib", "flax", "optax", "numpy", "torch", "diffusers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """Dense peak TFLOP/s of a known accelerator in `dtype`; None (unknown) for CPUs."""
    for (kind, kind_dtype), peak in PEAK_TFLOPS.items():
        if kind.lower() in device_kind.lower() and kind_dtype == dtype:
            return peak
    return None


def _summary(t: Timing, peak: float | None) -> dict:
    tflops = t.flops / t.median_s / 1e12 if math.isfinite(t.flops) else None
    return {"median_ms": 1e3 * t.median_s, "min_ms": 1e3 * min(t.times_s),
            "max_ms": 1e3 * max(t.times_s), "images_per_s": t.images / t.median_s,
            "tflops": tflops, "fraction_of_peak": tflops / peak if tflops and peak else None,
            "compile_s": t.compile_s, "peak_mem_mib": (t.peak_mem_bytes or 0) / 2**20}


def summarize(timings: list[Timing], peaks: dict) -> list[dict]:
    """One dict per (row, framework) with the table's numbers, plus PyTorch/gdjax ratios."""
    by_key = {(t.row, t.framework): t for t in timings}
    out = []
    for t in sorted(timings, key=lambda t: (ALL_ROWS.index(t.row), t.framework != "gdjax")):
        entry = {"row": t.row, "framework": t.framework, **_summary(t, peaks.get(t.framework))}
        other = by_key.get((t.row, "gdjax"))
        if t.framework == "pytorch" and other is not None:
            entry["ratio"] = t.median_s / other.median_s
        out.append(entry)
    return out


def format_table(summary: list[dict]) -> str:
    """A markdown table: ms/step (median, min-max), images/s, TFLOP/s, peak, memory."""
    head = ("| row | framework | ms/step median (min-max) | images/s | PyTorch/gdjax | "
            "TFLOP/s | % of peak | compile s | peak mem MiB (process RSS on CPU) |")
    lines = [head, "|" + "---|" * 9]
    for s in summary:
        ratio = f"{s['ratio']:.2f}x" if "ratio" in s else ""
        tflops = f"{s['tflops']:.3f}" if s["tflops"] is not None else "n/a"
        frac = f"{100 * s['fraction_of_peak']:.1f}" if s["fraction_of_peak"] else "unknown"
        lines.append(
            f"| {s['row']} | {s['framework']} | {s['median_ms']:.0f} ({s['min_ms']:.0f}-"
            f"{s['max_ms']:.0f}) | {s['images_per_s']:.1f} | {ratio} | {tflops} | {frac} | "
            f"{s['compile_s']:.1f} | {s['peak_mem_mib']:.0f} |")
    return "\n".join(lines)


def run(cfg: BenchConfig, *, argv=None) -> dict:
    """Runs the study; returns the JSON-ready result (raw timings, summary, table, context)."""
    load_start = load_average()
    fwd = forward_flops(unet.get_unet_config(cfg.model, dtype=cfg.dtype))
    timings = jax_rows(cfg, fwd)
    if cfg.torch:
        timings += torch_rows(cfg, fwd)
    hw = hardware()
    torch_kind = "cuda" if any(t.extra.get("device") == "cuda" for t in timings) else "cpu"
    peaks = {"gdjax": peak_tflops(hw["device_kind"], cfg.dtype),
             "pytorch": peak_tflops(_torch_device_kind() if torch_kind == "cuda" else "cpu",
                                    cfg.dtype)}
    summary = summarize(timings, peaks)
    return {"config": dataclasses.asdict(cfg), "command": " ".join(argv or sys.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "hardware": hw, "load_average_start": load_start,
            "load_average_end": load_average(), "versions": versions(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "forward_flops_per_image": fwd, "peak_tflops": peaks,
            "timings": [dataclasses.asdict(t) for t in timings], "summary": summary,
            "table": format_table(summary)}


def _torch_device_kind() -> str:
    import torch
    return torch.cuda.get_device_name(0)


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
