"""Regression criteria on eps, and the weighting of the data and replay losses (REFERENCE §4)."""

from __future__ import annotations

import jax.numpy as jnp

from gdjax.schedule import Schedule

CRITERIA = ("mse", "smooth_l1", "min_snr", "min_snr_reference")
MIN_SNR_GAMMA = 5.0


def _per_row_mean(x: jnp.ndarray) -> jnp.ndarray:
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def min_snr_weights(schedule: Schedule, t: jnp.ndarray, gamma: float = MIN_SNR_GAMMA) -> jnp.ndarray:
    """min(SNR, gamma) / SNR per row; 1 where SNR = 0 (t = T-1 under zero terminal SNR)."""
    a = schedule.alphas_cumprod[t]
    snr = a / (1.0 - a)
    return jnp.where(snr > 0, jnp.minimum(snr, gamma) / jnp.where(snr > 0, snr, 1.0), 1.0)


def _masked_mean(rows: jnp.ndarray, mask: jnp.ndarray | None) -> jnp.ndarray:
    """The mean of per-row values over the rows whose mask is 1 (all rows without a mask)."""
    if mask is None:
        return jnp.mean(rows)
    mask = mask.astype(jnp.float32)
    return jnp.sum(rows * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def replay_mask(mask, rows: int):
    """[rows] mask of the replay rows of a batch whose real rows are `mask` [B] (a prefix):
    the replay half follows the batch's size, its first ceil(rows * real / B) rows count
    (all `rows` for a full batch; `real` of them when rows == B). None without a mask."""
    if mask is None:
        return None
    keep = jnp.ceil(rows * jnp.sum(mask) / mask.shape[0])
    return (jnp.arange(rows) < keep).astype(jnp.float32)


def criterion(name: str, pred: jnp.ndarray, target: jnp.ndarray, t: jnp.ndarray,
              schedule: Schedule, mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """Scalar loss of `pred` against `target` (rows [B, ...]) under criterion `name`.

    `mask` [B] (1 real, 0 padding; None: every row) restricts the means to the real rows:
    the short last batch of an epoch is padded to the batch size (gdjax/data/pipeline.py).
    Each row's elementwise mean is taken first, then the mean over the real rows, which for
    rows of equal size is the elementwise mean over them.

    "min_snr" weights each row's MSE by min(SNR, 5) / SNR (Hang et al. 2023). The baseline
    multiplies the batch-mean MSE by the mean weight instead; "min_snr_reference" does that.
    """
    diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
    if name == "mse":
        return _masked_mean(_per_row_mean(diff**2), mask)
    if name == "smooth_l1":  # Huber with beta 1, as torch's smooth_l1_loss
        a = jnp.abs(diff)
        return _masked_mean(_per_row_mean(jnp.where(a < 1.0, 0.5 * diff**2, a - 0.5)), mask)
    if name == "min_snr":
        return _masked_mean(min_snr_weights(schedule, t) * _per_row_mean(diff**2), mask)
    if name == "min_snr_reference":
        return (_masked_mean(min_snr_weights(schedule, t), mask)
                * _masked_mean(_per_row_mean(diff**2), mask))
    raise ValueError(f"train.criterion={name!r} is unknown; use one of {CRITERIA}.")


def replay_weights(experience: jnp.ndarray, weight_replay_loss: bool):
    """(data weight, replay weight): 1/(k+1) and 1 - 1/(k+1) for experience k, else (1, 1)."""
    if not weight_replay_loss:
        return jnp.float32(1.0), jnp.float32(1.0)
    w = 1.0 / (experience.astype(jnp.float32) + 1.0)
    return w, 1.0 - w


def combine(data_loss, replay_loss, *, experience, lambd: float, weight_replay_loss: bool):
    """The loss the student minimises: w_data * data + w_replay * lambda * replay."""
    w_data, w_replay = replay_weights(experience, weight_replay_loss)
    return w_data * data_loss + w_replay * lambd * replay_loss
