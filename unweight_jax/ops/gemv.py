"""The GEMV family of fused matmuls (ffi/cuda/gemv.cu): `y = x @ W.T` for batches of 1 to 16.

`x` is bf16 [B, C], `W` is [R, C] in a resident form, `y` is bf16 [B, R], accumulated in fp32.
At these batches a step is pure weight traffic, so the kernels read the weight compressed and
rebuild bf16 in registers; `gemv_bf16` is the same kernels reading plain bf16, the twin against
which the fused ones are checked bit for bit (their proof of losslessness).

CUDA only (there is no CPU handler): callers check `supports` and fall back to decode + XLA's dot.
The `variant` attribute picks the compiled kernel:

| variant | id | kernel |
|---|---|---|
| mma | 0 | tensor cores (mma.sync m16n8k16, fp32 accumulate): a warp takes 16 rows, 4 groups of 64 columns of each in flight per lane; x read straight into the B fragments |
| mma_rows32 | 1 | tensor cores: a warp takes 32 rows sharing x's fragments, 2 groups of 64 columns in flight |
| fma | 2 | fp32 FMA (batch <= 4): a warp takes 16 rows, 4 groups in flight; every lane reads x |
| mma_acc4 | 3 | as mma, the four mma of a step into four accumulators: four short dependent chains instead of one |
| mma_u2_acc4 | 4 | as mma_acc4 with 2 groups in flight: fewer registers, more resident warps |

In all of them the warps of a block split the columns of its rows, and the grid is sized so
that every block is resident at once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..format import GROUP, PALETTE_SIZE
from ..weights import ESC_WORD_BITS, PaletteWeight
from . import registry  # noqa: F401  (registers the targets)

__all__ = ["MAX_BATCH", "VARIANTS", "Variant", "gemv_bf16", "gemv_exponent", "gemv_palette", "supports"]

MAX_BATCH = 16
FMA_MAX_BATCH = 4


class Variant(NamedTuple):
    id: int
    description: str


VARIANTS: dict[str, Variant] = {
    "mma": Variant(0, "tensor cores, 16 rows per warp, 4 groups of 64 columns in flight"),
    "mma_rows32": Variant(1, "tensor cores, 32 rows per warp sharing x, 2 groups in flight"),
    "fma": Variant(2, "fp32 FMA, batch <= 4, 16 rows per warp, 4 groups in flight"),
    "mma_acc4": Variant(3, "as mma, four independent accumulators (shorter mma chains)"),
    "mma_u2_acc4": Variant(4, "as mma_acc4, 2 groups in flight (fewer registers)"),
}
_BY_ID = {v.id: name for name, v in VARIANTS.items()}


def supports(rows: int, cols: int, batch: int, variant: int | str = 0) -> bool:
    """Whether the GEMV kernel `variant` takes y[batch, rows] = x[batch, cols] @ W[rows, cols].T."""
    name = _variant_name(variant)
    if name is None:
        return False
    max_batch = FMA_MAX_BATCH if name == "fma" else MAX_BATCH
    return rows >= 1 and cols >= GROUP and cols % GROUP == 0 and 1 <= batch <= max_batch and rows < 2**31


def gemv_palette(x: jax.Array, w: PaletteWeight, *, variant: int | str = 0) -> jax.Array:
    """x @ W.T for a palette-resident W (FORMAT.md section 3 with its escape index)."""
    rows, cols = _matrix(w.shape, "w")
    vid = _check("gemv_palette", x, rows, cols, variant)
    _check_array("w.palette", w.palette, np.uint8, (PALETTE_SIZE,))
    _check_array("w.idx", w.idx, np.uint8, (rows, cols // 2))
    words = -(-cols // GROUP // ESC_WORD_BITS)
    _check_array("w.esc_mask", w.esc_mask, np.uint32, (rows, words))
    _check_array("w.esc_prefix", w.esc_prefix, np.uint32, (rows, words))
    _check_array("w.esc_exp", w.esc_exp, np.uint8, (None, GROUP))
    sm = w.sm.reshape(rows, cols)
    _check_array("w.sm", sm, np.uint8, (rows, cols))
    call = _call("unweight_gemv_palette", x.shape[0], rows)
    return call(x, w.palette, w.idx, sm, w.esc_mask, w.esc_prefix, w.esc_exp, variant=np.int32(vid))


def gemv_exponent(x: jax.Array, exp: jax.Array, sm: jax.Array, *, variant: int | str = 0) -> jax.Array:
    """x @ W.T for W given as exponent bytes and sign+mantissa bytes, both u8 [R, C]."""
    rows, cols = _matrix(tuple(sm.shape), "sm")
    vid = _check("gemv_exponent", x, rows, cols, variant)
    _check_array("exp", exp, np.uint8, (rows, cols))
    _check_array("sm", sm, np.uint8, (rows, cols))
    return _call("unweight_gemv_exponent", x.shape[0], rows)(x, exp, sm, variant=np.int32(vid))


def gemv_bf16(x: jax.Array, w: jax.Array, *, variant: int | str = 0) -> jax.Array:
    """x @ w.T for a plain bf16 w [R, C]: the twin of the fused kernels."""
    rows, cols = _matrix(tuple(w.shape), "w")
    vid = _check("gemv_bf16", x, rows, cols, variant)
    _check_array("w", w, jnp.bfloat16, (rows, cols))
    return _call("unweight_gemv_bf16", x.shape[0], rows)(x, w, variant=np.int32(vid))


def _variant_name(variant: int | str) -> str | None:
    if isinstance(variant, (int, np.integer)):
        return _BY_ID.get(int(variant))
    return variant if variant in VARIANTS else None


def _call(target: str, batch: int, rows: int):
    # vmap over a batch of weights runs one GEMV per element.
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((batch, rows), jnp.bfloat16), vmap_method="sequential")


def _matrix(shape: tuple[int, ...], name: str) -> tuple[int, int]:
    if len(shape) != 2:
        raise ValueError(f"{name} must be a matrix [R, C], got shape {shape}")
    return int(shape[0]), int(shape[1])


def _check(op: str, x: jax.Array, rows: int, cols: int, variant: int | str) -> int:
    """Validates x and the variant against W [rows, cols]; returns the variant id."""
    name = _variant_name(variant)
    if name is None:
        raise ValueError(f"{op}: unknown variant {variant!r}; known: {', '.join(VARIANTS)} (ids 0-{len(VARIANTS) - 1})")
    if x.ndim != 2 or x.dtype != jnp.bfloat16:
        raise ValueError(f"{op}: x must be bf16 [batch, C], got {x.dtype} {tuple(x.shape)}")
    batch = int(x.shape[0])
    if x.shape[1] != cols:
        raise ValueError(f"{op}: x has {x.shape[1]} columns, the weight [{rows}, {cols}] expects {cols}")
    if not supports(rows, cols, batch, name):
        raise ValueError(
            f"{op}: variant {name!r} does not take batch {batch} with a weight [{rows}, {cols}] "
            f"(batch 1-{FMA_MAX_BATCH if name == 'fma' else MAX_BATCH}, C a positive multiple of {GROUP})"
        )
    return VARIANTS[name].id


def _check_array(name: str, a: jax.Array, dtype, shape: tuple[int | None, ...]) -> None:
    if a.dtype != dtype or a.ndim != len(shape) or any(s is not None and d != s for d, s in zip(a.shape, shape)):
        want = "[" + ", ".join("n" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must be {np.dtype(dtype).name} {want}, got {a.dtype} {tuple(a.shape)}")
