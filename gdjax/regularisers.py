"""The generator's regularisation baselines: L2, EWC, MAS and SI towards the previous
experience's parameters (the set CLoG compares), `strategy.regulariser`.

Each adds `weight * sum_i importance_i * (theta_i - anchor_i)^2` to the generator's loss
inside the one compiled train step, from the second experience on; the anchor is the
generator's parameters at the end of the previous experience, and the importances of
the experiences so far add up (one anchor, one importance: two extra copies of the
parameters however many experiences there are). `regulariser_weight` 0 takes CLoG's
weight for the method (DEFAULT_WEIGHTS).

- L2: each tensor's mean squared distance, summed over the tensors (CLoG's form, so that
  its weight carries over: importance 1 / the tensor's size).
- EWC: the empirical Fisher. At an experience's end, for each of its first N batches
  (`regulariser_batches`; 0: one epoch), the gradient g_b of that batch's diffusion loss
  (the run's criterion over its real rows, fresh noise and timesteps) is squared, and the
  importance is the mean of g_b^2 over the N batches.
- MAS: the sensitivity of the output, as EWC but with g_b the gradient of the batch mean
  of each row's squared L2 norm of the predicted noise ||eps_theta(x_t, t)||^2, and its
  absolute value |g_b| averaged.
- SI: the path integral. Along an experience every step adds -g * (theta_new - theta_old)
  (g: the step's gradient of its whole loss, penalty included, before clipping) to a
  trajectory; at the end the importance gains trajectory / ((theta_end - anchor)^2 + eps)
  (`regulariser_eps`), unclipped as in Zenke et al. and CLoG, and the trajectory resets.

How gdjax differs from CLoG's code, knowingly: CLoG's EWC and MAS sum the gradients of
all batches before squaring (they are never zeroed between its batches), so its EWC
weight 5e4 does not mean the same here; its MAS takes the norm over the last image axis
only and carries a factor 1/2 (its weight 5 is 2.5 here). The state is a pytree in the
train state (`TrainState.reg`), checkpointed with it: a resumed run is bitwise the same.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from gdjax import losses
from gdjax.schedule import Schedule, add_noise

NONE, L2, EWC, MAS, SI = "none", "l2", "ewc", "mas", "si"
REGULARISERS = (NONE, L2, EWC, MAS, SI)
# Those whose importance is measured on the experience's data at its end.
DATA_IMPORTANCE = (EWC, MAS)
LABELS = {L2: "L2", EWC: "EWC", MAS: "MAS", SI: "SI"}
# CLoG's weights (utils/configs.py: L2_weight, ewc_weight, mas_weight / 2, si_weight), for
# strategy.regulariser_weight = 0.
DEFAULT_WEIGHTS = {L2: 500.0, EWC: 5e4, MAS: 2.5, SI: 5.0}


@dataclasses.dataclass(frozen=True)
class RegConfig:
    """Static (hashable) regulariser settings: strategy.regulariser* of configs/base.py."""

    name: str = NONE
    weight: float = 0.0  # 0: DEFAULT_WEIGHTS[name]
    batches: int = 0  # EWC / MAS: batches of the experience's data for the importance; 0: an epoch
    eps: float = 0.01  # SI's damping (CLoG's si_epsilon)

    def __post_init__(self):
        if self.name not in REGULARISERS:
            raise ValueError(f"strategy.regulariser={self.name!r} is unknown; use one of: "
                             f"{', '.join(REGULARISERS)}.")
        for name in ("weight", "eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value) and value >= 0):
                raise ValueError(f"strategy.regulariser_{name}={value!r} must be a finite "
                                 f"number >= 0.")
        if self.name == SI and self.eps <= 0:
            raise ValueError(f"strategy.regulariser_eps={self.eps!r} must be > 0 for SI (it "
                             f"divides by (change of a parameter)^2 + eps).")
        if not (isinstance(self.batches, int) and not isinstance(self.batches, bool)
                and self.batches >= 0):
            raise ValueError(f"strategy.regulariser_batches={self.batches!r} must be an "
                             f"integer >= 0 (0: one epoch of the experience's data).")

    @property
    def enabled(self) -> bool:
        return self.name != NONE

    @property
    def scale(self) -> float:
        """The weight the penalty is multiplied by: `weight`, or the method's default."""
        return float(self.weight or DEFAULT_WEIGHTS.get(self.name, 0.0))


def init(cfg: RegConfig, params) -> dict | None:
    """A fresh run's regulariser state (None without one): anchored at `params`, inactive
    until the first experience ends."""
    if not cfg.enabled:
        return None
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
    reg = {"anchor": jax.tree.map(jnp.copy, params), "active": jnp.float32(0.0)}
    if cfg.name != L2:
        reg["importance"] = zeros()
    if cfg.name == SI:
        reg["trajectory"] = zeros()
    return reg


def penalty(params, reg: dict) -> jnp.ndarray:
    """sum importance * (params - anchor)^2 (L2, with no importance: the sum over tensors
    of each one's mean squared distance); 0 while inactive."""
    anchors = jax.tree.leaves(reg["anchor"])
    importance = jax.tree.leaves(reg["importance"]) if "importance" in reg else [None] * len(
        anchors)
    total = jnp.float32(0.0)
    for p, a, w in zip(jax.tree.leaves(params), anchors, importance):
        d2 = (p.astype(jnp.float32) - a) ** 2
        total = total + (jnp.mean(d2) if w is None else jnp.sum(w * d2))
    return reg["active"] * total


def accumulate(cfg: RegConfig, reg: dict, grads, old, new) -> dict:
    """One step's share of SI's path integral (-grads * (new - old)); others unchanged."""
    if cfg.name != SI:
        return reg
    trajectory = jax.tree.map(lambda w, g, a, b: w - g * (b - a), reg["trajectory"], grads,
                              old, new)
    return {**reg, "trajectory": trajectory}


def consolidate(cfg: RegConfig, reg: dict, params, importance=None) -> dict:
    """The end of an experience: its importance added (EWC / MAS: `importance`, measured by
    `make_importance_fn`; SI: from the trajectory), the anchor moved to `params`, active."""
    out = {"anchor": jax.tree.map(jnp.copy, params), "active": jnp.float32(1.0)}
    if cfg.name in DATA_IMPORTANCE:
        out["importance"] = jax.tree.map(jnp.add, reg["importance"], importance)
    if cfg.name == SI:
        out["importance"] = jax.tree.map(
            lambda o, w, p, a: o + w / ((p - a) ** 2 + cfg.eps), reg["importance"],
            reg["trajectory"], params, reg["anchor"])
        out["trajectory"] = jax.tree.map(jnp.zeros_like, params)
    return out


def make_importance_fn(cfg: RegConfig, apply_fn: Callable, schedule: Schedule,
                       criterion: str = "mse") -> Callable:
    """Jitted `(params, batch, key) -> importance of one batch` of EWC (squared gradient of
    its diffusion loss) or MAS (absolute gradient of the mean squared output norm); the
    batch is the train step's {"image", "mask"}, `key` gives its noise and timesteps."""
    if cfg.name not in DATA_IMPORTANCE:
        raise ValueError(f"strategy.regulariser={cfg.name!r} measures no importance on data")

    def objective(params, batch, key):
        x0, mask = batch["image"], batch.get("mask")
        k_eps, k_t = jax.random.split(key)
        eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
        t = jax.random.randint(k_t, x0.shape[:1], 0, schedule.num_train_timesteps)
        pred = apply_fn(params, add_noise(schedule, x0, noise=eps, t=t), t)
        if cfg.name == EWC:
            return losses.criterion(criterion, pred, eps, t, schedule, mask)
        norms = jnp.sum(pred.astype(jnp.float32).reshape(pred.shape[0], -1) ** 2, axis=-1)
        if mask is None:
            return jnp.mean(norms)
        return jnp.sum(norms * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    def importance(params, batch, key):
        grads = jax.grad(objective)(params, batch, key)
        return jax.tree.map(jnp.square if cfg.name == EWC else jnp.abs, grads)

    return jax.jit(importance)


def mean_importance(importance_fn: Callable, params, batches, key, progress=None) -> Any:
    """The mean of `importance_fn` over `batches` (an iterable), batch i with `key` folded
    with i; `progress.update(1)` after each, when given."""
    total, n = None, 0
    for i, batch in enumerate(batches):
        value = importance_fn(params, batch, jax.random.fold_in(key, i))
        if progress is not None:
            progress.update(1)
        total = value if total is None else jax.tree.map(jnp.add, total, value)
        n += 1
    if total is None:
        raise ValueError("no batches to measure the regulariser's importance on")
    return jax.tree.map(lambda v: v / n, total)
