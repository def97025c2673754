"""`CompressedLinear`, the NNX layer that serves a projection from a compressed weight, and the
function that swaps a model's `Linear` layers for it by module-path rules (qwix style)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from . import codec
from .models.llama import Linear
from .pipelines import Plan, matmul
from .weights import CompressedWeight, from_huffman

DEFAULT_MODULE_PATH = r".*(q|k|v|o|gate|up|down)_proj"


class CompressedParam(nnx.Variable):
    """A compressed weight (a pytree of arrays from `unweight_jax.weights`) held by a layer."""


class CompressedLinear(nnx.Module):
    """A bias-free projection `x @ W.T` with `W` [out, in] held compressed.

    Same `__call__` contract as the model's `Linear`: `x` is cast to `dtype`, the product
    accumulates in fp32. `plan` pins the pipeline and kernel; None lets `pipelines.default_plan`
    choose per batch size at trace time.
    """

    def __init__(self, weight: CompressedWeight, *, dtype: Any, plan: Plan | None = None):
        if len(weight.shape) != 2:
            raise ValueError(f"CompressedLinear needs a 2-D weight, got shape {weight.shape}")
        self.weight = CompressedParam(weight)
        self.dtype = dtype
        self.plan = plan

    @property
    def out_features(self) -> int:
        return self.weight.get_value().shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.get_value().shape[1]

    def __call__(self, x: jax.Array) -> jax.Array:
        return matmul(x.astype(self.dtype), self.weight.get_value(), plan=self.plan)


def module_paths(model: nnx.Module) -> Iterator[tuple[str, nnx.Module]]:
    """(`/`-joined path, module) for every submodule, e.g. `layers/0/mlp/gate_proj`."""
    for path, module in nnx.iter_graph(model):
        if isinstance(module, nnx.Module) and path:
            yield "/".join(str(p) for p in path), module


def compress_linears(
    model: nnx.Module,
    *,
    module_path: str | Sequence[str] = DEFAULT_MODULE_PATH,
    form: str = "palette",
    plan: Plan | None = None,
    threads: int | None = None,
) -> list[str]:
    """Replace, in place, every `Linear` whose path fully matches one of the `module_path` regexes
    with a `CompressedLinear` holding its weight in the resident `form`. The weights must be bf16
    (compression is lossless only for bf16). Returns the paths replaced."""
    patterns = [module_path] if isinstance(module_path, str) else list(module_path)
    compiled = [re.compile(p) for p in patterns]
    targets = [
        (path, mod)
        for path, mod in module_paths(model)
        if isinstance(mod, Linear) and any(c.fullmatch(path) for c in compiled)
    ]
    if not targets:
        raise ValueError(f"no Linear layer matches {patterns}")
    for path, linear in targets:
        weight = np.asarray(linear.weight[...])
        if weight.dtype != np.dtype("bfloat16"):
            raise TypeError(f"{path}: weight is {weight.dtype}; compression is lossless only for bf16")
        parts = codec.compress(weight, threads=threads)
        replace_module(model, path, CompressedLinear(from_huffman(parts, form), dtype=linear.dtype, plan=plan))
    return [path for path, _ in targets]


def replace_module(model: nnx.Module, path: str, new: nnx.Module) -> None:
    """Set the submodule at `/`-joined `path` (list indices as numbers) to `new`."""
    *parents, leaf = path.split("/")
    node: Any = model
    for key in parents:
        node = node[int(key)] if key.isdigit() else getattr(node, key)
    if leaf.isdigit():
        node[int(leaf)] = new
    else:
        setattr(node, leaf, new)
