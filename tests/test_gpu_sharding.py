"""Tensor-parallel compressed layers on GPUs: each device runs the fused palette kernel on its shard.

The layer tests need one GPU (a mesh of one device still goes through `shard_map` and the
shard's plan); the model test needs two.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from unweight_jax import codec
from unweight_jax.format import HuffmanParts
from unweight_jax.layers import CompressedLinear
from unweight_jax.sharding import COLUMN, ROW, ShardedCompressedLinear, shard_plan, tp_mesh
from unweight_jax.weights import from_huffman

CONFIG = dict(
    vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
)


def _parts(rows: int, cols: int, seed: int = 0) -> HuffmanParts:
    """A N(0, 0.02) bf16 weight, Huffman-coded."""
    rng = np.random.default_rng(seed)
    return codec.compress((rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16))


def _gpus() -> list[jax.Device]:
    return jax.devices("gpu")


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 16, 64])
def test_a_sharded_layer_lowers_to_the_fused_kernel(batch):
    parts = _parts(1024, 512)
    layer = ShardedCompressedLinear.from_huffman(parts, module_path="mlp/gate_proj", mesh=tp_mesh(1), dtype=jnp.bfloat16)
    plan = shard_plan(layer.weight.get_value(), batch, jnp.bfloat16)
    assert plan.kernel in ("gemv", "gemm"), plan
    x = jnp.ones((batch, 512), jnp.bfloat16)
    hlo = jax.jit(lambda x: layer(x)).lower(x).as_text()
    assert f"unweight_{plan.kernel}_palette" in hlo


def _assert_sharded_layer_equals_one_gpu(tp: int, path: str, shape: tuple[int, int], batch: int, seed: int) -> None:
    parts = _parts(*shape, seed=seed)
    sharded = ShardedCompressedLinear.from_huffman(parts, module_path=path, mesh=tp_mesh(tp), dtype=jnp.bfloat16)
    plain = CompressedLinear(from_huffman(parts, "palette"), dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(batch).standard_normal((batch, shape[1])), jnp.bfloat16)
    got = np.asarray(jax.jit(lambda x: sharded(x))(x)).view(np.uint16)
    want = np.asarray(jax.jit(lambda x: plain(x))(x)).view(np.uint16)
    np.testing.assert_array_equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["mlp/up_proj", "mlp/down_proj"], ids=[COLUMN, ROW])
@pytest.mark.parametrize("batch", [1, 16])
def test_a_one_device_sharded_layer_equals_the_one_gpu_layer_bit_for_bit(path, batch):
    """At degree 1 the shard is the whole weight: same plan, same kernel, same bits."""
    _assert_sharded_layer_equals_one_gpu(1, path, (768, 1024), batch, seed=batch)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 16])
def test_a_column_parallel_layer_over_two_gpus_equals_one_gpu_bit_for_bit(batch):
    """Each device's rows are whole rows of the weight, reduced over the whole input as on one GPU."""
    if len(_gpus()) < 2:
        pytest.skip("needs two GPUs")
    _assert_sharded_layer_equals_one_gpu(2, "mlp/up_proj", (2048, 1024), batch, seed=3)


@pytest.mark.gpu
def test_the_model_over_two_gpus_gives_one_gpus_greedy_tokens(tmp_path: Path):
    if len(_gpus()) < 2:
        pytest.skip("needs two GPUs")
    import torch
    from models_testing import save_hf_llama

    from unweight_jax.compress import compress_checkpoint
    from unweight_jax.loading import load_bundle_model
    from unweight_jax.models.generate import generate

    save_hf_llama(tmp_path / "hf", dtype=torch.bfloat16, **CONFIG)
    bundle = tmp_path / "model.unw.safetensors"
    compress_checkpoint(tmp_path / "hf", bundle, progress=False)
    one = load_bundle_model(bundle, form="palette", dtype=jnp.bfloat16)
    two = load_bundle_model(bundle, dtype=jnp.bfloat16, mesh=tp_mesh(2))
    prompts = [[1, 2, 3, 4, 5], [7, 11], list(range(20, 60))]

    tokens = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (2, 16))
    positions = np.broadcast_to(np.arange(16), tokens.shape)

    def logits(model) -> np.ndarray:
        graphdef, state = nnx.split(model)
        return np.asarray(jax.jit(lambda s: nnx.merge(graphdef, s)(tokens, positions)[0])(state), np.float32)

    # Row-parallel partial products arrive rounded to bf16 before their fp32 sum: a few bf16 ulps.
    want = logits(one)
    np.testing.assert_allclose(logits(two), want, atol=0.02 * np.abs(want).max())
    assert generate(two, prompts, 16).tokens == generate(one, prompts, 16).tokens
