"""Tests of the generator's regularisers (strategy.regulariser: L2, EWC, MAS, SI): the
penalties, importances and SI's path integral against float64 numpy recomputations on a
linear denoiser (whose gradients are written out by hand), their wiring through the
compiled train step, and whole runs that compile each step once and resume bitwise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdjax import continual, regularisers
from gdjax.logs import read_metrics
from gdjax.regularisers import RegConfig
from gdjax.run import build, settings_from_config
from gdjax.schedule import make_schedule
from gdjax.strategies import StrategyConfig
from gdjax.train_step import OptimConfig, init_state, make_optimizer, make_train_step
from tests.helpers import killed_then_resumed, leaves, tiny_config

B, SHAPE, D = 6, (2, 2, 1), 4
SCHEDULE = make_schedule("linear", num_train_timesteps=50, beta_start=1e-4, beta_end=0.02,
                         rescale_zero_snr=False)


def linear(params, x, t):
    """A denoiser linear in x: eps(x) = x W + b over the flattened pixels (t unused)."""
    flat = x.reshape(x.shape[0], -1) @ params["w"] + params["b"]
    return flat.reshape(x.shape)


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(0, 0.5, (D, D)), jnp.float32),
            "b": jnp.asarray(rng.normal(0, 0.5, (D,)), jnp.float32)}


def _batch(seed=1, real=B):
    rng = np.random.default_rng(seed)
    mask = np.zeros(B, np.float32)
    mask[:real] = 1.0
    return {"image": rng.uniform(-1, 1, (B, *SHAPE)).astype(np.float32), "mask": mask}


def _f64(tree):
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def _noisy(batch, k_eps, k_t):
    """(x_t, eps) as float64 [B, D]: the draws made in jax, the forward process in numpy."""
    x0 = batch["image"]
    eps = np.asarray(jax.random.normal(k_eps, x0.shape, x0.dtype), np.float64)
    t = np.asarray(jax.random.randint(k_t, x0.shape[:1], 0, SCHEDULE.num_train_timesteps))
    a = np.asarray(SCHEDULE.alphas_cumprod, np.float64)[t][:, None]
    x_t = np.sqrt(a) * x0.reshape(B, -1) + np.sqrt(1 - a) * eps.reshape(B, -1)
    return x_t, eps.reshape(B, -1)


def _mse_grads(p, x, target, mask):
    """Gradient of mean over the masked rows of each row's mean squared error of x W + b."""
    r = (x @ p["w"] + p["b"] - target) * mask[:, None]
    scale = 2.0 / (mask.sum() * D)
    return {"w": scale * x.T @ r, "b": scale * r.sum(0)}


def _norm_grads(p, x, mask):
    """Gradient of the mean over the masked rows of ||x W + b||^2."""
    y = (x @ p["w"] + p["b"]) * mask[:, None]
    scale = 2.0 / mask.sum()
    return {"w": scale * x.T @ y, "b": scale * y.sum(0)}


@pytest.mark.parametrize("name", [regularisers.EWC, regularisers.MAS])
def test_the_importance_is_the_float64_mean_of_squared_or_absolute_batch_gradients(name):
    cfg = RegConfig(name)
    fn = regularisers.make_importance_fn(cfg, linear, SCHEDULE)
    params, key = _params(), jax.random.key(3)
    batches = [_batch(1), _batch(2, real=4)]  # the second one partial: its padding is left out
    got = regularisers.mean_importance(fn, params, iter(batches), key)
    p64, want = _f64(params), {"w": 0.0, "b": 0.0}
    for i, batch in enumerate(batches):
        k_eps, k_t = jax.random.split(jax.random.fold_in(key, i))
        x_t, eps = _noisy(batch, k_eps, k_t)
        if name == regularisers.EWC:
            g = {k: v ** 2 for k, v in _mse_grads(p64, x_t, eps, batch["mask"]).items()}
        else:
            g = {k: np.abs(v) for k, v in _norm_grads(p64, x_t, batch["mask"]).items()}
        want = {k: want[k] + g[k] / len(batches) for k in g}
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-5, atol=1e-7)
        assert np.abs(want[k]).max() > 1e-3


def test_penalty_and_consolidation_match_numpy():
    params, anchor = _params(0), _params(5)
    importance = jax.tree.map(jnp.abs, _params(6))
    p, a, w = _f64(params), _f64(anchor), _f64(importance)
    reg = {"anchor": anchor, "importance": importance, "active": jnp.float32(1.0)}
    want = sum(np.sum(w[k] * (p[k] - a[k]) ** 2) for k in p)
    np.testing.assert_allclose(float(regularisers.penalty(params, reg)), want, rtol=1e-6)
    l2 = {"anchor": anchor, "active": jnp.float32(1.0)}
    np.testing.assert_allclose(float(regularisers.penalty(params, l2)),
                               sum(np.mean((p[k] - a[k]) ** 2) for k in p), rtol=1e-6)
    assert float(regularisers.penalty(params, {**reg, "active": jnp.float32(0.0)})) == 0.0

    # EWC / MAS: the importances add up and the anchor moves to the params.
    extra = jax.tree.map(jnp.abs, _params(7))
    out = regularisers.consolidate(RegConfig("ewc"), reg, params, extra)
    for k in p:
        np.testing.assert_allclose(np.asarray(out["importance"][k]),
                                   w[k] + np.asarray(extra[k], np.float64), rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(out["anchor"][k]), np.asarray(params[k]))
    # SI: the trajectory over (change since the anchor)^2 + eps is added, then reset.
    eps = 0.1
    trajectory = _params(8)
    si = {**reg, "trajectory": trajectory}
    out = regularisers.consolidate(RegConfig("si", eps=eps), si, params)
    for k in p:
        want = w[k] + np.asarray(trajectory[k], np.float64) / ((p[k] - a[k]) ** 2 + eps)
        np.testing.assert_allclose(np.asarray(out["importance"][k]), want, rtol=1e-5)
        assert not np.asarray(out["trajectory"][k]).any()
    assert float(out["active"]) == 1.0


def test_a_fresh_state_is_inactive_and_anchored_at_the_params():
    params = _params()
    assert regularisers.init(RegConfig(), params) is None
    for name in ("l2", "ewc", "mas", "si"):
        reg = regularisers.init(RegConfig(name), params)
        assert float(reg["active"]) == 0.0
        assert ("importance" in reg) == (name != "l2") and ("trajectory" in reg) == (name == "si")
        assert float(regularisers.penalty(_params(1), reg)) == 0.0


def test_the_train_step_adds_the_penalty_and_integrates_si_with_the_whole_gradient():
    weight = 0.7
    cfg = RegConfig("si", weight=weight)
    optimizer = make_optimizer(OptimConfig(learning_rate=0.05))
    step = make_train_step(apply_fn=linear, schedule=SCHEDULE, strategy=StrategyConfig("naive"),
                           optimizer=optimizer, with_replay=False, regulariser=cfg)
    params, anchor = _params(0), _params(5)
    importance = jax.tree.map(jnp.abs, _params(6))
    reg = {"anchor": anchor, "importance": importance, "active": jnp.float32(1.0),
           "trajectory": jax.tree.map(jnp.zeros_like, params)}
    p, a, w = _f64(params), _f64(anchor), _f64(importance)
    batch, key = _batch(1, real=5), jax.random.key(11)
    state = init_state(params, optimizer, reg=reg)  # donated to the step
    new, metrics = step(state, _params(0), batch, key)

    k_eps, k_t, _ = jax.random.split(jax.random.fold_in(key, 0), 3)
    x_t, eps = _noisy(batch, k_eps, k_t)
    r = (x_t @ p["w"] + p["b"] - eps) * batch["mask"][:, None]
    data_loss = np.sum(r ** 2) / (batch["mask"].sum() * D)
    penalty = weight * sum(np.sum(w[k] * (p[k] - a[k]) ** 2) for k in p)
    np.testing.assert_allclose(float(metrics["data_loss"]), data_loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["reg_loss"]), penalty, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), data_loss + penalty, rtol=1e-5)

    g = _mse_grads(p, x_t, eps, batch["mask"])
    g = {k: g[k] + weight * 2 * w[k] * (p[k] - a[k]) for k in p}
    moved = {k: np.asarray(new.params[k], np.float64) - p[k] for k in p}
    for k in p:
        np.testing.assert_allclose(np.asarray(new.reg["trajectory"][k]), -g[k] * moved[k],
                                   rtol=1e-4, atol=1e-9)
        np.testing.assert_array_equal(np.asarray(new.reg["anchor"][k], np.float64), a[k])
    assert min(np.abs(m).max() for m in moved.values()) > 1e-3


@pytest.mark.parametrize("overrides, message", [
    (dict(regulariser="ewk"), r"strategy.regulariser='ewk' is unknown; use one of: none, l2"),
    (dict(regulariser="ewc", regulariser_weight=-1.0), "regulariser_weight=-1.0 must be"),
    (dict(regulariser="si", regulariser_eps=0.0), "regulariser_eps=0.0 must be > 0 for SI"),
    (dict(regulariser="mas", regulariser_batches=-2), "regulariser_batches=-2 must be"),
])
def test_bad_regulariser_settings_are_named(overrides, message):
    c = tiny_config("naive")
    for key, value in overrides.items():
        setattr(c.strategy, key, value)
    with pytest.raises(ValueError, match=message):
        settings_from_config(c)


def test_a_regulariser_needs_the_continual_mode():
    c = tiny_config("naive", mode="iid")
    c.strategy.regulariser = "l2"
    with pytest.raises(ValueError, match="needs train.mode='continual'"):
        settings_from_config(c)


def _config(name, **strategy):
    c = tiny_config("naive")
    c.strategy.regulariser = name
    c.strategy.regulariser_weight = 5.0
    c.strategy.regulariser_batches = 2
    for key, value in strategy.items():
        setattr(c.strategy, key, value)
    return c


@pytest.mark.slow  # a whole run with its own compiled step (the fast set is near its bound)
def test_an_ewc_run_measures_on_its_data_and_pulls_towards_the_last_experience(
        tmp_path, monkeypatch, compilations):
    measured = []
    real = continual.consolidate_regulariser

    def spying(loop, ls, k):
        out = real(loop, ls, k)
        reg = out.train.reg  # copied out: the next step donates it
        measured.append((k, leaves(ls.train.params), {
            "anchor": leaves(reg["anchor"]), "importance": leaves(reg["importance"]),
            "active": float(reg["active"])}))
        return out

    monkeypatch.setattr(continual, "consolidate_regulariser", spying)
    workdir = str(tmp_path / "ewc")
    state = continual.train(_config("ewc"), workdir)
    # After experience 0 (not after the last): anchored at the params it ended with, an
    # importance that is the float32 mean over 2 of its batches (the function is tested
    # above), active.
    k, params, reg = measured[0]
    assert k == 0 and reg["active"] == 1.0
    for a, b in zip(reg["anchor"], params):
        np.testing.assert_array_equal(a, b)
    assert all(np.all(v >= 0) for v in reg["importance"])
    assert max(v.max() for v in reg["importance"]) > 0
    # After the last experience nothing changes: no later one is held to it.
    assert [m[0] for m in measured] == [0, 1]
    for a, b in zip(measured[1][2]["importance"] + measured[1][2]["anchor"],
                    reg["importance"] + reg["anchor"]):
        np.testing.assert_array_equal(a, b)
    rows = read_metrics(workdir, "train")
    assert all(r["reg_loss"] == 0 for r in rows[:4])  # nothing to hold on to yet
    assert all(r["reg_loss"] > 0 for r in rows[5:])
    penalty = 5.0 * float(regularisers.penalty(state.params, state.reg))
    assert penalty > 0
    compute = read_metrics(workdir, "compute")
    # The importance pass (2 batches, once) is in experience 0's student FLOPs.
    assert compute[0]["student_flops"] > compute[1]["student_flops"]
    assert compilations["train_step"] <= 1
    timing = read_metrics(workdir, "timing")
    assert timing[0]["regulariser_s"] > 0 and "regulariser_s" not in timing[1]


@pytest.mark.slow  # two whole runs per regulariser
@pytest.mark.parametrize("name", ["l2", "ewc", "mas", "si"])
def test_a_regularised_run_killed_mid_experience_resumes_bitwise(name, tmp_path, monkeypatch):
    c = _config(name)
    c.data.n_experiences = 5
    whole = continual.train(c, str(tmp_path / "whole"))
    resumed = killed_then_resumed(c, str(tmp_path / "killed"), monkeypatch, at=(2, 3))
    for a, b in zip(leaves((resumed.params, resumed.reg)), leaves((whole.params, whole.reg))):
        np.testing.assert_array_equal(a, b)
    assert read_metrics(tmp_path / "killed", "train") == read_metrics(tmp_path / "whole",
                                                                      "train")


def test_no_regulariser_by_default_and_clogs_weights_unless_given(tmp_path):
    reg = build(tiny_config(), str(tmp_path)).settings.regulariser
    assert not reg.enabled
    c = _config("ewc", regulariser_weight=0.0)
    assert settings_from_config(c).regulariser.scale == 5e4
    assert settings_from_config(_config("mas")).regulariser.scale == 5.0  # given
