"""unweight-jax: lossless compression of bf16 weights, and JAX inference straight from them."""

from .codec import compress, decompress, from_palette, to_palette
from .format import FormatError, HuffmanParts, PaletteParts

__all__ = [
    "FormatError",
    "HuffmanParts",
    "PaletteParts",
    "compress",
    "decompress",
    "from_palette",
    "to_palette",
]
