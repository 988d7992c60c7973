"""How long a sweep of runs will take on this machine, from measured step times.

`measure(run)` times, on the devices of this process, each compiled piece a run of
`config` executes: the plain train step and the strategy's replay step at the config's
batch, a batch of evaluation samples, the solver's plain and replay steps, and Inception
features per image (when `eval.fid`). `table(rows)` multiplies them by what each run
does (`run_cost`: steps per experience, samples per evaluation, solver epochs) and gives
the time per run and in all: the paper-scale schedule's cost on an accelerator, measured
rather than guessed. `launch/project.py` is its command line.

Compilation, data loading, checkpoints and the evaluation classifier's own training are
left out; they are small next to a paper-scale run.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gdjax import benchmark, strategies
from gdjax.eval import sampling
from gdjax.eval import solver as solver_lib
from gdjax.run import Run
from gdjax.state import initial_state

PLAIN, REPLAY, SAMPLES, SOLVER, SOLVER_REPLAY, INCEPTION = (
    "plain step", "replay step", "evaluation samples (batch)", "solver step",
    "solver replay step", "Inception (per image)")


@dataclasses.dataclass(frozen=True)
class RunCost:
    """What one run does, counted from its config."""

    plain_steps: int
    replay_steps: int
    sample_batches: int
    solver_steps: int
    solver_replay_steps: int
    inception_images: int

    def seconds(self, timings: dict[str, float]) -> float:
        return (self.plain_steps * timings[PLAIN] + self.replay_steps * timings.get(REPLAY, 0.0)
                + self.sample_batches * timings[SAMPLES]
                + self.solver_steps * timings.get(SOLVER, 0.0)
                + self.solver_replay_steps * timings.get(SOLVER_REPLAY, 0.0)
                + self.inception_images * timings.get(INCEPTION, 0.0))


def run_cost(run: Run) -> RunCost:
    """The work of a built `run` (train.mode "continual"), experience by experience."""
    s, n_exp = run.settings, len(run.experiences)
    steps = [run.num_steps(k) for k in range(n_exp)]
    replay = [run.uses_replay(k) for k in range(n_exp)]
    batches = -(-s.eval.num_samples // s.eval.batch_size)
    fid_exps = (n_exp if s.eval.fid_at == "all" else 1) if s.eval.fid else 0
    solver_steps = [0] * n_exp
    if s.solver is not None:
        for k in range(n_exp):
            n = len(solver_lib.experience_data(s.solver.strategy, run.train, run.experiences, k))
            solver_steps[k] = solver_lib.steps_per_experience(s.solver, n,
                                                              drop_last=s.data.drop_last)
    solver_replay = s.solver is not None and s.solver.strategy == "generative_replay"
    return RunCost(
        plain_steps=sum(s for s, r in zip(steps, replay) if not r),
        replay_steps=sum(s for s, r in zip(steps, replay) if r),
        sample_batches=n_exp * batches,
        solver_steps=solver_steps[0] + (0 if solver_replay else sum(solver_steps[1:])),
        solver_replay_steps=sum(solver_steps[1:]) if solver_replay else 0,
        inception_images=fid_exps * s.eval.num_samples)


def _timed(fn, iters: int) -> float:
    times, _ = benchmark.time_calls(fn, iters=iters, warmup=1, sync=jax.block_until_ready)
    return float(np.median(times))


def measure(run: Run, *, iters: int = 3) -> dict[str, float]:
    """Median seconds of each piece a run of `run.settings` executes (see the module doc)."""
    s = run.settings
    ls = initial_state(run)
    images = jax.device_put(jnp.zeros((s.train.batch_size,) + run.image_shape, jnp.float32),
                            run.sharding)
    out, state = {}, ls.train
    for label, with_replay in ((PLAIN, False), (REPLAY, True)):
        if with_replay and s.strategy.name in (strategies.NAIVE, strategies.CUMULATIVE):
            continue
        step = run.step(with_replay)
        batch = {"image": images}
        if s.strategy.name == strategies.ER:
            batch["memory"] = images
        holder = [state]

        def call(step=step, batch=batch, holder=holder):
            holder[0], metrics = step(holder[0], ls.teacher, batch, ls.key)
            return metrics

        out[label] = _timed(call, iters)
        state = holder[0]
    e = s.eval
    out[SAMPLES] = _timed(lambda: sampling.generate(
        run.apply_fn, state.params, run.schedule, ls.key, num=e.batch_size,
        image_shape=run.image_shape, num_steps=e.steps, eta=e.eta, batch_size=e.batch_size,
        sharding=run.sharding), iters)
    if s.solver is not None:
        out.update(_solver_timings(run, ls.solver, state.params, iters))
    if e.fid:
        out[INCEPTION] = _inception_seconds_per_image(iters)
    return out


def _solver_timings(run: Run, solver, gen_params, iters: int) -> dict[str, float]:
    cfg = run.settings.solver
    images = np.zeros((cfg.batch_size,) + run.image_shape, np.float32)
    labels = np.zeros(cfg.batch_size, np.int32)
    mask = np.ones(cfg.batch_size, np.float32)
    out = {}
    for label, with_replay in ((SOLVER, False), (SOLVER_REPLAY, True)):
        step = solver_lib.make_step(cfg, run.apply_fn if with_replay else None, with_replay)
        holder = [solver]
        args = (gen_params, run.schedule) if with_replay else (None, None)

        def call(step=step, holder=holder, args=args):
            holder[0], loss = step(holder[0], *args, images, labels, mask, jnp.int32(1),
                                   jax.random.key(0))
            return loss

        out[label] = _timed(call, iters)
        solver = holder[0]
    return out


def _inception_seconds_per_image(iters: int, batch: int = 50) -> float:
    """Inception-v3 features of `batch` 299x299 images (random weights: same cost)."""
    from flax import traverse_util

    from gdjax.eval import inception

    params = traverse_util.unflatten_dict({
        path: jnp.full(shape, 0.01, jnp.float32)
        for path, shape in inception.param_shapes().items()})
    images = np.zeros((batch, 32, 32, 1), np.uint8)
    return _timed(lambda: inception.pool_features_uint8(params, images, batch_size=batch),
                  iters) / batch


def table(rows: Sequence[tuple[str, int, RunCost, dict[str, float]]]) -> tuple[str, float]:
    """(Markdown table, total seconds) of rows (variant, seeds, its RunCost, its `measure`):
    each variant's work per run, its projected time per run and for all its seeds, then
    the step times measured on this machine."""
    lines = ["| variant | runs | plain steps | replay steps | sample batches | solver steps "
             "(with replay) | Inception images | per run | all runs |",
             "|---|---|---|---|---|---|---|---|---|"]
    total = 0.0
    for variant, seeds, cost, timings in rows:
        seconds = cost.seconds(timings)
        total += seeds * seconds
        lines.append(f"| {variant} | {seeds} | {cost.plain_steps} | {cost.replay_steps} | "
                     f"{cost.sample_batches} | {cost.solver_steps} ({cost.solver_replay_steps})"
                     f" | {cost.inception_images} | {_hours(seconds)} | "
                     f"{_hours(seeds * seconds)} |")
    lines.append(f"| **all** | {sum(r[1] for r in rows)} | | | | | | | **{_hours(total)}** |")
    lines += ["", "| measured on this machine (median) | seconds |", "|---|---|"]
    for name in dict.fromkeys(k for row in rows for k in row[3]):
        values = sorted({round(row[3][name], 4) for row in rows if name in row[3]})
        lines.append(f"| {name} | {', '.join(f'{v:.4g}' for v in values)} |")
    return "\n".join(lines), total


def _hours(seconds: float) -> str:
    if seconds >= 48 * 3600:
        return f"{seconds / 86400:.1f} d"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"
