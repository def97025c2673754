"""Decode ops: the Huffman and palette forms (docs/FORMAT.md) back to bf16, exponent bytes or
4-bit palette indices, inside `jit` and `vmap`, on the CPU and (same target names) on CUDA.

Shapes and dtypes are checked here, at trace time; the handlers check the data (a corrupt
stream, an escape id outside the tensor) and fail the computation with a message naming it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..format import GROUP, MAX_CODE_LEN, PALETTE_SIZE, as_matrix_shape, num_chunks
from . import registry  # noqa: F401  (registers the targets)

__all__ = ["huffman_to_bf16", "huffman_to_exponent", "huffman_to_palette", "palette_to_bf16"]

# Batches run one element at a time: every element is a whole tensor with its own stream.
_VMAP = "sequential"


def huffman_to_bf16(
    sm: jax.Array, words: jax.Array, chunks: jax.Array, lut: jax.Array, *, chunk_steps: int
) -> jax.Array:
    """bf16[*sm.shape] from the sign+mantissa bytes and the Huffman stream of a tensor."""
    _check("sm", sm, np.uint8)
    _check_stream(words, chunks, lut, int(np.prod(sm.shape, dtype=np.int64)), chunk_steps)
    call = jax.ffi.ffi_call(
        "unweight_huffman_to_bf16", jax.ShapeDtypeStruct(sm.shape, jnp.bfloat16), vmap_method=_VMAP
    )
    return call(sm, words, chunks, lut, chunk_steps=np.int32(chunk_steps))


def huffman_to_exponent(
    words: jax.Array, chunks: jax.Array, lut: jax.Array, *, shape: tuple[int, ...], chunk_steps: int
) -> jax.Array:
    """u8[*shape]: the exponent bytes of a tensor of `shape`, decoded from its Huffman stream."""
    shape = tuple(shape)
    _check_stream(words, chunks, lut, int(np.prod(shape, dtype=np.int64)), chunk_steps)
    call = jax.ffi.ffi_call("unweight_huffman_to_exponent", jax.ShapeDtypeStruct(shape, np.uint8), vmap_method=_VMAP)
    return call(words, chunks, lut, chunk_steps=np.int32(chunk_steps))


def huffman_to_palette(
    words: jax.Array,
    chunks: jax.Array,
    lut: jax.Array,
    sym_to_idx: jax.Array,
    esc_groups: jax.Array,
    *,
    shape: tuple[int, ...],
    chunk_steps: int,
) -> jax.Array:
    """u8[R, ceil(C/2)]: the palette indices (`PaletteParts.idx`) of a tensor of `shape`, viewed
    as [R, C], decoded from its Huffman stream.

    `sym_to_idx` (u8[256]) gives the palette slot of each exponent (0 for those outside the
    palette); the nibbles of the groups listed in `esc_groups` (u32, flat ids) are 0.
    """
    rows, cols = as_matrix_shape(tuple(shape))
    _check_stream(words, chunks, lut, rows * cols, chunk_steps)
    _check("sym_to_idx", sym_to_idx, np.uint8, (256,))
    _check("esc_groups", esc_groups, np.uint32, (None,))
    call = jax.ffi.ffi_call(
        "unweight_huffman_to_palette", jax.ShapeDtypeStruct((rows, -(-cols // 2)), np.uint8), vmap_method=_VMAP
    )
    return call(words, chunks, lut, sym_to_idx, esc_groups, chunk_steps=np.int32(chunk_steps), cols=np.int64(cols))


def palette_to_bf16(
    palette: jax.Array, idx: jax.Array, sm: jax.Array, esc_groups: jax.Array, esc_exp: jax.Array
) -> jax.Array:
    """bf16[*sm.shape] from the palette form (FORMAT.md section 3) of a tensor; `sm` is viewed
    as [R, C] and `idx` is u8[R, ceil(C/2)]."""
    _check("sm", sm, np.uint8)
    rows, cols = as_matrix_shape(tuple(sm.shape))
    _check("palette", palette, np.uint8, (PALETTE_SIZE,))
    _check("idx", idx, np.uint8, (rows, -(-cols // 2)))
    _check("esc_groups", esc_groups, np.uint32, (None,))
    _check("esc_exp", esc_exp, np.uint8, (esc_groups.shape[0], GROUP))
    call = jax.ffi.ffi_call("unweight_palette_to_bf16", jax.ShapeDtypeStruct(sm.shape, jnp.bfloat16), vmap_method=_VMAP)
    return call(palette, idx, sm, esc_groups, esc_exp)


def _check(name: str, x: jax.Array, dtype: type, shape: tuple[int | None, ...] | None = None) -> None:
    """`x` has `dtype` and, if given, `shape` (None: a dimension of any size)."""
    if not hasattr(x, "dtype") or x.dtype != dtype:
        got = getattr(x, "dtype", type(x).__name__)
        raise TypeError(f"{name} must be a {np.dtype(dtype).name} array, got {got}")
    if shape is not None and (
        len(x.shape) != len(shape) or any(want is not None and got != want for got, want in zip(x.shape, shape))
    ):
        expected = "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"
        raise ValueError(f"{name} has shape {list(x.shape)}, expected {expected}")


def _check_stream(words: jax.Array, chunks: jax.Array, lut: jax.Array, n: int, chunk_steps: int) -> None:
    """The static facts of a Huffman stream of `n` elements: dtypes, chunk count, table size."""
    if isinstance(chunk_steps, bool) or not isinstance(chunk_steps, (int, np.integer)) or chunk_steps < 1:
        raise ValueError(f"chunk_steps must be a positive integer, got {chunk_steps!r}")
    if chunk_steps > np.iinfo(np.int32).max:
        raise ValueError(f"chunk_steps {chunk_steps} does not fit the int32 attribute")
    _check("words", words, np.uint16, (None,))
    _check("chunks", chunks, np.uint32, (num_chunks(n, chunk_steps),))
    _check("lut", lut, np.uint16, (None,))
    size = lut.shape[0]
    if size < 1 or size > 1 << MAX_CODE_LEN or size & (size - 1):
        raise ValueError(f"lut has {size} entries; a decoder table has 2^L, L in 0..{MAX_CODE_LEN}")
