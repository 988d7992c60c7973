"""The solver's own continual-learning baselines: EWC, SI and LwF, as avalanche computes them.

The authors ran these for the SimpleCNN alone, through avalanche 0.3.1 (their
configs/strategy/cnn_w_{ewc,si,lwf}.json: EWC lambda 1 in "separate" mode, SI lambda 1 with
eps 1e-7, LwF alpha 0, 0.5, 1.33333, 2.25, 3.2 per experience at temperature 2). Each is a
set of pure functions over parameter pytrees, called inside the solver's jitted step or at an
experience's end (gdjax/eval/solver.py); the state they keep is a pytree checkpointed with
the run.

- EWC ("separate"): after experience j, the params theta_j and their importance F_j, the
  mean over the experience's minibatches (in order, batch size B, the last one partial) of
  the squared gradient of that minibatch's mean cross-entropy, the model in eval mode
  (dropout off). While learning experience k the loss gains
  lambda * sum_{j<k} sum F_j * (theta - theta_j)^2 (no 1/2, as avalanche).
- SI: along an experience, the trajectory w += g * (theta_new - theta_old) at every step (g:
  the step's gradient of its whole loss, the penalty included); at its end
  cum += w / ((theta_end - theta_start)^2 + eps), omega = min(-cum, 0.001) (avalanche's
  fixed clip; cum is never reset) and the anchor becomes theta_end. The loss gains
  (lambda / 2) * sum omega * (theta - anchor)^2.
- LwF: from the second experience the loss gains alpha_k * KL(q || p) averaged over the
  rows, q = softmax(previous solver / T) and p = softmax(solver / T) over the classes seen
  before experience k only (avalanche's "active units"); no T^2 factor. An experience past
  the end of the alpha list takes its last value (avalanche would fail with IndexError).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

# avalanche's SI constants (update_ewc_data(..., clip_to=0.001, c=1)).
SI_CLIP = 1e-3


# ----------------------------------------------------------------------------- EWC

def ewc_init(params, num_experiences: int) -> dict:
    """Room for each experience's params and importance (stacked), none stored yet."""
    stack = lambda p: jnp.zeros((num_experiences,) + p.shape, p.dtype)  # noqa: E731
    return {"anchors": jax.tree.map(stack, params), "importance": jax.tree.map(stack, params),
            "count": jnp.zeros((), jnp.int32)}


def ewc_penalty(params, reg: dict) -> jnp.ndarray:
    """sum over the stored experiences j of sum F_j * (params - theta_j)^2."""
    used = jnp.arange(jax.tree.leaves(reg["anchors"])[0].shape[0]) < reg["count"]

    def leaf(p, anchors, importance):
        mask = used.reshape((-1,) + (1,) * p.ndim).astype(p.dtype)
        return jnp.sum(mask * importance * (p[None] - anchors) ** 2)

    return sum(jax.tree.leaves(jax.tree.map(leaf, params, reg["anchors"], reg["importance"])))


def ewc_store(reg: dict, params, importance, experience) -> dict:
    """`reg` with experience j's params and importance stored (slot j, count j + 1)."""
    put = lambda stack, value: stack.at[experience].set(value)  # noqa: E731
    return {"anchors": jax.tree.map(put, reg["anchors"], params),
            "importance": jax.tree.map(put, reg["importance"], importance),
            "count": jnp.asarray(experience + 1, jnp.int32)}


# ----------------------------------------------------------------------------- SI

def si_init(params) -> dict:
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
    return {"anchor": jax.tree.map(jnp.copy, params), "omega": zeros(), "trajectory": zeros(),
            "cum": zeros()}


def si_penalty(params, reg: dict) -> jnp.ndarray:
    """sum omega * (params - anchor)^2 (the loss takes lambda / 2 of it)."""
    return sum(jnp.sum(o * (p - a) ** 2) for p, a, o in zip(
        jax.tree.leaves(params), jax.tree.leaves(reg["anchor"]), jax.tree.leaves(reg["omega"])))


def si_accumulate(reg: dict, grads, old, new) -> dict:
    """One step's path integral: trajectory += grads * (new - old)."""
    trajectory = jax.tree.map(lambda w, g, a, b: w + g * (b - a), reg["trajectory"], grads,
                              old, new)
    return {**reg, "trajectory": trajectory}


def si_consolidate(reg: dict, params, eps: float) -> dict:
    """The end of an experience: cum += trajectory / ((params - anchor)^2 + eps), omega =
    min(-cum, SI_CLIP), the anchor moved to `params`, the trajectory reset."""
    cum = jax.tree.map(lambda c, w, p, a: c + w / ((p - a) ** 2 + eps), reg["cum"],
                       reg["trajectory"], params, reg["anchor"])
    return {"anchor": jax.tree.map(jnp.copy, params),
            "omega": jax.tree.map(lambda c: jnp.minimum(-c, SI_CLIP), cum),
            "trajectory": jax.tree.map(jnp.zeros_like, params), "cum": cum}


# ----------------------------------------------------------------------------- LwF

def lwf_loss(logits, teacher_logits, active, temperature: float, mask=None) -> jnp.ndarray:
    """KL(softmax(teacher / T) || softmax(student / T)) over the `active` classes ([C] of 0/1),
    summed over classes, averaged over the rows (those with `mask` 1, when given)."""
    # The other classes drop out of both softmaxes (finite, so that no class active, as in
    # the first experience, gives 0 rather than NaN, gradients included).
    hidden = jnp.where(active > 0, 0.0, -1e30)
    log_p = jax.nn.log_softmax(logits / temperature + hidden, axis=-1)
    log_q = jax.nn.log_softmax(teacher_logits / temperature + hidden, axis=-1)
    q = jnp.exp(log_q)
    rows = jnp.sum(jnp.where(active > 0, q * (log_q - log_p), 0.0), axis=-1)
    if mask is None:
        return jnp.mean(rows)
    return jnp.sum(rows * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def lwf_alpha(alphas: tuple, experience) -> jnp.ndarray:
    """alpha of `experience` (traced): its entry of `alphas`, the last one past the end."""
    table = jnp.asarray(alphas, jnp.float32)
    return table[jnp.minimum(experience, len(alphas) - 1)]


def init(strategy: str, params, num_experiences: int) -> Any:
    """The regulariser state of a solver `strategy` (None for those without one)."""
    if strategy == "ewc":
        return ewc_init(params, num_experiences)
    if strategy == "si":
        return si_init(params)
    return None
