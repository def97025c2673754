"""The two models a benchmark compares, side by side on the device: the plain bf16 Llama (XLA's
dot on every projection) and the same weights with every projection, LM head included, a
palette-resident `CompressedLinear`. Both run bf16 activations, the fused kernels' input."""

from __future__ import annotations

import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..bundle import BundleReader
from ..layers import CompressedLinear, module_paths, replace_module
from ..models.config import LLAMA_3_1_8B, LlamaConfig
from ..models.llama import Linear, Llama
from ..models.loading import hf_name, load_hf, model_template, populate
from ..pipelines import Plan
from ..sharding import COLUMN, TP_AXIS, ShardedCompressedLinear, parallel_kind
from .mlp_stack import PALETTE_READ
from .synthetic import normal_bf16
from .transcode import palette_weight

DTYPE = jnp.bfloat16

# A small Llama (GQA, untied head) that runs in seconds on a CPU; every dimension splits into
# 64-column palette groups at tp = 2, as row-parallel shards need.
TINY = LlamaConfig(
    vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256, max_seq_len=8192
)
SIZES = {"8b": LLAMA_3_1_8B, "tiny": TINY}
SIZE_NAMES = {"8b": "llama3.1-8b", "tiny": "llama-tiny"}


def random_model(config: LlamaConfig, seed: int) -> Llama:
    """A bf16 Llama whose matrices are drawn N(0, 0.02) on the device one at a time (norms: ones)."""
    template = model_template(config, param_dtype=DTYPE, dtype=DTYPE)
    key = jax.random.key(seed)

    def tensors() -> Iterator[tuple[str, jax.Array]]:
        for i, (path, param) in enumerate(nnx.to_flat_state(nnx.state(template, nnx.Param))):
            shape = tuple(param.shape)
            value = normal_bf16(jax.random.fold_in(key, i), shape) if len(shape) == 2 else jnp.ones(shape, DTYPE)
            yield hf_name(path), value

    return populate(template, tensors())


def checkpoint_model(path: str | os.PathLike[str]) -> Llama:
    """A Hugging Face Llama directory as a bf16 model (other dtypes are rounded to bf16)."""
    return load_hf(path, param_dtype=DTYPE, dtype=DTYPE)


def bundle_bf16_model(reader: BundleReader) -> Llama:
    """The uncompressed bf16 model of a bundle: every tensor decoded on the host, one at a time."""
    config = LlamaConfig.from_hf(reader.config)
    return populate(model_template(config, param_dtype=DTYPE, dtype=DTYPE), ((n, reader.decode(n)) for n in reader.names))


def linears(model: Llama) -> list[tuple[str, nnx.Module]]:
    """(module path, layer) of every projection and the LM head, in whatever form it is held."""
    kinds = (Linear, CompressedLinear, ShardedCompressedLinear)
    return [(path, m) for path, m in module_paths(model) if isinstance(m, kinds)]


def compress_model(model: Llama, plan: Plan | None) -> Llama:
    """A second model with the same weights: every `Linear` (LM head included) as a palette-form
    `CompressedLinear` transcoded on the device, and its own copy of the plain parameters."""
    config = model.config
    compressed = model_template(config, param_dtype=DTYPE, dtype=DTYPE)
    for path, layer in linears(model):
        replace_module(compressed, path, CompressedLinear(palette_weight(layer.weight[...]), dtype=DTYPE, plan=plan))
    expected = {hf_name(path) for path, _ in nnx.to_flat_state(nnx.state(compressed, nnx.Param))}
    params = ((hf_name(path), param) for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    return populate(compressed, ((name, jnp.array(p[...], copy=True)) for name, p in params if name in expected))


def shard_bf16_model(model: Llama, mesh: Mesh) -> None:
    """Places the bf16 model on the mesh in place, Megatron style as `unweight_jax.sharding` splits
    the compressed one: column-parallel weights by rows, row-parallel by columns, the rest replicated."""
    replicated = NamedSharding(mesh, P())
    nnx.update(model, jax.device_put(nnx.state(model, nnx.Param), replicated))
    for path, layer in linears(model):
        split = P(TP_AXIS, None) if parallel_kind(path) == COLUMN else P(None, TP_AXIS)
        layer.weight.set_value(jax.device_put(layer.weight[...], NamedSharding(mesh, split)))


def weight_read_bytes(model: Llama) -> int:
    """Bytes every decode step reads from the weights: each projection and the LM head once, in
    the form it is held (for a palette weight, the arrays its kernels read; for a sharded one, all
    shards). The embedding rows a step looks up are left out (a few KB)."""
    total = 0
    for _, layer in linears(model):
        w = layer.weight.get_value()
        if isinstance(layer, CompressedLinear):
            total += sum(int(getattr(w, f).nbytes) for f in PALETTE_READ)
        else:
            total += int(w.nbytes)
    if model.lm_head is None:  # a tied head reads the embedding matrix
        total += int(model.embed_tokens.weight.get_value().nbytes)
    return total
