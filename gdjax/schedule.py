"""Noise schedules of the forward diffusion process, and `add_noise`.

A `Schedule` is a pytree of float32 arrays: it can be passed into jitted functions as an
ordinary argument. Construction happens on the host in numpy float32, mirroring the
PyTorch baseline's arithmetic (REFERENCE §1).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "cosine")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["betas", "alphas", "alphas_cumprod"], meta_fields=["clip_sample"])
@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per-timestep quantities, each a float32 array of shape [T]; and whether the DDIM
    sampler clips its x0 estimate to [-1, 1] (diffusers' `clip_sample`; the reference does).
    `clip_sample` is static: a jitted function traces once for each value."""

    betas: jnp.ndarray
    alphas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    clip_sample: bool = True

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])


def _linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float32)


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """The "squaredcos_cap_v2" schedule of Nichol & Dhariwal (2021), in float64 then float32."""

    def alpha_bar(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, dtype=np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. (2023), Algorithm 1: shift and scale sqrt(alpha_bar) so the last one is 0."""
    betas = np.asarray(betas, dtype=np.float32)
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas, dtype=np.float32))
    s0, s_last = sqrt_ab[0].copy(), sqrt_ab[-1].copy()
    sqrt_ab = (sqrt_ab - s_last) * (s0 / (s0 - s_last))
    alphas_bar = sqrt_ab**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1.0 - alphas).astype(np.float32)


# Timesteps are int32 on the device and every schedule array is held in memory; 1000 is usual.
MAX_TIMESTEPS = 100_000


def make_schedule(beta_schedule: str = "linear", *, clip_sample: bool = True,
                  **kwargs) -> Schedule:
    """Builds the schedule; the defaults are the reference's (linear, zero terminal SNR,
    x0 clipped in sampling)."""
    if not isinstance(clip_sample, (bool, np.bool_)):
        raise ValueError(f"diffusion.clip_sample={clip_sample!r} must be True or False.")
    arrays = (jnp.asarray(a) for a in schedule_arrays(beta_schedule, **kwargs))
    return Schedule(*arrays, clip_sample=bool(clip_sample))


def schedule_arrays(
        beta_schedule: str = "linear",
        *,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        rescale_zero_snr: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`make_schedule`'s (betas, alphas, alphas_cumprod) as float32 numpy arrays, checked
    and computed on the host: nothing is placed on a device or compiled."""
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(
            f"diffusion.beta_schedule={beta_schedule!r} is unknown; use one of {BETA_SCHEDULES}.")
    if not isinstance(num_train_timesteps, int) or not 2 <= num_train_timesteps <= MAX_TIMESTEPS:
        raise ValueError(
            f"diffusion.num_train_timesteps={num_train_timesteps!r} must be an integer in "
            f"2..{MAX_TIMESTEPS} (the paper's models use 1000).")
    if beta_schedule == "linear":
        if not 0.0 < beta_start < beta_end < 1.0:
            raise ValueError(
                f"diffusion.beta_start={beta_start}, beta_end={beta_end}: need 0 < start < end < 1.")
        betas = _linear_betas(num_train_timesteps, beta_start, beta_end)
    else:
        betas = _cosine_betas(num_train_timesteps)
    if rescale_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    alphas = (1.0 - betas).astype(np.float32)
    alphas_cumprod = np.cumprod(alphas, dtype=np.float32)
    return betas, alphas, alphas_cumprod


def _per_row(values: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """Reshapes a [B] vector so it broadcasts against a [B, ...] array of rank `ndim`."""
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def add_noise(schedule: Schedule, x0: jnp.ndarray, *, noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """Forward process q(x_t | x_0): sqrt(a_t) * x0 + sqrt(1 - a_t) * noise, t of shape [B]."""
    a_t = _per_row(schedule.alphas_cumprod[t], x0.ndim).astype(x0.dtype)
    return jnp.sqrt(a_t) * x0 + jnp.sqrt(1.0 - a_t) * noise
