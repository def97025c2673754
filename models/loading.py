"""Checkpoint readers (Hugging Face safetensors, llama2.c `.bin`) and model loaders.

Readers yield `(hf_name, numpy array)` in Hugging Face naming and layout whatever the source, so
that the compressor and the loaders see one convention. Loaders build the model with
`nnx.eval_shape` (no memory) and fill it through `populate`, which validates every tensor against
that template.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors' numpy framework reads BF16)
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from .config import LlamaConfig
from .llama import DType, Llama

PathLike = str | os.PathLike

# Non-persistent buffers that some transformers versions saved; recomputed from the config.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


# Hugging Face safetensors checkpoints.


def hf_weight_files(path: PathLike) -> list[str]:
    """The safetensors files of an HF checkpoint directory: the shards its index names, or
    `model.safetensors`."""
    path = os.fspath(path)
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = dict.fromkeys(json.load(f)["weight_map"].values())  # in order, once each
            files = [os.path.join(path, shard) for shard in shards]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e!r})") from None
    elif os.path.exists(single):
        files = [single]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    for file in files:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: no such file (named by {index})")
    return files


def iter_hf_tensors(path: PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yields every tensor of an HF checkpoint directory, in its stored dtype, file by file."""
    for file in hf_weight_files(path):
        try:
            with safe_open(file, framework="np") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"{file}: unreadable safetensors file ({e})") from None


# llama2.c checkpoints (the legacy export: 7 int32 of header, then fp32 weights).

_LLAMA2C_HEADER_BYTES = 7 * 4
_LLAMA2C_MAGIC = 0x616B3432  # "ak42": the start of llama2.c's versioned exports, another layout


def read_llama2c_config(path: PathLike) -> LlamaConfig:
    """Reads the header of a llama2.c `.bin` file and checks the file's size against it."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(_LLAMA2C_HEADER_BYTES)
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file or directory") from None
    if len(raw) < _LLAMA2C_HEADER_BYTES:
        raise ValueError(f"{path}: truncated llama2.c file ({len(raw)} bytes, shorter than its header)")
    header = np.frombuffer(raw, "<i4")
    if header[0] == _LLAMA2C_MAGIC:
        raise ValueError(f"{path}: llama2.c versioned export (version {header[1]}) is not supported; "
                         "only the legacy export is")
    try:
        config = LlamaConfig.from_llama2c_header(header.tolist())
    except ValueError as e:
        raise ValueError(f"{path}: not a llama2.c checkpoint (header {header.tolist()}: {e})") from None
    expected = _LLAMA2C_HEADER_BYTES + 4 * sum(int(np.prod(shape)) for _, shape in _llama2c_layout(config))
    if size != expected:
        what = "truncated" if size < expected else "trailing bytes after the weights in"
        raise ValueError(f"{path}: {what} llama2.c file ({size} bytes; its header implies {expected})")
    return config


def _llama2c_layout(config: LlamaConfig) -> list[tuple[str | None, tuple[int, ...]]]:
    """The tensors of a legacy llama2.c file in file order, as (HF name or None to skip, shape).

    llama2.c names: w1 = gate, w3 = up, w2 = down; freq_cis_real/imag are a RoPE table we recompute.
    """
    c = config
    L, q_out, kv_out = c.n_layers, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim

    def per_layer(module: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
        return [(f"model.layers.{i}.{module}.weight", shape) for i in range(L)]

    layout = [
        ("model.embed_tokens.weight", (c.vocab_size, c.dim)),
        *per_layer("input_layernorm", (c.dim,)),
        *per_layer("self_attn.q_proj", (q_out, c.dim)),
        *per_layer("self_attn.k_proj", (kv_out, c.dim)),
        *per_layer("self_attn.v_proj", (kv_out, c.dim)),
        *per_layer("self_attn.o_proj", (c.dim, q_out)),
        *per_layer("post_attention_layernorm", (c.dim,)),
        *per_layer("mlp.gate_proj", (c.hidden_dim, c.dim)),
        *per_layer("mlp.down_proj", (c.dim, c.hidden_dim)),
        *per_layer("mlp.up_proj", (c.hidden_dim, c.dim)),
        ("model.norm.weight", (c.dim,)),
        (None, (c.max_seq_len, c.head_dim // 2)),
        (None, (c.max_seq_len, c.head_dim // 2)),
    ]
    if not c.tie_embeddings:
        layout.append(("lm_head.weight", (c.vocab_size, c.dim)))
    return layout


def _pairs_to_halves(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorders each head's rows of a q/k projection from adjacent RoPE pairs (2i, 2i + 1), as
    llama2.c (and Meta's original code) rotate, to halves (i, i + head_dim / 2), as transformers
    rotates: the permutation of transformers' `convert_llama_weights_to_hf.py`."""
    out_features, in_features = w.shape
    return w.reshape(n_heads, out_features // n_heads // 2, 2, in_features).transpose(0, 2, 1, 3).reshape(w.shape)


def iter_llama2c_tensors(path: PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yields the fp32 tensors of a legacy llama2.c `.bin` file with HF names and HF layout
    (q and k rows permuted to transformers' RoPE convention)."""
    path = os.fspath(path)
    config = read_llama2c_config(path)
    with open(path, "rb") as f:
        f.seek(_LLAMA2C_HEADER_BYTES)
        for name, shape in _llama2c_layout(config):
            count = int(np.prod(shape))
            if name is None:
                f.seek(4 * count, os.SEEK_CUR)
                continue
            w = np.fromfile(f, "<f4", count).reshape(shape)
            if name.endswith("q_proj.weight"):
                w = _pairs_to_halves(w, config.n_heads)
            elif name.endswith("k_proj.weight"):
                w = _pairs_to_halves(w, config.n_kv_heads)
            yield name, w


# Filling a model template.


def model_template(config: LlamaConfig, *, param_dtype: DType, dtype: DType = jnp.float32) -> Llama:
    """The model with abstract weights (shapes and dtypes, no memory), for `populate`."""
    return nnx.eval_shape(lambda: Llama(config, param_dtype=param_dtype, dtype=dtype, rngs=nnx.Rngs(0)))


def hf_name(path: tuple[str | int, ...]) -> str:
    """The HF checkpoint name of the parameter at an NNX path: ('layers', 0, 'mlp', 'up_proj',
    'weight') -> 'model.layers.0.mlp.up_proj.weight'."""
    name = ".".join(str(p) for p in path)
    return name if path[0] == "lm_head" else f"model.{name}"


def _module_holding(model: Llama, name: str) -> nnx.Module:
    """The module whose `weight` is the HF parameter `name` (one of the model's own names)."""
    module: Any = model
    for part in name.removeprefix("model.").split(".")[:-1]:
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def set_weight(model: Llama, name: str, value: Any) -> None:
    """Assigns checkpoint tensor `name` to its module's `weight`, after checking its shape.

    An array is cast to the parameter's dtype. An `nnx.Variable` (how a compressed weight comes,
    exposing the `.shape` of the matrix it stands for) replaces the parameter as it is.
    """
    module = _module_holding(model, name)
    expected, got = tuple(module.weight.shape), tuple(value.shape)
    if got != expected:
        raise ValueError(f"{name}: checkpoint shape {got} does not match the model's {expected}")
    if isinstance(value, nnx.Variable):
        module.weight = value
    else:
        module.weight.set_value(jnp.asarray(value, dtype=module.weight.dtype))


def _listing(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def populate(model: Llama, tensors: Iterable[tuple[str, Any]]) -> Llama:
    """Fills a model template (see `model_template`) from (HF name, value) pairs, in place.

    Every parameter must be given exactly once; missing, duplicated and unexpected names raise a
    ValueError naming them. As in transformers, a tied model ignores a stored `lm_head.weight`.
    """
    expected = {hf_name(path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    seen: set[str] = set()
    unexpected: list[str] = []
    for name, value in tensors:
        if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and model.lm_head is None):
            continue
        if name not in expected:
            unexpected.append(name)
            continue
        if name in seen:
            raise ValueError(f"{name}: given twice")
        set_weight(model, name, value)
        seen.add(name)
    missing = sorted(expected - seen)
    if missing or unexpected:
        problems = [f"missing tensors: {_listing(missing)}"] if missing else []
        problems += [f"unexpected tensors: {_listing(unexpected)}"] if unexpected else []
        raise ValueError("checkpoint does not match the model: " + "; ".join(problems))
    return model


def load_hf(path: PathLike, *, param_dtype: DType, dtype: DType = jnp.float32) -> Llama:
    """Loads an HF Llama directory (`config.json` and `model.safetensors` or a sharded set).

    `param_dtype` is required because casting (for example fp32 weights to bf16) is lossy.
    """
    config = LlamaConfig.from_hf(path)
    return populate(model_template(config, param_dtype=param_dtype, dtype=dtype), iter_hf_tensors(path))


def load_llama2c(path: PathLike, *, param_dtype: DType, dtype: DType = jnp.float32) -> Llama:
    """Loads a legacy llama2.c `.bin` checkpoint."""
    config = read_llama2c_config(path)
    return populate(model_template(config, param_dtype=param_dtype, dtype=dtype), iter_llama2c_tensors(path))
