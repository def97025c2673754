"""Load a Llama from whatever the user has: an unweight bundle, a Hugging Face directory or a
llama2.c `.bin`. A bundle loads tensor by tensor, each compressed projection straight into a
`CompressedLinear` of the chosen resident form, so the bf16 model never exists in memory at once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from . import codec
from .bundle import BUNDLE_SUFFIX, INDEX_SUFFIX, BundleError, BundleReader
from .format import FORMS, HuffmanParts
from .layers import CompressedLinear, replace_module
from .models.config import LlamaConfig
from .models.llama import Linear, Llama
from .models.loading import load_hf, load_llama2c, model_template, populate
from .pipelines import Plan
from .sharding import ShardedCompressedLinear, check_mesh, replicate_params
from .weights import from_huffman

if TYPE_CHECKING:
    from .layer_plan import LayerPlan


def is_bundle(path: str | os.PathLike[str]) -> bool:
    name = Path(path).name
    return name.endswith(BUNDLE_SUFFIX) or name.endswith(INDEX_SUFFIX)


def default_form() -> str:
    """Palette on a GPU (the fused kernels' input); Huffman elsewhere, where the `full` pipeline
    decodes on the CPU and the smallest resident form wins."""
    return "palette" if jax.default_backend() == "gpu" else "huffman"


def load_model(
    path: str | os.PathLike[str],
    *,
    form: str | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.bfloat16,
    plan: Plan | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> Llama:
    """A Llama from a bundle (compressed layers in resident `form`, tensor-parallel over `mesh`'s
    "tp" axis when given), an HF directory or a llama2.c file (plain layers in `param_dtype`;
    casting fp32 weights to bf16 is lossy)."""
    path = Path(path)
    if is_bundle(path):
        return load_bundle_model(path, form=form, dtype=dtype, plan=plan, mesh=mesh)
    if mesh is not None:
        raise ValueError(f"{path}: tensor parallelism serves compressed layers; it needs a bundle")
    if path.is_dir():
        return load_hf(path, param_dtype=param_dtype, dtype=dtype)
    if path.is_file():
        return load_llama2c(path, param_dtype=param_dtype, dtype=dtype)
    raise FileNotFoundError(2, "no such model, bundle or checkpoint", str(path))


def load_bundle_model(
    path: str | os.PathLike[str],
    *,
    form: str | None = None,
    dtype: Any = jnp.float32,
    plan: Plan | None = None,
    mesh: jax.sharding.Mesh | None = None,
    layer_plan: LayerPlan | None = None,
) -> Llama:
    """A Llama whose compressed projections are `CompressedLinear` layers in resident `form`, or
    each in the form `layer_plan` gives it (see `unweight_jax.layer_plan`).

    Tensors the bundle stores raw fill the model as they are; a compressed tensor that is not a
    projection (an embedding compressed with `--embeddings`) is decoded to bf16 on the host.
    With a `mesh` that has a "tp" axis, the projections are `ShardedCompressedLinear` layers
    (palette form, split over "tp"; see `unweight_jax.sharding`) and the rest is replicated.
    """
    if layer_plan is not None and (form is not None or mesh is not None):
        raise ValueError("a layer plan gives each projection its form on one device; give no form or mesh with it")
    if mesh is not None:
        check_mesh(mesh)
        if form not in (None, "palette") or plan is not None:
            raise ValueError("tensor-parallel layers are palette-resident and each shard takes the autotuner's plan; give no form or plan")
    form = form or default_form()
    if form not in FORMS:
        raise ValueError(f"unknown resident form {form!r}; expected one of {FORMS}")
    reader = BundleReader(path)
    if reader.config is None:
        raise BundleError(f"{path}: the bundle holds no model config (unweight.config); it cannot rebuild a model")
    config = LlamaConfig.from_hf(reader.config)
    model = model_template(config, param_dtype=jnp.bfloat16, dtype=dtype)

    # First the compressed projections: each replaces its Linear, so `populate` then expects only
    # the plain parameters that remain.
    plain = []
    for name in reader.names:
        module_path = projection_path(model, reader, name)
        if module_path is not None:
            parts = reader.read(name)
            _check_shape(model, module_path, name, parts)
            if mesh is None:
                layer_form = form if layer_plan is None else layer_plan.form(module_path)
                layer = CompressedLinear(from_huffman(parts, layer_form), dtype=dtype, plan=plan)
            else:
                layer = ShardedCompressedLinear.from_huffman(parts, module_path=module_path, mesh=mesh, dtype=dtype)
            replace_module(model, module_path, layer)
        else:
            plain.append(name)
    populate(model, ((name, _plain(reader.read(name))) for name in plain))
    if mesh is not None:
        replicate_params(model, mesh)
    return model


def projection_path(model: Llama, reader: BundleReader, name: str) -> str | None:
    """The module path of the `Linear` that bundle tensor `name` replaces as a `CompressedLinear`,
    or None for a tensor that loads as a plain parameter."""
    module_path = _module_path(name)
    if reader.info(name).encoding == "huffman" and isinstance(_find(model, module_path), Linear):
        return module_path
    return None


def _module_path(name: str) -> str:
    """HF tensor name -> NNX module path: 'model.layers.0.mlp.up_proj.weight' -> 'layers/0/mlp/up_proj'."""
    return name.removeprefix("model.").removesuffix(".weight").replace(".", "/")


def _find(model: Llama, module_path: str) -> Any:
    node: Any = model
    for key in module_path.split("/"):
        if key.isdigit():
            if not 0 <= int(key) < len(node):
                return None
            node = node[int(key)]
        else:
            node = getattr(node, key, None)
        if node is None:
            return None
    return node


def _check_shape(model: Llama, module_path: str, name: str, parts: HuffmanParts) -> None:
    expected = tuple(_find(model, module_path).weight.shape)
    if tuple(parts.shape) != expected:
        raise BundleError(f"{name}: bundle shape {tuple(parts.shape)} does not match the model's {expected}")


def _plain(value: Any) -> Any:
    return codec.decompress(value) if isinstance(value, HuffmanParts) else value
