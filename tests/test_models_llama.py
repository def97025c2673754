"""The JAX Llama against transformers' PyTorch `LlamaForCausalLM` on small random checkpoints,
and the loaders' refusals."""

from __future__ import annotations

import json
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from models_testing import save_hf_llama
from unweight_jax.models.config import LlamaConfig
from unweight_jax.models.llama import KVCache, rope_frequencies
from unweight_jax.models.loading import (
    iter_hf_tensors,
    iter_llama2c_tensors,
    load_hf,
    load_llama2c,
    model_template,
    populate,
    read_llama2c_config,
)

torch = pytest.importorskip("torch")

# fp32 on both sides: the logits agree to float rounding, measured at most 8.3e-7 of the largest
# logit. The bound leaves 12x of room, far below what one wrong weight or RoPE pair would cost.
RTOL_OF_SCALE = 1e-5

LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)

CONFIGS = {
    # GQA (3 query heads per KV head); head_dim given and unequal to hidden_size / heads (q is 96
    # wide, the model 48); an intermediate size that is no multiple of anything; another RMSNorm
    # epsilon and RoPE base; 10 safetensors shards with an index.
    "gqa-sharded": dict(vocab_size=96, hidden_size=48, intermediate_size=172, num_hidden_layers=2,
                        num_attention_heads=6, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                        rope_theta=500000.0, max_shard_size="20KB"),
    # Tied embeddings, multi-query attention and Llama-3 RoPE scaling; with head_dim 16 and an
    # original context of 16 positions, the frequencies fall in all three bands (kept, blended,
    # divided by the factor).
    "tied-mqa-llama3": dict(vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                            rope_theta=10000.0, max_position_embeddings=256, rope_scaling=LLAMA3_ROPE),
}

T = 40  # sequence length of the comparisons


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    """(directory, transformers model, vocab size) for each config."""
    config = dict(CONFIGS[request.param])
    max_shard_size = config.pop("max_shard_size", None)
    path = tmp_path_factory.mktemp(request.param)
    hf = save_hf_llama(path, seed=list(CONFIGS).index(request.param), max_shard_size=max_shard_size, **config)
    return path, hf, config["vocab_size"]


@nnx.jit(static_argnames="last_token_only")
def _forward(model, tokens, positions, cache=None, last_token_only=False):
    """The model under jit: op-by-op dispatch would dominate these tests' time."""
    return model(jnp.asarray(tokens), jnp.asarray(positions), cache, last_token_only=last_token_only)


def _hf_logits(hf, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(tokens)).logits.numpy()


def _assert_close(ours, ref: np.ndarray) -> None:
    err = np.abs(np.asarray(ours, np.float32) - ref).max()
    assert err <= RTOL_OF_SCALE * np.abs(ref).max(), f"max |diff| {err} vs logit scale {np.abs(ref).max()}"


PAD = 5  # row 1 of every batch is left-padded by this much: padding must change nothing


def _batch(vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two random sequences of T tokens, and the model's input: row 0 is the first sequence,
    row 1 the second's first T - PAD tokens after PAD padding slots (position -1)."""
    sequences = np.random.default_rng(seed).integers(0, vocab, (2, T))
    tokens = sequences.copy()
    tokens[1] = np.concatenate([np.zeros(PAD, np.int64), sequences[1, : T - PAD]])
    positions = np.stack([np.arange(T), np.concatenate([np.full(PAD, -1), np.arange(T - PAD)])])
    return sequences, tokens, positions


def _assert_rows_close(logits, ref: np.ndarray, columns: slice = slice(None)) -> None:
    """Compares the model's logits [2, T', vocab] over `columns` of the padded batch with the
    reference logits [2, T, vocab] of the unpadded sequences."""
    col = np.arange(T)[columns]
    _assert_close(np.asarray(logits)[0], ref[0, col])
    real = col >= PAD
    _assert_close(np.asarray(logits)[1, real], ref[1, col[real] - PAD])


def test_full_sequence_logits_match_transformers(checkpoint):
    path, hf, vocab = checkpoint
    sequences, tokens, positions = _batch(vocab, seed=0)
    model = load_hf(path, param_dtype=jnp.float32)
    logits, cache = _forward(model, tokens, positions)
    assert cache is None
    _assert_rows_close(logits, _hf_logits(hf, sequences))


def test_prefill_then_decode_matches_transformers(checkpoint):
    path, hf, vocab = checkpoint
    sequences, tokens, positions = _batch(vocab, seed=1)
    ref = _hf_logits(hf, sequences)
    model = load_hf(path, param_dtype=jnp.float32)
    prefill = 13
    cache = KVCache.create(model.config, batch=2, max_len=64)
    logits, cache = _forward(model, tokens[:, :prefill], positions[:, :prefill], cache)
    _assert_rows_close(logits, ref, slice(0, prefill))
    for t in range(prefill, T):
        logits, cache = _forward(model, tokens[:, t : t + 1], positions[:, t : t + 1], cache, last_token_only=True)
        _assert_rows_close(logits, ref, slice(t, t + 1))
    assert int(cache.length) == T


def test_llama3_rope_frequencies_match_transformers():
    """At Llama-3.1-8B's settings (head_dim 128, theta 500000, factor 8, original context 8192)."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    hf_config = HFLlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
                              max_position_embeddings=131072, rope_scaling=scaling)
    expected, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    assert attention_factor == 1.0
    ours = rope_frequencies(LlamaConfig.from_hf(hf_config.to_dict()))
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6)
    unscaled = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    kept, divided = np.isclose(ours, unscaled, rtol=1e-6), np.isclose(ours, unscaled / 8, rtol=1e-6)
    assert kept.sum() > 10 and divided.sum() > 10 and (~kept & ~divided).sum() > 3  # all three bands


def test_bf16_params_are_the_rounded_checkpoint(tmp_path):
    """fp32 weights loaded as bf16 are rounded to nearest even, like ml_dtypes (and torch)."""
    save_hf_llama(tmp_path, **CONFIGS["tied-mqa-llama3"])
    model = load_hf(tmp_path, param_dtype=jnp.bfloat16)
    fp32 = dict(iter_hf_tensors(tmp_path))
    name = "model.layers.1.self_attn.o_proj.weight"
    ours = np.asarray(model.layers[1].self_attn.o_proj.weight[...])
    assert ours.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(ours.view(np.uint16), fp32[name].astype(ml_dtypes.bfloat16).view(np.uint16))


def test_bf16_checkpoint_loads_bit_exact(tmp_path):
    """A bf16 checkpoint (what real Llamas ship) is read through safetensors' numpy framework."""
    hf = save_hf_llama(tmp_path, dtype=torch.bfloat16, **CONFIGS["gqa-sharded"] | {"max_shard_size": None})
    model = load_hf(tmp_path, param_dtype=jnp.bfloat16)
    expected = hf.model.layers[0].mlp.down_proj.weight.view(torch.int16).numpy()
    np.testing.assert_array_equal(np.asarray(model.layers[0].mlp.down_proj.weight[...]).view(np.int16), expected)


def test_populate_takes_weight_objects_as_they_are(tmp_path):
    """The bundle loader's hook: a weight that comes as an `nnx.Variable` (a compressed weight)
    replaces the parameter, after the same shape check as an array."""

    class StandIn(nnx.Variable):
        pass

    save_hf_llama(tmp_path, **CONFIGS["tied-mqa-llama3"])
    name = "model.layers.0.mlp.down_proj.weight"
    weight = StandIn(np.ones((64, 96), np.float32))
    tensors = [(n, weight if n == name else w) for n, w in iter_hf_tensors(tmp_path)]
    model = populate(model_template(LlamaConfig.from_hf(tmp_path), param_dtype=jnp.float32), tensors)
    assert model.layers[0].mlp.down_proj.weight is weight

    tensors[[n for n, _ in tensors].index(name)] = (name, StandIn(np.ones((96, 64), np.float32)))
    with pytest.raises(ValueError, match=rf"{name}: checkpoint shape \(96, 64\) does not match the model's \(64, 96\)"):
        populate(model_template(LlamaConfig.from_hf(tmp_path), param_dtype=jnp.float32), tensors)


# Refusals.


def _hf_config(**overrides) -> dict:
    base = dict(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1)
    return {k: v for k, v in (base | overrides).items() if v is not None}


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(model_type="mistral"), "model_type"),
        (dict(num_local_experts=8), "num_local_experts"),
        (dict(num_experts=4), "num_experts"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling.rope_type"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "rope_parameters.rope_type"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(hidden_size=None), "hidden_size"),
        (dict(num_attention_heads=3), "n_heads"),
    ],
)
def test_unsupported_configs_are_refused_by_name(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        LlamaConfig.from_hf(_hf_config(**overrides))


def test_legacy_rope_fields_are_read():
    """Configs written before transformers 5: `rope_theta` at top level, `rope_scaling` with "type"."""
    scaling = dict(type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    config = LlamaConfig.from_hf(_hf_config(rope_theta=500000.0, rope_scaling=scaling, eos_token_id=[128001, 128009]))
    assert config.rope_theta == 500000.0
    assert config.rope_scaling.factor == 32.0
    assert config.eos_ids == (128001, 128009)
    assert LlamaConfig.from_hf(_hf_config(rope_scaling={"rope_type": "default"})).rope_scaling is None


def _rewrite_first_shard(path, edit) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    save_hf_llama(tmp_path, **CONFIGS["tied-mqa-llama3"])
    name = "model.layers.1.mlp.up_proj.weight"

    def edit(tensors):
        tensors[name] = tensors[name][:, :-1].copy()

    _rewrite_first_shard(tmp_path, edit)
    with pytest.raises(ValueError, match=rf"{name}: checkpoint shape \(96, 63\) does not match the model's \(96, 64\)"):
        load_hf(tmp_path, param_dtype=jnp.float32)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    save_hf_llama(tmp_path, **CONFIGS["tied-mqa-llama3"])

    def edit(tensors):
        del tensors["model.layers.1.input_layernorm.weight"]
        tensors["model.layers.0.mlp.extra_proj.weight"] = np.zeros((2, 2), np.float32)

    _rewrite_first_shard(tmp_path, edit)
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.input_layernorm\.weight; "
                                         r"unexpected tensors: model\.layers\.0\.mlp\.extra_proj\.weight"):
        load_hf(tmp_path, param_dtype=jnp.float32)


def test_missing_and_broken_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no such file or directory"):
        load_hf(tmp_path / "nowhere", param_dtype=jnp.float32)

    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty/config.json: no such file or directory"):
        load_hf(tmp_path / "empty", param_dtype=jnp.float32)

    (tmp_path / "config.json").write_text(json.dumps(_hf_config()))
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        load_hf(tmp_path, param_dtype=jnp.float32)

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "shard-1.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="shard-1.safetensors"):
        load_hf(tmp_path, param_dtype=jnp.float32)

    (tmp_path / "model.safetensors.index.json").unlink()
    save_file({"model.norm.weight": np.ones(16, np.float32)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="model.safetensors: unreadable safetensors file"):
        load_hf(tmp_path, param_dtype=jnp.float32)

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not a valid JSON config"):
        load_hf(tmp_path, param_dtype=jnp.float32)


def _llama2c_header(dim=8, hidden=12, layers=1, heads=2, kv_heads=1, vocab=16, seq_len=4) -> bytes:
    return struct.pack("7i", dim, hidden, layers, heads, kv_heads, vocab, seq_len)


def test_llama2c_files_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.bin"):
        load_llama2c(tmp_path / "absent.bin", param_dtype=jnp.float32)

    config = LlamaConfig.from_llama2c_header(struct.unpack("7i", _llama2c_header()))
    # embedding, rms_att, wq (8x8), wk and wv (4x8 each), wo, rms_ffn, w1 w2 w3 (12x8), rms_final,
    # and the two RoPE tables (seq_len x head_dim / 2)
    n_floats = 16 * 8 + 8 + 64 + 32 + 32 + 64 + 8 + 3 * 96 + 8 + 2 * 4 * 2
    good = tmp_path / "tiny.bin"
    good.write_bytes(_llama2c_header() + np.arange(n_floats, dtype="<f4").tobytes())
    assert read_llama2c_config(good) == config
    assert [name for name, _ in iter_llama2c_tensors(good)][:3] == [
        "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.q_proj.weight"]

    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(good.read_bytes()[:-4])
    with pytest.raises(ValueError, match=r"truncated.bin: truncated llama2.c file \(2616 bytes; its header implies 2620\)"):
        read_llama2c_config(truncated)

    versioned = tmp_path / "v1.bin"
    versioned.write_bytes(struct.pack("<Ii", 0x616B3432, 1) + bytes(256))
    with pytest.raises(ValueError, match="v1.bin: llama2.c versioned export"):
        read_llama2c_config(versioned)

    nonsense = tmp_path / "nonsense.bin"
    nonsense.write_bytes(_llama2c_header(heads=3) + bytes(64))
    with pytest.raises(ValueError, match="nonsense.bin: not a llama2.c checkpoint"):
        read_llama2c_config(nonsense)
