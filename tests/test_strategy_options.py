"""Strategy options inside the compiled step, and the optimiser, against independent references.

The step takes any `apply_fn`, so these tests give it a per-pixel linear denoiser,
eps = w * x + b * t / 1000: it compiles in about a second where the UNet takes many, and a
float64 numpy copy of it lets every replay input, target and loss be recomputed outside
JAX. A debug callback in it records what the student is fed (its one call on the data rows
and the replay rows together), so the tests see the step's real inputs and timesteps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gdjax import strategies
from gdjax.schedule import make_schedule
from gdjax.strategies import StrategyConfig
from gdjax.train_step import OptimConfig, init_state, make_optimizer, make_train_step

SCHEDULE = make_schedule()
ALPHA_BAR = np.asarray(SCHEDULE.alphas_cumprod, np.float64)
SHAPE = (8, 8, 1)
STUDENT = {"w": np.float32([0.3]), "b": np.float32([0.2])}
TEACHER = {"w": np.float32([0.8]), "b": np.float32([-0.5])}
LAMBD, EXPERIENCE = 0.7, 2  # loss weights 1/3 and 2/3 * 0.7


def make_recorder():
    """(apply_fn, calls): apply_fn is the linear denoiser; calls collects its (x, t) inputs."""
    calls = []

    def apply_fn(params, x, t):
        jax.debug.callback(lambda x, t: calls.append((np.asarray(x), np.asarray(t))), x, t)
        return params["w"] * x + params["b"] * (t.astype(jnp.float32) / 1000)[:, None, None, None]

    return apply_fn, calls


def denoise64(params, x, t):
    """The linear denoiser in float64 numpy."""
    w, b = (np.float64(params[k][0]) for k in ("w", "b"))
    return w * x + b * (np.asarray(t, np.float64) / 1000)[:, None, None, None]


def add_noise64(x0, eps, t):
    ab = ALPHA_BAR[t][:, None, None, None]
    return np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps


def reverse_process64(params, x, targets, *, num_steps, eta, noises, denoise=None):
    """REFERENCE §2 written out: the trailing per-sample grid and DDIM steps, float64
    (`denoise(params, x, t)`: denoise64 unless given)."""
    denoise = denoise or denoise64
    k = np.asarray(targets, np.int64)
    ratio = (1000 - k) / num_steps
    table = np.round(np.outer(np.arange(num_steps, 0, -1), ratio)).astype(np.int64) - 1 + k
    prev = table - (1000 - k) // num_steps
    for i in range(num_steps):
        t, t_prev = table[i], prev[i]
        e = denoise(params, x, t)
        a_t = ALPHA_BAR[t][:, None, None, None]
        a_prev = np.where(t_prev >= 0, ALPHA_BAR[np.maximum(t_prev, 0)], 1.0)[:, None, None, None]
        x0 = np.clip((x - np.sqrt(1 - a_t) * e) / np.sqrt(a_t + 1e-8), -1, 1)
        std = eta * np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / (a_prev + 1e-8)))
        new = np.sqrt(a_prev) * x0 + np.sqrt(np.clip(1 - a_prev - std**2, 0, 1)) * e
        new = new + std * noises[i]
        moved = np.ones_like(t, bool) if i == 0 else t != table[i - 1]
        x = np.where(moved[:, None, None, None], new, x)
    return x


def f64(a):
    return np.asarray(a, np.float64)


class Draws:
    """The step's random numbers, drawn from its keys as the step draws them."""

    def __init__(self, batch, rows, *, replay_start=0, num_steps=2, rng=jax.random.key(7)):
        k_eps, k_t, k_replay = jax.random.split(jax.random.fold_in(rng, 0), 3)
        self.eps = f64(jax.random.normal(k_eps, (batch,) + SHAPE))
        self.t = np.asarray(jax.random.randint(k_t, (batch,), 0, 1000))
        k_noise, k_rt, k_start, k_gen = jax.random.split(k_replay, 4)
        self.replay_eps = f64(jax.random.normal(k_noise, (rows,) + SHAPE))
        self.replay_t = np.asarray(jax.random.randint(k_rt, (rows,), replay_start, 1000))
        self.start = f64(jax.random.normal(k_start, (rows,) + SHAPE))
        self.step_noise = [f64(jax.random.normal(jax.random.fold_in(k_gen, i), (rows,) + SHAPE))
                           for i in range(num_steps)]


def one_step(cfg, batch_rows, *, memory_rows=None):
    """Runs one step of `cfg` at experience 2 from the untrained student; returns (images,
    memory rows or None, metrics, the (x, t) of the student's call on data + replay rows)."""
    apply_fn, calls = make_recorder()
    opt = make_optimizer(OptimConfig())
    step = make_train_step(apply_fn=apply_fn, schedule=SCHEDULE, strategy=cfg, optimizer=opt)
    images = np.asarray(jax.random.uniform(jax.random.key(2), (batch_rows,) + SHAPE,
                                           minval=-1, maxval=1))
    batch = {"image": jnp.asarray(images)}
    memory = None
    if memory_rows:
        memory = np.asarray(jax.random.uniform(jax.random.key(3), (memory_rows,) + SHAPE,
                                               minval=-1, maxval=1))
        batch["memory"] = jnp.asarray(memory)
    state = init_state(jax.tree.map(jnp.asarray, STUDENT), opt, experience=EXPERIENCE)
    _, metrics = step(state, jax.tree.map(jnp.asarray, TEACHER), batch, jax.random.key(7))
    metrics = jax.device_get(metrics)
    rows = batch_rows + (cfg.replay_size or batch_rows)
    student = [c for c in calls if c[0].shape[0] == rows]
    assert len(student) == 1, [c[0].shape for c in calls]
    return f64(images), memory, metrics, student[0]


def expected_losses(cfg, draws, images, x_replay, target):
    """(data, replay, total) losses of the untrained student, float64."""
    x_t = add_noise64(images, draws.eps, draws.t)
    data = np.mean((denoise64(STUDENT, x_t, draws.t) - draws.eps) ** 2)
    replay = np.mean((denoise64(STUDENT, x_replay, draws.replay_t) - target) ** 2)
    if cfg.name == strategies.ER:  # one mean over every row
        n, r = len(draws.t), len(draws.replay_t)
        return data, replay, (n * data + r * replay) / (n + r)
    w = 1 / (EXPERIENCE + 1)
    return data, replay, w * data + (1 - w) * LAMBD * replay


def assert_losses(metrics, want):
    for name, value in zip(("data_loss", "replay_loss", "loss"), want):
        assert float(metrics[name]) == pytest.approx(value, rel=1e-5), name


def expected_replay(name, d, *, num_steps=2, eta=0.0, memory=None):
    """(inputs, targets) of the replay rows of strategy `name` from the draws `d`, float64."""
    rows = len(d.replay_t)
    if name == strategies.ER:
        return add_noise64(f64(memory), d.replay_eps, d.replay_t), d.replay_eps
    if name == strategies.GAUSSIAN:
        return d.replay_eps, denoise64(TEACHER, d.replay_eps, d.replay_t)
    stops = d.replay_t if name == strategies.PARTIAL_GENERATION else np.zeros(rows, np.int64)
    x = reverse_process64(TEACHER, d.start, stops, num_steps=num_steps, eta=eta,
                          noises=d.step_noise)
    if name != strategies.PARTIAL_GENERATION:
        x = add_noise64(x, d.replay_eps, d.replay_t)
    return x, (d.replay_eps if name == strategies.NO_DISTILLATION
               else denoise64(TEACHER, x, d.replay_t))


def check_step(cfg, batch_rows, *, num_steps=2, eta=0.0):
    """Runs one step of `cfg`; checks the timesteps and inputs the student saw and the three
    losses against the float64 recomputation. Returns (those timesteps, the draws)."""
    rows = cfg.replay_size or batch_rows
    er = cfg.name == strategies.ER
    images, memory, metrics, (x, t) = one_step(cfg, batch_rows, memory_rows=rows if er else None)
    assert x.shape == (batch_rows + rows,) + SHAPE and t.shape == (batch_rows + rows,)
    # ER's memory rows are ordinary training rows: replay_start_timestep is not theirs.
    d = Draws(batch_rows, rows, num_steps=num_steps,
              replay_start=0 if er else cfg.replay_start_timestep)
    np.testing.assert_array_equal(t, np.concatenate([d.t, d.replay_t]))
    x_replay, target = expected_replay(cfg.name, d, num_steps=num_steps, eta=eta, memory=memory)
    np.testing.assert_allclose(x[:batch_rows], add_noise64(images, d.eps, d.t), atol=1e-5)
    np.testing.assert_allclose(x[batch_rows:], x_replay, atol=2e-5)
    assert_losses(metrics, expected_losses(cfg, d, images, x_replay, target))
    return t, d


# ----------------------------------------------------------------------------- replay timesteps, size

@pytest.mark.parametrize("name, rows", [(strategies.GAUSSIAN, 16), (strategies.ER, 48)])
def test_replay_start_timestep_and_replay_size(name, rows):
    """replay_start_timestep=900 bounds the replay rows' timesteps only (not the real rows',
    nor ER's memory rows'); replay_size sets the replay rows apart from the 32-row batch (ER's
    loss is then one mean over 32 + 48 rows, not the mean of two halves)."""
    b = 32
    cfg = StrategyConfig(name, lambd=LAMBD, replay_start_timestep=900, replay_size=rows)
    t, _ = check_step(cfg, b)
    data_t, replay_t = t[:b], t[b:]
    assert data_t.min() < 100 and data_t.max() > 900  # real rows: the full range
    if name == strategies.ER:
        assert replay_t.min() < 100
    else:
        assert replay_t.min() >= 900 and replay_t.max() <= 999
        assert len(np.unique(replay_t)) > 10  # drawn over 900..999, not pinned


# ----------------------------------------------------------------------------- the teacher's reverse process

@pytest.mark.parametrize("name, eta, rows", [
    (strategies.FULL_GENERATION, 0.5, 12),
    (strategies.PARTIAL_GENERATION, 0.0, 0),
    (strategies.PARTIAL_GENERATION, 0.5, 4),
])
def test_replay_inputs_are_the_teachers_reverse_process(name, eta, rows):
    """3 teacher steps (the grid's previous timestep is not the next one's: 999 -> 666,
    666 -> 333, then 332 -> -1), eta noise from the step's key, per-sample stops for
    partial generation; the replay rows (12, 8 and 4 of them) next to a batch of 8."""
    cfg = StrategyConfig(name, lambd=LAMBD, teacher_steps=3, teacher_eta=eta, replay_size=rows)
    _, d = check_step(cfg, 8, num_steps=3, eta=eta)
    if eta > 0:  # the noise moved the samples: eta reached the teacher
        with_eta = expected_replay(name, d, num_steps=3, eta=eta)[0]
        assert np.abs(expected_replay(name, d, num_steps=3, eta=0.0)[0] - with_eta).max() > 0.05


# ----------------------------------------------------------------------------- the optimiser

def test_adam_with_global_norm_clipping_matches_torch():
    """make_optimizer's defaults (Adam 2e-4, 0.9, 0.999, 1e-8; clip 1.0) vs torch.optim.Adam
    after clip_grad_norm_, over 3 updates of float32 params.

    Gradient norms 12, 0.4 and 3 (clipped, not, clipped) over leaves of different sizes (the
    norm is global, not per leaf); one leaf's gradients are near eps, where eps matters. The
    params start near 0 so that their displacement (what the optimiser computes) keeps full
    float32 precision; it agrees to 2e-5 relative (about 4e-9 on params of 1e-3, 1e-8 of
    params of magnitude 1): optax forms the bias correction 1 - 0.999**t in float32, 1.3e-5 off
    at t=1 (6e-6 after the square root), where torch uses Python floats.
    """
    import torch

    rng = np.random.default_rng(0)
    shapes = {"a": (3, 4), "b": (5,), "c": (2,)}
    params = {k: (1e-3 * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()}
    grads = []
    for norm in (12.0, 0.4, 3.0):
        g = {k: rng.normal(size=s) for k, s in shapes.items()}
        g["c"] *= 1e-7
        scale = norm / np.sqrt(sum(np.sum(v**2) for v in g.values()))
        grads.append({k: (v * scale).astype(np.float32) for k, v in g.items()})

    opt = make_optimizer(OptimConfig())

    @jax.jit
    def update(p, state, g):
        updates, state = opt.update(g, state, p)
        return optax.apply_updates(p, updates), state

    p = jax.tree.map(jnp.asarray, params)
    state = opt.init(p)
    for g in grads:
        p, state = update(p, state, g)

    names = sorted(shapes)
    torch_params = [torch.tensor(params[k], requires_grad=True) for k in names]
    torch_opt = torch.optim.Adam(torch_params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8)
    for g in grads:
        for param, k in zip(torch_params, names):
            param.grad = torch.tensor(g[k])
        torch.nn.utils.clip_grad_norm_(torch_params, 1.0)
        torch_opt.step()
    for param, k in zip(torch_params, names):
        moved, want = np.asarray(p[k]) - params[k], param.detach().numpy() - params[k]
        np.testing.assert_allclose(moved, want, rtol=2e-5, atol=2e-5 * np.abs(want).max(),
                                   err_msg=k)
