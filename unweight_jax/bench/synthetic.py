"""Weights drawn on the device to match trained statistics (DESIGN.md section 8): bf16 N(0, 0.02),
about 2.55 bits of exponent entropy (trained weights: about 2.6), generated one tensor at a time so
that host memory stays small whatever the model size."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

STD = 0.02  # transformers' LlamaConfig.initializer_range


@functools.partial(jax.jit, static_argnums=(1,))
def normal_bf16(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A bf16 array of `shape` drawn N(0, STD) on the device."""
    return (jax.random.normal(key, shape, jnp.float32) * STD).astype(jnp.bfloat16)
