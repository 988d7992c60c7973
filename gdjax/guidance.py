"""Classifier-free guidance for a class-conditional denoiser (unet.UNetConfig.num_class_embeds).

`guided_denoise(apply_fn, params, labels, null_label, scale)` is a `denoise_fn(x, t)` for
`ddim.reverse_process`: one forward of the 2B rows [x; x] with labels [labels; null_label],
then eps = eps_null + scale * (eps_label - eps_null). Scale 1 is the conditional prediction
alone, 0 the unconditional (null-label) one, above 1 guidance (Ho & Salimans, 2022). The
null label is one of the embedding's own labels, trained by dropping the real label to it.
Scale 1 skips the null rows altogether, so it costs one forward, not two.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp


def guided_denoise(apply_fn: Callable, params, labels, null_label: int,
                   scale: float) -> Callable:
    """denoise_fn(x, t) of `apply_fn(params, x, t, labels)` guided at `scale` (a float)."""
    labels = jnp.asarray(labels, jnp.int32)
    if float(scale) == 1.0:
        return lambda x, t: apply_fn(params, x, t, jnp.broadcast_to(labels, (x.shape[0],)))

    def denoise(x, t):
        b = x.shape[0]
        rows = jnp.concatenate([jnp.broadcast_to(labels, (b,)),
                                jnp.full((b,), null_label, jnp.int32)])
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        eps = apply_fn(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), rows)
        cond, uncond = eps[:b], eps[b:]
        return uncond + scale * (cond - uncond)

    return denoise
