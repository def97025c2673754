"""stories260K, a real trained llama2.c model: the JAX model against a plain numpy forward pass
written here from llama2.c's `run.c` (its own file reader, its own adjacent-pair RoPE, fp32)."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from models_testing import stories_path
from unweight_jax.models.generate import generate
from unweight_jax.models.loading import iter_llama2c_tensors, load_llama2c, read_llama2c_config

N_TOKENS = 256
BOS = 1


class Llama2c:
    """run.c's `forward`, one token at a time, in numpy fp32."""

    def __init__(self, path, weight_dtype=np.float32):
        raw = path.read_bytes()
        self.dim, self.hidden, self.n_layers, self.n_heads, self.n_kv_heads, vocab, self.seq_len = (
            int(v) for v in np.frombuffer(raw[:28], np.int32))
        assert vocab > 0, "stories260K shares its classifier with the embedding"
        self.vocab, self.head_size = vocab, self.dim // self.n_heads
        kv_dim, L = self.n_kv_heads * self.head_size, self.n_layers
        floats = np.frombuffer(raw[28:], np.float32)
        offset = 0

        def take(*shape):
            nonlocal offset
            n = int(np.prod(shape))
            # Weights pass through `weight_dtype` (bf16 for the bf16 model), computation stays fp32.
            w = floats[offset : offset + n].reshape(shape).astype(weight_dtype).astype(np.float32)
            offset += n
            return w

        self.emb = take(vocab, self.dim)
        self.rms_att = take(L, self.dim)
        self.wq, self.wk = take(L, self.dim, self.dim), take(L, kv_dim, self.dim)
        self.wv, self.wo = take(L, kv_dim, self.dim), take(L, self.dim, self.dim)
        self.rms_ffn = take(L, self.dim)
        self.w1 = take(L, self.hidden, self.dim)  # gate
        self.w2 = take(L, self.dim, self.hidden)  # down
        self.w3 = take(L, self.hidden, self.dim)  # up
        self.rms_final = take(self.dim)
        offset += self.seq_len * self.head_size  # freq_cis_real and freq_cis_imag
        assert offset == floats.size
        self.key_cache = np.zeros((L, self.seq_len, kv_dim), np.float32)
        self.value_cache = np.zeros((L, self.seq_len, kv_dim), np.float32)

    @staticmethod
    def rmsnorm(x, weight):
        return weight * (x / np.sqrt(np.mean(x * x) + np.float32(1e-5)))

    def rope(self, vec, pos):
        """Rotates each adjacent pair (i, i + 1) by pos * 10000^(-(i % head_size) / head_size)."""
        i = np.arange(0, vec.size, 2)
        angle = pos * (1.0 / 10000.0 ** ((i % self.head_size) / self.head_size)).astype(np.float32)
        cos, sin = np.cos(angle), np.sin(angle)
        v0, v1 = vec[0::2].copy(), vec[1::2].copy()
        vec[0::2], vec[1::2] = v0 * cos - v1 * sin, v0 * sin + v1 * cos

    def forward(self, token, pos):
        x = self.emb[token].copy()
        hs, kv_mul = self.head_size, self.n_heads // self.n_kv_heads
        for l in range(self.n_layers):
            xb = self.rmsnorm(x, self.rms_att[l])
            q, k, v = self.wq[l] @ xb, self.wk[l] @ xb, self.wv[l] @ xb
            self.rope(q, pos)
            self.rope(k, pos)
            self.key_cache[l, pos], self.value_cache[l, pos] = k, v
            # Head h reads key/value head h // kv_mul.
            keys = np.repeat(self.key_cache[l, : pos + 1].reshape(pos + 1, self.n_kv_heads, hs), kv_mul, axis=1)
            values = np.repeat(self.value_cache[l, : pos + 1].reshape(pos + 1, self.n_kv_heads, hs), kv_mul, axis=1)
            scores = np.einsum("hd,thd->ht", q.reshape(self.n_heads, hs), keys) / np.sqrt(np.float32(hs))
            weights = np.exp(scores - scores.max(axis=1, keepdims=True))
            weights /= weights.sum(axis=1, keepdims=True)
            att_out = np.einsum("ht,thd->hd", weights, values).reshape(self.dim)
            x = x + self.wo[l] @ att_out
            xb = self.rmsnorm(x, self.rms_ffn[l])
            gate = self.w1[l] @ xb
            x = x + self.w2[l] @ (gate / (1 + np.exp(-gate)) * (self.w3[l] @ xb))
        return self.emb @ self.rmsnorm(x, self.rms_final)

    def greedy(self, n):
        token, out = BOS, []
        for pos in range(n):
            token = int(np.argmax(self.forward(token, pos)))
            out.append(token)
        return out


@pytest.fixture(scope="module")
def path():
    return stories_path()


def test_header_and_tensors(path):
    config = read_llama2c_config(path)
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.vocab_size, config.hidden_dim) == (
        64, 5, 8, 4, 512, 172)
    assert config.tie_embeddings and config.head_dim == 8 and config.max_seq_len == 512
    tensors = dict(iter_llama2c_tensors(path))
    assert len(tensors) == 2 + 9 * 5  # embedding, final norm, 9 per layer; no lm_head (shared)
    reference = Llama2c(path)
    np.testing.assert_array_equal(tensors["model.layers.4.mlp.gate_proj.weight"], reference.w1[4])
    np.testing.assert_array_equal(tensors["model.layers.4.mlp.down_proj.weight"], reference.w2[4])
    np.testing.assert_array_equal(tensors["model.layers.4.mlp.up_proj.weight"], reference.w3[4])
    np.testing.assert_array_equal(tensors["model.layers.2.self_attn.v_proj.weight"], reference.wv[2])
    # q and k rows are permuted to the halves RoPE convention, the same rows as a set.
    q, q_ref = tensors["model.layers.0.self_attn.q_proj.weight"], reference.wq[0]
    assert not np.array_equal(q, q_ref)
    np.testing.assert_array_equal(q[:4], q_ref[0:8:2])  # head 0, first halves = even rows
    np.testing.assert_array_equal(q[4:8], q_ref[1:8:2])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_story_matches_llama2c_reference(path, dtype):
    """The 256-token greedy continuation of BOS equals the numpy reference's, token for token.

    bf16: both sides use the bf16-rounded weights and compute in fp32; this bf16 model is the
    one compressed runs are compared with.
    """
    weight_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
    expected = Llama2c(path, weight_dtype).greedy(N_TOKENS)
    model = load_llama2c(path, param_dtype=jnp.dtype(dtype))
    result = generate(model, [[BOS]], N_TOKENS)
    assert result.tokens[0] == expected
