"""One decode step of a whole Llama, as a server runs it: one new token per sequence, attention over
a KV cache already filled to `context`, the MLPs, the LM head and the greedy next token.

`steps` steps run in a `fori_loop` inside one jit, the cache position advancing by one each step;
every call starts again at `context` (slots past it are rewritten before they are read), so calls
can repeat for as long as timing needs. The cache is donated and handed from call to call, so it
exists once, and both models of a case share it: a model reads slots [0, context) and rewrites
its own slots past them, so each sees the same cache.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding, Sharding
from jax.sharding import PartitionSpec as P

from ..models.config import LlamaConfig
from ..models.llama import KVCache, Llama
from ..sharding import TP_AXIS

CACHE_DTYPE = jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    context: int


def cache_length(case: Case, steps: int) -> int:
    """Slots the cache of a case needs: the filled context and the tokens of one call."""
    return case.context + steps


def kv_cache_bytes(config: LlamaConfig, case: Case, steps: int) -> int:
    """Bytes of the case's `KVCache`: keys and values of every layer, and the slot positions."""
    slots = case.batch * cache_length(case, steps)
    return 2 * config.n_layers * slots * config.n_kv_heads * config.head_dim * jnp.dtype(CACHE_DTYPE).itemsize + 4 * slots + 4


def workspace_bytes(config: LlamaConfig, case: Case, steps: int, largest_weight_bytes: int) -> int:
    """A generous estimate of a step's temporaries beside the cache: fp32 logits, attention scores
    and MLP activations with room for a few copies, plus two bf16 copies of the largest matrix
    (a decode-then-dot pipeline materialises one)."""
    per_sequence = 8 * config.vocab_size + 12 * config.n_heads * cache_length(case, steps) + 12 * config.hidden_dim
    return case.batch * per_sequence + 2 * largest_weight_bytes


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a case's arrays live: on the default device (all None), or on a mesh with the keys and
    values split by KV head over "tp" where the heads divide (as the sharded projections split
    them), the rest replicated."""

    kv: Sharding | None = None
    replicated: Sharding | None = None

    @classmethod
    def on_mesh(cls, mesh: Mesh, config: LlamaConfig) -> Placement:
        heads = TP_AXIS if config.n_kv_heads % mesh.shape[TP_AXIS] == 0 else None
        return cls(NamedSharding(mesh, P(None, None, None, heads, None)), NamedSharding(mesh, P()))

    def cache(self) -> KVCache | None:
        """The cache's shardings, or None on one device."""
        if self.kv is None:
            return None
        return KVCache(k=self.kv, v=self.kv, positions=self.replicated, length=self.replicated)


def _fill(config: LlamaConfig, case: Case, steps: int, block: jax.Array) -> KVCache:
    max_len = cache_length(case, steps)
    shape = (config.n_layers, case.batch, max_len, config.n_kv_heads, config.head_dim)
    slots = jnp.arange(max_len, dtype=jnp.int32)
    return KVCache(
        k=jnp.broadcast_to(block, shape),
        v=jnp.broadcast_to(block[..., ::-1], shape),
        positions=jnp.broadcast_to(jnp.where(slots < case.context, slots, -1), (case.batch, max_len)),
        length=jnp.int32(case.context),
    )


def filled_cache(config: LlamaConfig, case: Case, steps: int, seed: int, placement: Placement) -> KVCache:
    """A cache holding `context` tokens: random keys and values (one [slots, kv_heads, head_dim]
    block, the same in every layer and sequence), built where it lives, without a host copy."""
    block = jax.random.normal(
        jax.random.key(seed), (cache_length(case, steps), config.n_kv_heads, config.head_dim), jnp.float32
    ).astype(CACHE_DTYPE)
    shardings = placement.cache()
    fill = jax.jit(functools.partial(_fill, config, case, steps), **({} if shardings is None else {"out_shardings": shardings}))
    return fill(block)


def cache_spec(config: LlamaConfig, case: Case, steps: int, placement: Placement) -> KVCache:
    """The cache's shapes and shardings, to compile a step before the cache exists."""
    max_len = cache_length(case, steps)
    shape = (config.n_layers, case.batch, max_len, config.n_kv_heads, config.head_dim)
    kv = jax.ShapeDtypeStruct(shape, CACHE_DTYPE, sharding=placement.kv)
    return KVCache(
        k=kv,
        v=kv,
        positions=jax.ShapeDtypeStruct((case.batch, max_len), jnp.int32, sharding=placement.replicated),
        length=jax.ShapeDtypeStruct((), jnp.int32, sharding=placement.replicated),
    )


def start_tokens(config: LlamaConfig, case: Case, seed: int, placement: Placement) -> jax.Array:
    """The token each sequence decodes from, drawn from the vocabulary."""
    tokens = jax.random.randint(jax.random.key(seed), (case.batch,), 0, config.vocab_size, jnp.int32)
    return tokens if placement.replicated is None else jax.device_put(tokens, placement.replicated)


def _decode_steps(graphdef, treedef, leaves: list[jax.Array], cache: KVCache, tokens: jax.Array, *, context: int, steps: int):
    """`steps` greedy decode steps from `tokens` [B] at position `context`; returns the cache and
    the tokens chosen [steps, B]. The model's state comes as a flat list of arrays (`state_leaves`)
    with its tree structure static: flattening the nnx state tree in Python on every call costs a
    few microseconds per array (3 ms a call for the 8B bf16 model, 6 ms for the compressed one with
    its five arrays per weight: benchmarks/results/call_overhead-h100-nnx-state), a cost of the
    calling convention, not of either model."""
    model: Llama = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    cache = dataclasses.replace(cache, length=jnp.int32(context))
    batch = tokens.shape[0]

    def step(i, carry):
        cache, token, chosen = carry
        positions = jnp.full((batch, 1), context, jnp.int32) + i
        logits, cache = model(token[:, None], positions, cache, last_token_only=True)
        token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        return cache, token, chosen.at[i].set(token)

    chosen = jnp.zeros((steps, batch), jnp.int32)
    cache, _, chosen = lax.fori_loop(0, steps, step, (cache, tokens, chosen))
    return cache, chosen


decode_steps = jax.jit(_decode_steps, static_argnums=(0, 1), static_argnames=("context", "steps"), donate_argnums=(3,))


def state_leaves(model: Llama) -> tuple[object, object, list[jax.Array]]:
    """The graph definition, state tree structure and state arrays of `model`, as `decode_steps`
    takes them."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    return graphdef, treedef, leaves


def lower_step(model: Llama, case: Case, steps: int, placement: Placement) -> jax.stages.Lowered:
    """The `steps`-step call of `model` for a case, lowered before its cache is allocated (tracing
    the model is where the library chooses each layer's plan)."""
    graphdef, treedef, leaves = state_leaves(model)
    tokens = jax.ShapeDtypeStruct((case.batch,), jnp.int32, sharding=placement.replicated)
    cache = cache_spec(model.config, case, steps, placement)
    return decode_steps.lower(graphdef, treedef, leaves, cache, tokens, context=case.context, steps=steps)


@dataclasses.dataclass
class StepTiming:
    ms: float  # median time of one step
    tokens: list[list[int]]  # the greedy tokens of the warm-up call, [steps][batch]


def time_steps(
    compiled: jax.stages.Compiled, model: Llama, cache: KVCache, tokens: jax.Array, *, steps: int, reps: int
) -> tuple[StepTiming, KVCache]:
    """One warm-up call, then the median of `reps` calls over `steps`; returns the cache to pass on."""
    _, _, leaves = state_leaves(model)
    cache, chosen = compiled(leaves, cache, tokens)
    warm_tokens = jax.device_get(chosen).tolist()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        cache, chosen = compiled(leaves, cache, tokens)
        jax.block_until_ready(chosen)
        times.append(time.perf_counter() - start)
    return StepTiming(statistics.median(times) * 1e3 / steps, warm_tokens), cache


def agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> float:
    """The fraction of (step, sequence) greedy tokens on which two runs agree."""
    pairs = [(x, y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b)]
    return sum(x == y for x, y in pairs) / len(pairs)
