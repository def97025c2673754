"""The fast codec: docs/FORMAT.md in C++ (`unweight_jax._codec`), multi-threaded over chunks.

Produces byte for byte what `unweight_jax.reference` produces, on the same dataclasses. Every
function that reads compressed parts checks them first and raises `FormatError` naming what is
wrong; `threads=None` uses every hardware thread.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from . import _codec
from .format import (
    DEFAULT_CHUNK_STEPS,
    GROUP,
    PALETTE_SIZE,
    FormatError,
    HuffmanParts,
    PaletteParts,
    as_matrix_shape,
    num_chunks,
)

__all__ = [
    "compress",
    "decompress",
    "decode_exponents",
    "decoder_table",
    "from_palette",
    "huffman_to_palette",
    "to_palette",
    "validate",
]


def compress(x: np.ndarray, *, chunk_steps: int = DEFAULT_CHUNK_STEPS, threads: int | None = None) -> HuffmanParts:
    """A bf16 tensor (ml_dtypes.bfloat16, or its uint16 bit patterns) -> its Huffman parts."""
    bits = _bf16_bits(x)
    if not _positive_int(chunk_steps) or chunk_steps > np.iinfo(np.int32).max:
        raise ValueError(f"chunk_steps must be a positive int32, got {chunk_steps!r}")
    sm, words, chunks, table = _codec.encode(bits, int(chunk_steps), _threads(threads))
    return HuffmanParts(tuple(bits.shape), int(chunk_steps), sm, words, chunks, table)


def decompress(parts: HuffmanParts, *, threads: int | None = None) -> np.ndarray:
    """Huffman parts -> the bf16 tensor (ml_dtypes.bfloat16, the declared shape)."""
    validate(parts)
    bits = _codec.decode_bf16(parts.sm, parts.words, parts.chunks, parts.table, parts.chunk_steps, _threads(threads))
    return bits.view(ml_dtypes.bfloat16)


def decode_exponents(parts: HuffmanParts, *, threads: int | None = None) -> np.ndarray:
    """Huffman parts -> the exponent bytes (uint8, the declared shape), without building bf16."""
    validate(parts)
    e = _codec.decode_exponents(parts.words, parts.chunks, parts.table, parts.size, parts.chunk_steps, _threads(threads))
    return e.reshape(parts.shape)


def decoder_table(parts: HuffmanParts) -> np.ndarray:
    """The 2^L decoder table of FORMAT.md 2.3 (uint16, entry = (len << 8) | symbol, 0 = no code).

    An empty tensor's table has no codes: L = 0, one zero entry.
    """
    _check_part("table", parts.table, np.uint8, (None, 2))
    return _codec.decoder_table(parts.table)


def validate(parts: HuffmanParts) -> None:
    """Raises FormatError unless the parts agree with the declared shape and chunk_steps, the table
    is a valid code and the chunk offsets start at 0, never decrease and stay within the words.
    (A corrupt stream inside a chunk shows only when it is decoded.)"""
    shape = tuple(parts.shape)
    if any(not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
        raise FormatError(f"shape {shape} is not a tensor shape")
    if not _positive_int(parts.chunk_steps) or parts.chunk_steps > np.iinfo(np.int32).max:
        raise FormatError(f"chunk_steps must be a positive int32, got {parts.chunk_steps!r}")
    _check_part("sm", parts.sm, np.uint8, shape)
    _check_part("words", parts.words, np.uint16, (None,))
    _check_part("chunks", parts.chunks, np.uint32, (num_chunks(parts.size, parts.chunk_steps),))
    _check_part("table", parts.table, np.uint8, (None, 2))
    if (len(parts.table) == 0) != (parts.size == 0):
        raise FormatError(f"table has {len(parts.table)} rows for a tensor of {parts.size} elements")
    _codec.validate(parts.words, parts.chunks, parts.table, parts.size, parts.chunk_steps)


def to_palette(x: np.ndarray, *, threads: int | None = None) -> PaletteParts:
    """A bf16 tensor (ml_dtypes.bfloat16, or its uint16 bit patterns) -> its palette parts."""
    bits = _bf16_bits(x)
    rows, cols = as_matrix_shape(bits.shape)
    palette, idx, sm, esc_groups, esc_exp = _codec.to_palette(bits, rows, cols, _threads(threads))
    return PaletteParts(tuple(bits.shape), palette, idx, sm, esc_groups, esc_exp)


def huffman_to_palette(parts: HuffmanParts, *, threads: int | None = None) -> PaletteParts:
    """Huffman parts -> palette parts, through the exponent bytes alone (no bf16 is built)."""
    validate(parts)
    rows, cols = as_matrix_shape(parts.shape)
    palette, idx, esc_groups, esc_exp = _codec.huffman_to_palette(
        parts.words, parts.chunks, parts.table, rows, cols, parts.chunk_steps, _threads(threads)
    )
    return PaletteParts(tuple(parts.shape), palette, idx, parts.sm.reshape(rows, cols), esc_groups, esc_exp)


def from_palette(parts: PaletteParts, *, threads: int | None = None) -> np.ndarray:
    """Palette parts -> the bf16 tensor (ml_dtypes.bfloat16, the declared shape)."""
    rows, cols = as_matrix_shape(tuple(parts.shape))
    _check_part("palette", parts.palette, np.uint8, (PALETTE_SIZE,))
    _check_part("idx", parts.idx, np.uint8, (rows, -(-cols // 2)))
    _check_part("sm", parts.sm, np.uint8, (rows, cols))
    _check_part("esc_groups", parts.esc_groups, np.uint32, (None,))
    _check_part("esc_exp", parts.esc_exp, np.uint8, (len(parts.esc_groups), GROUP))
    bits = _codec.from_palette(
        parts.palette, parts.idx, parts.sm, parts.esc_groups, parts.esc_exp, rows, cols, _threads(threads)
    )
    return bits.reshape(parts.shape).view(ml_dtypes.bfloat16)


# ---------------------------------------------------------------- argument checks


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """The uint16 bit patterns of a bf16 tensor, C-contiguous; anything else is a TypeError."""
    x = np.asarray(x)
    if x.dtype == ml_dtypes.bfloat16:
        x = x.view(np.uint16)
    elif x.dtype != np.uint16:
        raise TypeError(f"expected a bfloat16 array (ml_dtypes.bfloat16) or its uint16 bit patterns, got {x.dtype}")
    return np.asarray(x, order="C")  # not ascontiguousarray: that makes a 0-d array 1-d


def _positive_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1


def _threads(threads: int | None) -> int:
    """The C++ codec's thread count: 0 for one per hardware thread."""
    if threads is None:
        return 0
    if not _positive_int(threads):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    return int(threads)


def _check_part(name: str, part: np.ndarray, dtype: type, shape: tuple[int | None, ...]) -> None:
    """A C-contiguous numpy array of `dtype` and `shape` (None: a dimension of any size)."""
    if not isinstance(part, np.ndarray) or part.dtype != dtype:
        got = part.dtype if isinstance(part, np.ndarray) else type(part).__name__
        raise FormatError(f"part {name!r} must be a {np.dtype(dtype).name} array, got {got}")
    if part.ndim != len(shape) or any(want is not None and got != want for got, want in zip(part.shape, shape)):
        expected = "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"
        raise FormatError(f"part {name!r} has shape {list(part.shape)}, expected {expected}")
    if not part.flags.c_contiguous:
        raise FormatError(f"part {name!r} is not C-contiguous")
