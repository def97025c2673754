"""The collective time inside a tensor-parallel decode step, measured apart: a jitted chain of the
all-reduces the step makes (one fp32 [batch, dim] psum over "tp" after every row-parallel
projection, o_proj and down_proj of each layer), timed as the step is."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..models.config import LlamaConfig
from ..sharding import TP_AXIS, shard_map
from .timing import wall_ms

ROW_PARALLEL_PER_LAYER = 2  # o_proj and down_proj


def allreduce_ms(mesh: Mesh, config: LlamaConfig, batch: int, *, steps: int, reps: int) -> float:
    """Median time, per decode step, of the step's all-reduces alone."""
    tp = mesh.shape[TP_AXIS]
    count = ROW_PARALLEL_PER_LAYER * config.n_layers

    def chain(x: jax.Array) -> jax.Array:
        def step(_, h):
            for _ in range(count):  # each sum feeds the next, so none can be merged or skipped
                h = lax.psum(h, TP_AXIS) * (1.0 / tp)
            return h

        return lax.fori_loop(0, steps, step, x)

    run = jax.jit(shard_map(chain, mesh=mesh, in_specs=P(TP_AXIS), out_specs=P(TP_AXIS), check_vma=False))
    x = jax.device_put(jnp.ones((tp * batch, config.dim), jnp.float32), NamedSharding(mesh, P(TP_AXIS)))
    return wall_ms(run, x, reps=reps) / steps
