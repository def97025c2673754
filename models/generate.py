"""Batched text generation: one jitted prefill, then a decode loop that runs inside one jit.

All shapes are static (prompts left-padded to a bucket, a preallocated `KVCache`), and the number
of new tokens is a traced loop bound, so a generation compiles the prefill and the decode loop once
per (batch size, padded prompt length, cache length, sampling mode), whatever the number of tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .llama import KVCache, Llama

_PROMPT_BUCKET = 16  # prompts are left-padded to a multiple of this, so lengths share compilations
_CACHE_BUCKET = 256  # the default cache length is rounded up to a multiple of this
_EOS_BUCKET = 4  # EOS id sets are padded to a multiple of this, so they share compilations too


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    tokens: list[list[int]]  # the new tokens of each prompt, up to and including its first EOS
    prefill_seconds: float
    decode_seconds: float
    compile_seconds: float  # lowering and compiling (near zero when the shapes were seen before)
    tokens_per_second: float  # decode loop throughput: batch size x decode steps / decode_seconds


@dataclasses.dataclass(frozen=True)
class _Sampling:
    """Static sampling mode; the temperature and top-p values themselves are traced."""

    greedy: bool
    nucleus: bool


def _sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array, mode: _Sampling) -> jax.Array:
    """Draws one token per row of logits [B, vocab]."""
    logits = logits.astype(jnp.float32)
    if mode.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if mode.nucleus:
        # Keep the most likely tokens whose cumulative probability first reaches top_p: a token
        # stays when the tokens more likely than it hold less than top_p (so the top one always does).
        descending = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(descending, axis=-1)
        kept = jnp.cumsum(probs, axis=-1) - probs < top_p
        cutoff = jnp.min(jnp.where(kept, descending, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 8), donate_argnames=("cache",))
def _prefill(graphdef, state, tokens, positions, cache, key, temperature, top_p, mode: _Sampling):
    """Runs the padded prompts and samples the first new token of each row."""
    model = nnx.merge(graphdef, state)
    logits, cache = model(tokens, positions, cache, last_token_only=True)
    key, sub = jax.random.split(key)
    return _sample(logits[:, -1], sub, temperature, top_p, mode), cache, key


# The cache is donated and returned so that the loop updates it in place instead of holding a
# second copy.
@functools.partial(jax.jit, static_argnums=(0, 10), donate_argnames=("cache",))
def _decode(graphdef, state, cache, first, positions, key, n_tokens, eos_ids, temperature, top_p, mode: _Sampling):
    """Generates up to n_tokens per row, `first` included, stopping early once every row is done.

    Returns the tokens [B, max_len] (column i holds new token i), how many were made, and the cache.
    """
    model = nnx.merge(graphdef, state)
    out = jnp.zeros((first.shape[0], cache.max_len), jnp.int32).at[:, 0].set(first)

    def keep_going(carry):
        i, *_, done = carry
        return (i < n_tokens) & ~jnp.all(done)

    def step(carry):
        i, cache, token, positions, key, out, done = carry
        logits, cache = model(token[:, None], positions[:, None], cache, last_token_only=True)
        key, sub = jax.random.split(key)
        token = _sample(logits[:, -1], sub, temperature, top_p, mode)
        out = out.at[:, i].set(token)
        return i + 1, cache, token, positions + 1, key, out, done | jnp.isin(token, eos_ids)

    carry = (jnp.int32(1), cache, first, positions, key, out, jnp.isin(first, eos_ids))
    n, cache, *_, out, _ = jax.lax.while_loop(keep_going, step, carry)
    return out, n, cache


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def generate(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | Sequence[int] | None = None,
    max_len: int | None = None,
) -> GenerationResult:
    """Continues each prompt (token ids) by up to `max_new_tokens` tokens.

    temperature 0 is greedy decoding; otherwise tokens are drawn from softmax(logits / temperature),
    restricted to the top-p nucleus when top_p < 1, with `jax.random.key(seed)`. A row stops at
    the first token in `eos_id` (none: it runs to max_new_tokens). `max_len` is the KV cache's
    length in slots; it must hold the padded prompts and the new tokens.
    """
    config = model.config
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and no empty prompt")
    if any(not 0 <= t < config.vocab_size for p in prompts for t in p):
        raise ValueError(f"prompt token ids must lie in [0, {config.vocab_size})")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")

    batch = len(prompts)
    prompt_lens = np.array([len(p) for p in prompts], np.int32)
    padded_len = _round_up(int(prompt_lens.max()), _PROMPT_BUCKET)
    # The prompt fills padded_len slots; each new token but the last is fed back into one more.
    needed = padded_len + max_new_tokens - 1
    if max_len is None:
        max_len = _round_up(needed, _CACHE_BUCKET)
    elif max_len < needed:
        raise ValueError(f"max_len {max_len} is too short: the padded prompts and new tokens need {needed} slots")

    # Left padding: every row's last prompt token sits in the last column, so one cache offset
    # serves the whole batch. Padding gets position -1, which attention never reads.
    tokens = np.zeros((batch, padded_len), np.int32)
    positions = np.full((batch, padded_len), -1, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, padded_len - len(prompt):] = prompt
        positions[row, padded_len - len(prompt):] = np.arange(len(prompt))

    eos = [] if eos_id is None else np.atleast_1d(eos_id).tolist()
    # Padded with -1 (never a token) to a fixed length, so that the EOS set shares compilations.
    eos_ids = np.full(_round_up(max(len(eos), 1), _EOS_BUCKET), -1, np.int32)
    eos_ids[: len(eos)] = eos
    mode = _Sampling(greedy=temperature == 0, nucleus=top_p < 1)
    graphdef, state = nnx.split(model)
    cache = KVCache.create(config, batch, max_len, model.dtype)
    key = jax.random.key(seed)
    sampling = (jnp.float32(temperature), jnp.float32(top_p))
    n_tokens = jnp.int32(max_new_tokens)

    start = time.perf_counter()
    prefill = _prefill.lower(graphdef, state, tokens, positions, cache, key, *sampling, mode).compile()
    first_spec = jax.ShapeDtypeStruct((batch,), jnp.int32)
    decode = _decode.lower(graphdef, state, cache, first_spec, prompt_lens, key, n_tokens, eos_ids, *sampling,
                           mode).compile()
    compile_seconds = time.perf_counter() - start

    start = time.perf_counter()
    first, cache, key = jax.block_until_ready(prefill(state, tokens, positions, cache, key, *sampling))
    prefill_seconds = time.perf_counter() - start

    start = time.perf_counter()
    out, n, _ = jax.block_until_ready(decode(state, cache, first, prompt_lens, key, n_tokens, eos_ids, *sampling))
    decode_seconds = time.perf_counter() - start

    n = int(n)
    new_tokens = []
    for row in np.asarray(out)[:, :n].tolist():
        ends = [i for i, t in enumerate(row) if t in eos]
        new_tokens.append(row[: ends[0] + 1] if ends else row)
    return GenerationResult(
        tokens=new_tokens,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        compile_seconds=compile_seconds,
        tokens_per_second=batch * (n - 1) / decode_seconds,
    )
