"""Argument checks shared by the fused-matmul families (`gemv`, `gemm`): each takes the same
weight operands, in the same order, and a variant named or numbered in its own table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from ..format import GROUP, PALETTE_SIZE
from ..weights import ESC_WORD_BITS


class PaletteOperands(Protocol):
    """What the fused palette kernels read of a weight: a `weights.PaletteWeight`, or one device's
    shard of a tensor-parallel weight (`sharding.PaletteShard`)."""

    palette: jax.Array  # u8 [16]
    idx: jax.Array  # u8 [R, C/2]
    sm: jax.Array  # u8 [R, C]
    esc_mask: jax.Array  # u32 [R, ceil(G/32)]
    esc_prefix: jax.Array  # u32 [R, ceil(G/32)]
    esc_exp: jax.Array  # u8 [escapes, 64]
    shape: tuple[int, ...]


def variant_name(variants: Mapping[str, Any], variant: int | str) -> str | None:
    """The name of `variant` (a name, or an id of `variants`' entries), or None if unknown."""
    if isinstance(variant, (int, np.integer)):
        return next((name for name, v in variants.items() if v.id == int(variant)), None)
    return variant if variant in variants else None


def check_x(op: str, x: jax.Array, rows: int, cols: int, variants: Mapping[str, Any], variant: int | str) -> str:
    """Checks the activations x [batch, C] and the variant against W [rows, cols]; returns the
    variant's name."""
    name = variant_name(variants, variant)
    if name is None:
        raise ValueError(f"{op}: unknown variant {variant!r}; known: {', '.join(variants)} (ids 0-{len(variants) - 1})")
    if x.ndim != 2 or x.dtype != jnp.bfloat16:
        raise ValueError(f"{op}: x must be bf16 [batch, C], got {x.dtype} {tuple(x.shape)}")
    if x.shape[1] != cols:
        raise ValueError(f"{op}: x has {x.shape[1]} columns, the weight [{rows}, {cols}] expects {cols}")
    return name


def palette_operands(w: PaletteOperands) -> tuple[int, int, tuple[jax.Array, ...]]:
    """(rows, cols, operands) of a palette-resident W, in the kernels' order: palette, idx, sm,
    esc_mask, esc_prefix, esc_exp (FORMAT.md section 3 with its escape index)."""
    rows, cols = _matrix(w.shape, "w")
    words = -(-cols // GROUP // ESC_WORD_BITS)
    sm = w.sm.reshape(rows, cols)
    _check_array("w.palette", w.palette, np.uint8, (PALETTE_SIZE,))
    _check_array("w.idx", w.idx, np.uint8, (rows, cols // 2))
    _check_array("w.sm", sm, np.uint8, (rows, cols))
    _check_array("w.esc_mask", w.esc_mask, np.uint32, (rows, words))
    _check_array("w.esc_prefix", w.esc_prefix, np.uint32, (rows, words))
    _check_array("w.esc_exp", w.esc_exp, np.uint8, (None, GROUP))
    return rows, cols, (w.palette, w.idx, sm, w.esc_mask, w.esc_prefix, w.esc_exp)


def exponent_operands(exp: jax.Array, sm: jax.Array) -> tuple[int, int, tuple[jax.Array, ...]]:
    """(rows, cols, (exp, sm)) of W given as exponent and sign+mantissa bytes, both u8 [R, C]."""
    rows, cols = _matrix(tuple(sm.shape), "sm")
    _check_array("exp", exp, np.uint8, (rows, cols))
    _check_array("sm", sm, np.uint8, (rows, cols))
    return rows, cols, (exp, sm)


def bf16_operands(w: jax.Array) -> tuple[int, int, tuple[jax.Array, ...]]:
    """(rows, cols, (w,)) of a plain bf16 W [R, C]: the twin's input."""
    rows, cols = _matrix(tuple(w.shape), "w")
    _check_array("w", w, jnp.bfloat16, (rows, cols))
    return rows, cols, (w,)


def _matrix(shape: tuple[int, ...], name: str) -> tuple[int, int]:
    if len(shape) != 2:
        raise ValueError(f"{name} must be a matrix [R, C], got shape {shape}")
    return int(shape[0]), int(shape[1])


def _check_array(name: str, a: jax.Array, dtype: Any, shape: tuple[int | None, ...]) -> None:
    if a.dtype != dtype or a.ndim != len(shape) or any(s is not None and d != s for d, s in zip(a.shape, shape)):
        want = "[" + ", ".join("n" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must be {np.dtype(dtype).name} {want}, got {a.dtype} {tuple(a.shape)}")
