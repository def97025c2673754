"""unweight-jax: lossless compression of bf16 weights, and JAX inference straight from them."""

from __future__ import annotations

import importlib
from typing import Any

from .bundle import load_bundle, save_bundle
from .codec import compress, decompress, from_palette, huffman_to_palette, to_palette
from .format import FormatError, HuffmanParts, PaletteParts

# Names that need jax and the models: imported on first use, so that `import unweight_jax` (and
# every `unweight` command) stays fast.
_LAZY = {
    "matmul": "pipelines",
    "Plan": "pipelines",
    "load_model": "loading",
    "CompressedLinear": "layers",
    "compress_linears": "layers",
    "weights": None,
    "autotune": None,
    "models": None,
}

__all__ = [
    "CompressedLinear",
    "FormatError",
    "HuffmanParts",
    "PaletteParts",
    "Plan",
    "autotune",
    "compress",
    "compress_linears",
    "decompress",
    "from_palette",
    "huffman_to_palette",
    "load_bundle",
    "load_model",
    "matmul",
    "models",
    "save_bundle",
    "to_palette",
    "weights",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'unweight_jax' has no attribute {name!r}")
    module = importlib.import_module(f".{_LAZY[name] or name}", __name__)
    return module if _LAZY[name] is None else getattr(module, name)
