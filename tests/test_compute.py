"""Tests of gdjax/compute.py: the model-based FLOP counts, against counts by hand.

One layer of each kind (a convolution, a dense layer, a batched matrix product) is counted by
hand: 2 FLOPs per multiply-add. A convolution's gradient is counted as three convolutions
of the forward's size (forward, input gradient, weight gradient); a scan counts its body
once per iteration. A run's per-step split is checked against the model's forward counted
on its own: the teacher's sampling is teacher_steps forwards of the replay rows, its
labelling one forward (tests/test_studies.py checks the rows a run writes in
metrics/compute.jsonl, and that a resumed run writes the same).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from gdjax import compute, rundir, strategies
from gdjax.logs import MetricLogger, read_metrics
from gdjax.run import build, settings_from_config
from gdjax.state import initial_state
from tests.helpers import tiny_config

S = jax.ShapeDtypeStruct


def test_convolution_by_hand():
    conv = nn.Conv(4, (3, 3), padding="SAME")
    x = S((2, 8, 8, 3), jnp.float32)
    params = jax.eval_shape(conv.init, jax.random.key(0), x)
    # 2 images x 8 x 8 outputs x 4 channels, each 3 x 3 x 3 multiply-adds.
    by_hand = 2 * (2 * 8 * 8 * 4) * (3 * 3 * 3)
    assert compute.flops(conv.apply, params, x) == by_hand
    # Strided, no padding: 3 x 3 outputs of a 7 x 7 image with a 3 x 3 kernel, stride 2.
    strided = nn.Conv(5, (3, 3), strides=2, padding="VALID")
    y = S((1, 7, 7, 2), jnp.float32)
    p = jax.eval_shape(strided.init, jax.random.key(0), y)
    assert compute.flops(strided.apply, p, y) == 2 * (3 * 3 * 5) * (3 * 3 * 2)


def test_dense_and_batched_products_by_hand():
    dense = nn.Dense(7)
    x = S((5, 3), jnp.float32)
    params = jax.eval_shape(dense.init, jax.random.key(0), x)
    assert compute.flops(dense.apply, params, x) == 2 * 5 * 3 * 7
    a, b = S((4, 6, 8), jnp.float32), S((4, 8, 2), jnp.float32)
    assert compute.flops(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), a, b) == 2 * 4 * 6 * 8 * 2


def test_convolution_gradient_is_three_convolutions():
    conv = nn.Conv(4, (3, 3), padding="SAME")
    x = S((2, 8, 8, 3), jnp.float32)
    params = jax.eval_shape(conv.init, jax.random.key(0), x)
    forward = 2 * (2 * 8 * 8 * 4) * (3 * 3 * 3)
    wrt_both = jax.grad(lambda p, x: jnp.sum(conv.apply(p, x) ** 2), argnums=(0, 1))
    assert compute.flops(wrt_both, params, x) == 3 * forward
    # The gradient of the weights alone: no input gradient is computed.
    wrt_params = jax.grad(lambda p, x: jnp.sum(conv.apply(p, x) ** 2))
    assert compute.flops(wrt_params, params, x) == 2 * forward
    # Stride 2: the input gradient convolves the output gradient dilated by 2 (zeros
    # inserted); only its real values count, so again three forwards.
    down = nn.Conv(4, (3, 3), strides=2, padding="SAME")
    p2 = jax.eval_shape(down.init, jax.random.key(0), x)
    forward2 = 2 * (2 * 4 * 4 * 4) * (3 * 3 * 3)
    assert compute.flops(down.apply, p2, x) == forward2
    both2 = jax.grad(lambda p, x: jnp.sum(down.apply(p, x) ** 2), argnums=(0, 1))
    assert compute.flops(both2, p2, x) == 3 * forward2


def test_scan_counts_its_body_each_iteration_and_cond_its_dearest_branch():
    m = S((4, 4), jnp.float32)
    scanned = lambda x: jax.lax.scan(lambda c, _: (c @ c, None), x, None, length=5)[0]  # noqa: E731
    assert compute.flops(scanned, m) == 5 * 2 * 4 * 4 * 4
    branches = lambda p, x: jax.lax.cond(p, lambda x: x @ x @ x, lambda x: x, x)  # noqa: E731
    assert compute.flops(branches, S((), jnp.bool_), m) == 2 * (2 * 4 * 4 * 4)


def test_a_while_loop_is_refused_by_name():
    loop = lambda x: jax.lax.while_loop(lambda c: c[0, 0] < 1, lambda c: c @ c, x)  # noqa: E731
    with pytest.raises(ValueError, match="while loop"):
        compute.flops(loop, S((3, 3), jnp.float32))


def _forward(run, params, rows):
    h, w, c = run.image_shape
    return compute.flops(run.apply_fn, params, S((rows, h, w, c), jnp.float32),
                         S((rows,), jnp.int32))


@pytest.mark.parametrize("strategy", [strategies.FULL_GENERATION, strategies.NO_DISTILLATION,
                                      strategies.GAUSSIAN, strategies.NAIVE])
def test_generator_split_against_the_forward_counted_alone(tmp_path, strategy):
    config = tiny_config(strategy)
    config.strategy.teacher_steps = 3
    run = build(config, str(tmp_path))
    ls = initial_state(run)
    counter = compute.GeneratorFlops(run)
    rows = config.train.batch_size  # replay rows: the batch size
    forward = _forward(run, ls.train.params, rows)
    assert forward > 0
    total, sampling, labelling = counter.per_step(ls, run.uses_replay(1))
    generates = strategy in (strategies.FULL_GENERATION, strategies.NO_DISTILLATION)
    labels = strategy in (strategies.FULL_GENERATION, strategies.GAUSSIAN)
    assert sampling == (3 * forward if generates else 0)
    assert labelling == (forward if labels else 0)
    student = total - sampling - labelling
    trained = 2 * rows if run.uses_replay(1) else rows  # real rows plus the replay rows
    # Forward plus backward of the trained rows: between two and three forwards (the
    # input's gradient is not computed).
    assert 2 * forward * trained / rows < student <= 3 * forward * trained / rows
    plain, s0, l0 = counter.per_step(ls, False)
    assert (s0, l0) == (0, 0) and 2 * forward < plain <= 3 * forward


def test_runs_of_an_older_gdjax_get_their_rows_from_the_config(tmp_path):
    config = tiny_config(strategies.NO_DISTILLATION)
    workdir = str(tmp_path)
    rundir.write_config(workdir, settings_from_config(config).config)
    with pytest.raises(ValueError, match="no rows in metrics/experience.jsonl"):
        compute.write_missing_rows(workdir)
    with MetricLogger(workdir, tensorboard=False) as logger:
        for k in range(2):
            logger.write("experience", 4 * (k + 1), {"experience": k, "kld": 0.5})
    assert compute.write_missing_rows(workdir)
    run = build(config, workdir)
    counter, ls = compute.GeneratorFlops(run), initial_state(run)
    assert read_metrics(workdir, "compute") == [
        {"step": 4 * (k + 1), **counter.experience_row(ls, k)} for k in range(2)]
    assert not compute.write_missing_rows(workdir)  # it has them now: nothing written
