"""Model-based compute: the FLOPs of the matrix products and convolutions a program runs.

`jaxpr_flops` walks a traced program (a jaxpr) and counts 2 FLOPs per multiply-add of every
`dot_general` and `conv_general_dilated` (of a dilated input, the products with its real
values only, as a strided convolution's input gradient has), inside calls, loops (a `scan` counts its body
`length` times) and branches (a `cond` counts its dearest branch); elementwise work (the
optimizer, activations, normalisation) is left out, as the usual "model FLOPs" do. The count
is exact for what the program computes, padded rows included, and the same on every
backend; the backward pass is counted as traced, not estimated.

`experience_row` is what a continual run records per experience in `metrics/compute.jsonl`:
the generator's FLOPs split into the student's update (forward and backward of every row),
the teacher's sampling (its reverse process for the replay rows) and the teacher's labelling
(its predictions that the student regresses onto), each over the experience's steps, all
read off the traces of the run's own train step and replay functions. The student's part
also holds a regulariser's importance pass (EWC / MAS, `strategy.regulariser`: one forward
and backward per batch measured, after every experience but the last).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from gdjax import regularisers, strategies

def _conv_flops(eqn) -> float:
    out = eqn.outvars[0].aval.shape
    rhs = eqn.invars[1].aval.shape
    spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
    per_output = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
    # An input dilated by d (the input gradient of a stride-d convolution) is mostly the
    # inserted zeros: a kernel meets 1 / prod(d) real inputs on average, so only those count.
    dilation = math.prod(eqn.params.get("lhs_dilation") or (1,))
    return 2.0 * math.prod(out) * per_output / dilation


def _dot_flops(eqn) -> float:
    (contract, _), _batch = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in contract)


def _sub_jaxprs(value):
    if isinstance(value, jcore.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jcore.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def jaxpr_flops(jaxpr) -> float:
    """FLOPs of the products and convolutions of `jaxpr` (a Jaxpr or ClosedJaxpr)."""
    if isinstance(jaxpr, jcore.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "while":
            raise ValueError("jaxpr_flops: a while loop's trip count is not known when "
                             "traced; write the loop as lax.scan (or fori_loop with static "
                             "bounds) to count it")
        elif name == "cond":
            total += max(jaxpr_flops(b) for b in eqn.params["branches"])
        else:
            inner = sum(jaxpr_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
            total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def flops(fn: Callable, *args, **kwargs) -> float:
    """FLOPs of `fn(*args, **kwargs)` (arrays or jax.ShapeDtypeStruct), traced, not run."""
    return jaxpr_flops(jax.make_jaxpr(functools.partial(fn, **kwargs))(*args))


def _shapes(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


class GeneratorFlops:
    """Per-step FLOPs of a run's generator, traced once per kind of step (plain or with the
    replay half) and kept: `per_step(ls, with_replay)` -> (total, teacher sampling,
    teacher labelling)."""

    def __init__(self, run):
        self.run = run
        self._cache: dict[bool, tuple[float, float, float]] = {}

    def _batch(self):
        s, (h, w, c) = self.run.settings, self.run.image_shape
        batch = {"image": jax.ShapeDtypeStruct((s.train.batch_size, h, w, c), jnp.float32)}
        rows = s.strategy.replay_size or s.train.batch_size
        if s.strategy.name == strategies.ER:
            batch["memory"] = jax.ShapeDtypeStruct((rows, h, w, c), jnp.float32)
        if s.class_conditional:  # labels of the real and the replay rows
            batch["label"] = jax.ShapeDtypeStruct((s.train.batch_size,), jnp.int32)
            batch["replay_label"] = jax.ShapeDtypeStruct((rows,), jnp.int32)
        return batch

    def _replay(self, teacher) -> tuple[float, float]:
        """(sampling, labelling) FLOPs of one step's replay rows."""
        run, s = self.run, self.run.settings
        cfg, shape = s.strategy, self.run.image_shape
        rows = cfg.replay_size or s.train.batch_size
        key = jax.random.key(0)
        image = lambda n: jax.ShapeDtypeStruct((n, *shape), jnp.float32)  # noqa: E731
        real = s.train.batch_size
        ints = lambda n: jax.ShapeDtypeStruct((n,), jnp.int32)  # noqa: E731
        # A conditional model's labels (guidance above 1 doubles the teacher's sampling)
        labels = (ints(rows), ints(real)) if s.class_conditional else (None, None)
        total = flops(lambda p, x, t, m, y, yd: strategies.replay_rows(
            cfg, apply_fn=run.apply_fn, teacher_params=p, schedule=run.schedule, rng=key,
            image_shape=(rows, *shape), data_x_t=x, data_t=t, memory_x0=m, labels=y,
            data_labels=yd, null_label=s.null_label),
            teacher, image(real), ints(real), image(rows), *labels)
        if cfg.name not in strategies.GENERATIVE_STRATEGIES:  # no reverse process
            return 0.0, total
        targets = ints(rows) if cfg.name in strategies.PER_ROW_STOP_STRATEGIES else None
        sampling = flops(lambda p, x, t, y: strategies.teacher_generate(
            run.apply_fn, p, run.schedule, x, num_steps=cfg.teacher_steps, eta=cfg.teacher_eta,
            rng=key, targets=t, labels=y, null_label=s.null_label,
            guidance=cfg.teacher_guidance), teacher, image(rows), targets, labels[0])
        return sampling, total - sampling

    def per_step(self, ls, with_replay: bool) -> tuple[float, float, float]:
        if with_replay not in self._cache:
            teacher = _shapes(ls.teacher) if ls.teacher is not None else None
            step = self.run.step(with_replay)
            total = flops(step, _shapes(ls.train), teacher, self._batch(), _shapes(ls.key))
            sampling, labelling = self._replay(teacher) if with_replay else (0.0, 0.0)
            self._cache[with_replay] = (total, sampling, labelling)
        return self._cache[with_replay]

    def importance(self, ls, k: int) -> float:
        """FLOPs of the regulariser's importance pass at the end of experience k (0 for
        those that measure none, and after the last experience)."""
        run = self.run
        if (run.settings.regulariser.name not in regularisers.DATA_IMPORTANCE
                or k + 1 >= len(run.experiences)):
            return 0.0
        if "importance" not in self._cache:
            s, (h, w, c) = run.settings, run.image_shape
            batch = {"image": jax.ShapeDtypeStruct((s.train.batch_size, h, w, c), jnp.float32),
                     "mask": jax.ShapeDtypeStruct((s.train.batch_size,), jnp.float32)}
            self._cache["importance"] = flops(run.importance_fn(), _shapes(ls.train.params),
                                              batch, _shapes(ls.key))
        return run.regulariser_batches(k) * self._cache["importance"]

    def experience_row(self, ls, k: int) -> dict:
        """Experience k's row of metrics/compute.jsonl."""
        steps = self.run.num_steps(k)
        total, sampling, labelling = self.per_step(ls, self.run.uses_replay(k))
        importance = self.importance(ls, k)
        return {"experience": k, "generator_steps": steps,
                "student_flops": steps * (total - sampling - labelling) + importance,
                "teacher_sampling_flops": steps * sampling,
                "teacher_labelling_flops": steps * labelling,
                "generator_flops": steps * total + importance}


def write_missing_rows(workdir: str) -> bool:
    """Writes metrics/compute.jsonl for a run that has experience rows but none of its own
    (a run of a gdjax older than the count): the counts its config.json gives, at the
    steps of its experience rows. Returns False, writing nothing, if the run has them."""
    from configs import base
    from gdjax.eval import rescore
    from gdjax.logs import read_metrics, replace_stream
    from gdjax.run import build
    from gdjax.state import initial_state

    if read_metrics(workdir, "compute"):
        return False
    experiences = read_metrics(workdir, "experience")
    if not experiences:
        raise ValueError(f"{workdir} has no rows in metrics/experience.jsonl: not a run that "
                         f"finished an experience, so there is nothing to count")
    run = build(rescore.load_config(workdir, base.get_config()), workdir)
    ls, counter = initial_state(run), GeneratorFlops(run)
    rows = [{"step": r["step"], **counter.experience_row(ls, r["experience"])}
            for r in experiences]
    replace_stream(workdir, "compute", rows)
    return True
