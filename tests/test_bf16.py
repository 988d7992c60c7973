"""Mixed precision: `model.dtype="bfloat16"` computes in bf16 and trains like float32.

The digits UNet, the same float32 initial params, the same batch of 16 digit images and
the same key, once with float32 and once with bfloat16 compute. The float32 run is the
reference: the bf16 step's loss stays within BF16_LOSS_RTOL of it, its gradient and update
point the same way, its params and Adam state stay float32, and a few steps of training on
the fixed batch lower the loss as far as float32 does.

bf16 keeps 8 significant bits (unit roundoff 2**-9 ~ 0.2%); the UNet keeps GroupNorm
statistics, the time embedding, the softmax and the loss in float32. Its output differs
from float32's by 1.5% (relative RMS, measured on the batch below); those errors are
uncorrelated with the residual and mostly average out in the mean squared error.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gdjax import data as gdata
from gdjax import strategies, unet
from gdjax.schedule import make_schedule
from gdjax.strategies import StrategyConfig
from gdjax.train_step import OptimConfig, init_state, make_optimizer, make_train_step

B = 16
TRAIN_STEPS = 20
SCHEDULE = make_schedule()
OPT = make_optimizer(OptimConfig(learning_rate=1e-3))  # the digits config's Adam, clip 1.0
DTYPES = ("float32", "bfloat16")
# Relative distance of a bf16 loss from the float32 loss: ~5 bf16 roundoffs. Measured:
# 0.11% (plain step); 0.07%, 0.11%, 0.03% (loss, data, replay loss of the distillation step).
BF16_LOSS_RTOL = 1e-2


@functools.lru_cache(maxsize=None)
def step_fn(dtype: str, with_replay: bool):
    """The jitted plain or generative-distillation step of the digits UNet in `dtype`."""
    model = unet.UNet(unet.get_unet_config("digits", dtype=dtype))

    def apply_fn(params, x, t):
        return model.apply({"params": params}, x, t)

    # 2-step teacher, the digits default: its reverse process runs in `dtype` too.
    return make_train_step(apply_fn=apply_fn, schedule=SCHEDULE, optimizer=OPT,
                           strategy=StrategyConfig(strategies.FULL_GENERATION, lambd=1.0),
                           with_replay=with_replay)


@pytest.fixture(scope="module")
def batch():
    train, _ = gdata.load_dataset("digits", image_size=16, channels=1)
    return {"image": jnp.asarray(train.images[:B])}


@pytest.fixture(scope="module")
def params0():
    """float32 initial params: the same for both dtypes (params never depend on dtype)."""
    return unet.init_params(unet.get_unet_config("digits"), jax.random.key(0))


def run(dtype, params, batch, *, steps=1, teacher=None, experience=0):
    """(final state, per-step metrics) of `steps` steps from `params` on the fixed batch."""
    step = step_fn(dtype, teacher is not None)
    # A copy: the step donates its state, and `params` is shared between runs.
    state = init_state(jax.tree.map(jnp.copy, params), OPT, experience=experience)
    metrics = []
    for _ in range(steps):
        # The plain step never reads its teacher argument; any params pytree fills it.
        state, m = step(state, teacher if teacher is not None else params, batch,
                        jax.random.key(3))
        metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    return state, metrics


@pytest.fixture(scope="module")
def trained(params0, batch):
    """{dtype: (state, metrics)} after TRAIN_STEPS plain steps on the fixed batch."""
    return {dtype: run(dtype, params0, batch, steps=TRAIN_STEPS) for dtype in DTYPES}


def flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def cosine(a, b) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def adam_first_moment(state) -> np.ndarray:
    """Adam's mu after one step: (1 - b1) * the clipped gradient, so it points along it."""
    is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)
    (adam,) = [s for s in jax.tree.leaves(state.opt_state, is_leaf=is_adam) if is_adam(s)]
    return flat(adam.mu)


def assert_float32_state(state):
    leaves = jax.tree.leaves((state.params, state.opt_state))
    floats = {str(x.dtype) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)}
    assert floats == {"float32"}, f"params / Adam state dtypes after a bf16 step: {floats}"


def compare_one_step(params0, batch, *, teacher=None, experience=0):
    """(float32 metrics, bf16 metrics, gradient cosine, update cosine) of one step each."""
    (s32, (m32,)), (s16, (m16,)) = (run(d, params0, batch, teacher=teacher,
                                        experience=experience) for d in DTYPES)
    assert_float32_state(s16)
    assert_float32_state(s32)
    p0 = flat(params0)
    return (m32, m16, cosine(adam_first_moment(s32), adam_first_moment(s16)),
            cosine(flat(s32.params) - p0, flat(s16.params) - p0))


def test_bf16_plain_step_matches_float32(params0, batch):
    m32, m16, grad_cos, update_cos = compare_one_step(params0, batch)
    assert m16["loss"] == pytest.approx(m32["loss"], rel=BF16_LOSS_RTOL)
    assert m16["loss"] != m32["loss"]  # bf16 compute really happened (0.11% apart)
    # The gradients agree closely (measured cosine 0.9998).
    assert grad_cos > 0.99, grad_cos
    # Adam's first update is lr * g / (|g| + eps) ~ lr * sign(g): the cosine of the updates
    # counts sign agreements, and a coordinate whose gradient is below bf16's noise flips
    # at random. Measured 0.983 (~0.9% of coordinates flipped).
    assert update_cos > 0.95, update_cos


@pytest.mark.slow  # a minute of one worker; the plain step's parity stays in the fast set
def test_bf16_distillation_step_matches_float32(params0, batch, trained):
    # The teacher: the float32 model after TRAIN_STEPS steps; its 2-step reverse process
    # and its targets run in the step's dtype, so bf16 errors reach the targets too.
    teacher = trained["float32"][0].params
    m32, m16, grad_cos, update_cos = compare_one_step(params0, batch, teacher=teacher,
                                                      experience=1)
    assert m32["replay_loss"] > 0
    for key in ("loss", "data_loss", "replay_loss"):
        assert m16[key] == pytest.approx(m32[key], rel=BF16_LOSS_RTOL), key
    # Measured 0.9992 (gradient) and 0.981 (update); see the plain step for the update's bound.
    assert grad_cos > 0.99, grad_cos
    assert update_cos > 0.95, update_cos


def test_bf16_training_lowers_the_loss_like_float32(trained):
    # Same key, same batch: both runs see the same noise and timesteps at every step, so
    # their losses compare step by step. Measured: 1.248 -> 0.208 (mean of the last 5, which
    # smooths the timestep draw) for both, 0.1% apart; twice the one-step tolerance allows
    # for 20 steps of accumulated differences.
    first = {d: trained[d][1][0]["loss"] for d in DTYPES}
    last = {d: np.mean([m["loss"] for m in trained[d][1][-5:]]) for d in DTYPES}
    for d in DTYPES:
        assert last[d] < 0.3 * first[d], (d, first[d], last[d])
    assert last["bfloat16"] == pytest.approx(last["float32"], rel=2 * BF16_LOSS_RTOL)
    assert_float32_state(trained["bfloat16"][0])
