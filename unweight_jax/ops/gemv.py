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
| mma_u1 | 5 | as mma_acc4 with 1 group in flight and at most 128 registers: two warps per row tile where the grid allows |
| rows | 6 | fp32 FMA (batch <= 4), one warp per row along its whole length, lanes side by side (each load of a warp is 512 consecutive bytes of a row), 2 steps of 512 columns in flight; C <= 65536 |
| rows2 | 7 | as rows, a warp per 2 rows sharing the reads of x |
| rows_u4 | 8 | as rows, 4 steps in flight |
| stream | 9 | Hopper, tensor cores: a persistent block of a producer warp and 4 consumer warps; the producer moves tiles of 16 rows x 1024 columns into a ring of 4 shared-memory stages, one TMA box (cp.async.bulk.tensor) per array and stage, each consumer warp rebuilds 4 of a stage's 16 groups of 64 columns and multiplies them with mma.sync |
| stream_s3 | 10 | as stream, 3 stages: less shared memory per block, more resident blocks |
| stream_w8 | 11 | as stream, 8 consumer warps of 2 groups each |

In the mma and fma variants the warps of a block split the columns of its rows and the grid is
sized so that every block is resident at once; the rows variants give each warp whole rows. The
register kernels keep their loads in flight in registers, which caps the loads in flight per SM;
the stream variants keep them in flight in shared memory instead (gemv_stream.cuh says why).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..format import GROUP
from . import operands, registry  # noqa: F401  (registry: registers the targets)

__all__ = ["FMA_VARIANTS", "MAX_BATCH", "STREAM_VARIANTS", "VARIANTS", "Variant", "gemv_bf16", "gemv_exponent", "gemv_palette", "supports"]

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
    "mma_u1": Variant(5, "as mma_acc4, 1 group in flight, at most 128 registers"),
    "rows": Variant(6, "fp32 FMA, batch <= 4, a warp per row along its length, 2 steps in flight"),
    "rows2": Variant(7, "as rows, a warp per 2 rows"),
    "rows_u4": Variant(8, "as rows, 4 steps in flight"),
    "stream": Variant(9, "Hopper, tensor cores fed by TMA boxes through 4 shared-memory stages of 16 rows"),
    "stream_s3": Variant(10, "as stream, 3 stages (more resident blocks)"),
    "stream_w8": Variant(11, "as stream, 8 consumer warps of 2 groups of 64 columns each"),
}
ROW_VARIANTS = ("rows", "rows2", "rows_u4")
FMA_VARIANTS = ("fma", *ROW_VARIANTS)
STREAM_VARIANTS = ("stream", "stream_s3", "stream_w8")
_TARGETS = ("unweight_gemv_palette", "unweight_gemv_exponent", "unweight_gemv_bf16")
ROW_MAX_COLS = 32 * 32 * GROUP  # a row's escape mask words, one per lane


def supports(rows: int, cols: int, batch: int, variant: int | str = 0) -> bool:
    """Whether the GEMV kernel `variant` takes y[batch, rows] = x[batch, cols] @ W[rows, cols].T."""
    name = operands.variant_name(VARIANTS, variant)
    if name is None:
        return False
    if name in STREAM_VARIANTS and not registry.hopper_available(_TARGETS):
        return False
    max_batch = _max_batch(name)
    max_cols = ROW_MAX_COLS if name in ROW_VARIANTS else 2**31 - 1
    return rows >= 1 and GROUP <= cols <= max_cols and cols % GROUP == 0 and 1 <= batch <= max_batch and rows < 2**31


def _max_batch(name: str) -> int:
    return FMA_MAX_BATCH if name in FMA_VARIANTS else MAX_BATCH


def gemv_palette(x: jax.Array, w: operands.PaletteOperands, *, variant: int | str = 0) -> jax.Array:
    """x @ W.T for a palette-resident W (FORMAT.md section 3 with its escape index)."""
    return _gemv("unweight_gemv_palette", x, *operands.palette_operands(w), variant)


def gemv_exponent(x: jax.Array, exp: jax.Array, sm: jax.Array, *, variant: int | str = 0) -> jax.Array:
    """x @ W.T for W given as exponent bytes and sign+mantissa bytes, both u8 [R, C]."""
    return _gemv("unweight_gemv_exponent", x, *operands.exponent_operands(exp, sm), variant)


def gemv_bf16(x: jax.Array, w: jax.Array, *, variant: int | str = 0) -> jax.Array:
    """x @ w.T for a plain bf16 w [R, C]: the twin of the fused kernels."""
    return _gemv("unweight_gemv_bf16", x, *operands.bf16_operands(w), variant)


def _gemv(target: str, x: jax.Array, rows: int, cols: int, weight: tuple[jax.Array, ...], variant: int | str) -> jax.Array:
    name = operands.check_x(target, x, rows, cols, VARIANTS, variant)
    batch = int(x.shape[0])
    if not supports(rows, cols, batch, name):
        raise ValueError(
            f"{target}: variant {name!r} does not take batch {batch} with a weight [{rows}, {cols}] "
            f"(batch 1-{_max_batch(name)}, C a positive multiple of {GROUP}"
            + (", a Hopper GPU)" if name in STREAM_VARIANTS else ")")
        )
    # vmap over a batch of weights runs one GEMV per element.
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((batch, rows), jnp.bfloat16), vmap_method="sequential")
    return call(x, *weight, variant=np.int32(VARIANTS[name].id))
