"""gdjax: continual learning of diffusion models with generative distillation, in JAX.

Conventions used across the package: images are NHWC float32 arrays in [-1, 1];
timesteps are int32 arrays of shape [B]; randomness comes from `jax.random.key` keys.
"""

__version__ = "0.1.0"
