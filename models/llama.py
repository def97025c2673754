"""The Llama decoder in Flax NNX.

Module attribute names mirror the Hugging Face parameter names (`layers/3/self_attn/q_proj` holds
`model.layers.3.self_attn.q_proj.weight`), and every projection is a `Linear` holding its weight in
the checkpoint's own `[out_features, in_features]` layout. A compressed layer replaces a `Linear`
by name, keeping its `__call__(x)` contract, so the model code never changes with the weight format.

RoPE follows the Hugging Face convention (rotating the two halves of each head); llama2.c
checkpoints, which rotate adjacent pairs, are converted at load time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from ..pipelines import dense
from .config import LlamaConfig

DType = Any  # a jnp/numpy dtype or scalar type, e.g. jnp.bfloat16

_init = nnx.initializers.normal(0.02)  # transformers' LlamaConfig.initializer_range


def _matmul_t(x: jax.Array, weight: jax.Array, dtype: DType) -> jax.Array:
    """x @ weight.T for weight [out, in], accumulated in fp32 and returned in `dtype`: the same
    product (`pipelines.dense`) that a compressed layer's `full` pipeline runs, so the two agree
    bit for bit."""
    return dense(x.astype(dtype), weight)


class Linear(nnx.Module):
    """A bias-free projection whose `weight` is stored [out_features, in_features]."""

    def __init__(self, in_features: int, out_features: int, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.weight = nnx.Param(_init(rngs.params(), (out_features, in_features), param_dtype))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return _matmul_t(x, self.weight[...], self.dtype)


class Embedding(nnx.Module):
    """Token embedding, `weight` [vocab_size, dim]; `attend` is the tied LM head."""

    def __init__(self, vocab_size: int, dim: int, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.weight = nnx.Param(_init(rngs.params(), (vocab_size, dim), param_dtype))
        self.dtype = dtype

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return _matmul_t(x, self.weight[...], self.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype: DType, param_dtype: DType):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        # As transformers does: normalise in fp32, cast, then scale.
        x32 = x.astype(jnp.float32)
        normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.dtype) * self.weight[...].astype(self.dtype)


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
    """Inverse rotary frequencies [head_dim // 2], with Llama-3 scaling when configured.

    Llama-3 scaling divides low frequencies (wavelength above original_context / low_freq_factor)
    by `factor`, keeps high ones (wavelength below original_context / high_freq_factor), and blends
    linearly in between; this is transformers' `_compute_llama3_parameters`.
    """
    hd = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    s = config.rope_scaling
    if s is not None:
        context = s.original_max_position_embeddings
        wavelen = 2 * np.pi / inv_freq
        smooth = (context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
        inv_freq = np.where(
            wavelen > context / s.low_freq_factor,
            inv_freq / s.factor,
            np.where(wavelen < context / s.high_freq_factor, inv_freq, blended),
        )
    return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [B, T, heads, head_dim] by the angles of cos/sin [B, T, head_dim // 2].

    Dimension i pairs with i + head_dim // 2 (transformers' `rotate_half`).
    """
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Preallocated keys and values of every layer; static shapes, so decoding never re-traces.

    A call writes its T tokens to slots [length, length + T) of every row (one offset for the whole
    batch: rows of different lengths are left-padded), and records each slot's token position.
    Attention reads a slot when its position is >= 0 and <= the query's, so padding (position -1)
    and empty slots are never attended; positions must therefore grow from call to call. The
    caller keeps length + T <= max_len: past that, `lax.dynamic_update_slice` would clamp the
    offset and overwrite the last slots.
    """

    k: jax.Array  # [n_layers, batch, max_len, n_kv_heads, head_dim], keys after RoPE
    v: jax.Array  # [n_layers, batch, max_len, n_kv_heads, head_dim]
    positions: jax.Array  # [batch, max_len] int32; -1 for empty slots and padding
    length: jax.Array  # int32 scalar: slots written so far

    @classmethod
    def create(cls, config: LlamaConfig, batch: int, max_len: int, dtype: DType = jnp.float32) -> KVCache:
        shape = (config.n_layers, batch, max_len, config.n_kv_heads, config.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            positions=jnp.full((batch, max_len), -1, jnp.int32),
            length=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def write(self, layer: int, k: jax.Array, v: jax.Array) -> KVCache:
        """Stores one layer's new k, v [B, T, n_kv_heads, head_dim] at slots [length, length + T)."""
        start = (layer, 0, self.length, 0, 0)
        return dataclasses.replace(
            self,
            k=lax.dynamic_update_slice(self.k, k[None].astype(self.k.dtype), start),
            v=lax.dynamic_update_slice(self.v, v[None].astype(self.v.dtype), start),
        )


class Attention(nnx.Module):
    """Grouped-query attention: query head h reads key/value head h // (n_heads // n_kv_heads)."""

    def __init__(self, config: LlamaConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hd = config.head_dim
        self.q_proj = Linear(config.dim, config.n_heads * hd, **kw)
        self.k_proj = Linear(config.dim, config.n_kv_heads * hd, **kw)
        self.v_proj = Linear(config.dim, config.n_kv_heads * hd, **kw)
        self.o_proj = Linear(config.n_heads * hd, config.dim, **kw)
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = hd
        self.dtype = dtype

    def __call__(
        self,
        x: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        mask: jax.Array,
        cache: KVCache | None,
        layer: int,
    ) -> tuple[jax.Array, KVCache | None]:
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).reshape(B, T, self.n_heads, self.head_dim), *rope)
        k = apply_rope(self.k_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim), *rope)
        v = self.v_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim)
        if cache is not None:
            cache = cache.write(layer, k, v)
            k, v = cache.k[layer], cache.v[layer]

        q = q.reshape(B, T, self.n_kv_heads, self.n_heads // self.n_kv_heads, self.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores * self.head_dim**-0.5
        # A finite floor rather than -inf: a padding query that sees no slot gets a uniform
        # (ignored) distribution instead of NaN.
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
        return self.o_proj(out.reshape(B, T, -1).astype(self.dtype)), cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(config.dim, config.hidden_dim, **kw)
        self.up_proj = Linear(config.dim, config.hidden_dim, **kw)
        self.down_proj = Linear(config.hidden_dim, config.dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        norm_kw = dict(eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(config.dim, **norm_kw)
        self.self_attn = Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.dim, **norm_kw)
        self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        mask: jax.Array,
        cache: KVCache | None,
        layer: int,
    ) -> tuple[jax.Array, KVCache | None]:
        attn, cache = self.self_attn(self.input_layernorm(x), rope, mask, cache, layer)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class Llama(nnx.Module):
    """Llama causal language model.

    `param_dtype` is the dtype weights are stored in; `dtype` the activations' (matmuls always
    accumulate in fp32). With `config.tie_embeddings` there is no `lm_head`: the logits come from
    the embedding matrix.
    """

    def __init__(
        self,
        config: LlamaConfig,
        *,
        param_dtype: DType = jnp.float32,
        dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = config
        self.dtype = dtype
        self.embed_tokens = Embedding(config.vocab_size, config.dim, **kw)
        self.layers = nnx.List([DecoderLayer(config, **kw) for _ in range(config.n_layers)])
        self.norm = RMSNorm(config.dim, eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.lm_head = None if config.tie_embeddings else Linear(config.dim, config.vocab_size, **kw)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: KVCache | None = None,
        *,
        last_token_only: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """Runs tokens [B, T] at positions [B, T] (-1 marks padding, which nothing attends to).

        A token attends to the tokens of its row at positions up to its own: among the T given
        without a cache; with one, also to those it holds, and the T are appended to it (the
        updated cache is returned). Returns logits
        [B, T, vocab_size] in `dtype`, or [B, 1, vocab_size] for the last token only (what decoding
        needs; rows must then be left-padded).
        """
        positions = positions.astype(jnp.int32)
        angles = positions[..., None].astype(jnp.float32) * rope_frequencies(self.config)
        rope = (jnp.cos(angles), jnp.sin(angles))
        if cache is None:
            key_positions = positions
        else:
            key_positions = lax.dynamic_update_slice(cache.positions, positions, (0, cache.length))
        mask = (key_positions[:, None, :] >= 0) & (key_positions[:, None, :] <= positions[:, :, None])

        h = self.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            h, cache = layer(h, rope, mask, cache, i)
        if last_token_only:
            h = h[:, -1:]
        h = self.norm(h)
        logits = self.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)

        if cache is not None:
            cache = dataclasses.replace(cache, positions=key_positions, length=cache.length + tokens.shape[1])
        return logits, cache
