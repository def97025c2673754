"""The tensor-core family of fused matmuls for Hopper (ffi/cuda/gemm_sm90.cu): `y = x @ W.T` at
batches where the product is compute-bound (about 32 and up).

`x` is bf16 [B, C], `W` is [R, C] in a resident form, `y` is bf16 [B, R], accumulated in fp32.
The kernel computes y^T = W x^T so that the weight is WGMMA's A operand: a producer warpgroup
streams compressed 128 x 64 weight tiles and x tiles into shared memory with TMA, two consumer
warpgroups rebuild the bf16 weight in registers and multiply it with the x tile held in shared
memory. Each weight tile is rebuilt once per block and used for the block's whole batch tile.
`gemm_bf16` is the same kernel reading plain bf16, the twin against which the fused ones are
checked bit for bit (their proof of losslessness).

CUDA on Hopper (sm_90a) only; there is no CPU handler: callers check `supports` and fall back to
decode + XLA's dot. The `variant` attribute picks the compiled kernel:

| variant | id | kernel |
|---|---|---|
| n256_s4 | 0 | tiles of 128 weight rows x 256 batch rows, 4-stage TMA ring (large batches) |
| n128_s6 | 1 | tiles of 128 x 128, 6 stages (batches up to ~128, where half of a 256 tile would idle) |
| n256_s3 | 2 | tiles of 128 x 256, 3 stages |
| n64_s8 | 3 | tiles of 128 x 64, 8 stages (batches up to 64: half the WGMMA work and x bytes of a 128 tile) |

When there are too few output tiles to fill the GPU (a 4096-row weight at small batch), the
reduction dimension is split (`splits_for`): each split writes fp32 partials and a second kernel
adds them in split order, so results never depend on scheduling, and fused and twin split alike.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import operands, registry

__all__ = ["VARIANTS", "Variant", "gemm_bf16", "gemm_exponent", "gemm_palette", "splits_for", "supports"]

TILE_M = 128  # weight rows per tile
TILE_K = 64  # columns per k-block (one escape group)
# Output tiles the split-K choice aims for: Hopper parts have 114-132 SMs, one CTA each.
TARGET_TILES = 128
MIN_KBLOCKS_PER_SPLIT = 8  # a split shorter than this costs more in partials than it gains


class Variant(NamedTuple):
    id: int
    tile_n: int
    stages: int
    description: str


VARIANTS: dict[str, Variant] = {
    "n256_s4": Variant(0, 256, 4, "128 x 256 tiles, 4-stage TMA ring: large batches"),
    "n128_s6": Variant(1, 128, 6, "128 x 128 tiles, 6 stages: batches up to ~128"),
    "n256_s3": Variant(2, 256, 3, "128 x 256 tiles, 3 stages"),
    "n64_s8": Variant(3, 64, 8, "128 x 64 tiles, 8 stages: batches up to 64"),
}
_TARGETS = ("unweight_gemm_palette", "unweight_gemm_exponent", "unweight_gemm_bf16")


def supports(rows: int, cols: int, batch: int, variant: int | str = 0) -> bool:
    """Whether the GEMM kernel `variant` takes y[batch, rows] = x[batch, cols] @ W[rows, cols].T
    here: a Hopper GPU, the CUDA build, rows a multiple of 128 and cols a multiple of 64."""
    return operands.variant_name(VARIANTS, variant) is not None and _shape_ok(rows, cols, batch) and registry.hopper_available(_TARGETS)


def splits_for(rows: int, cols: int, batch: int, variant: int | str = 0) -> int:
    """K ranges per output tile: 1 when the output tiles alone fill the GPU, else enough splits
    (of at least MIN_KBLOCKS_PER_SPLIT k-blocks each) to reach about TARGET_TILES tiles."""
    name = operands.variant_name(VARIANTS, variant)
    if name is None:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    tiles = (rows // TILE_M) * -(-batch // VARIANTS[name].tile_n)
    kblocks = cols // TILE_K
    if tiles * 4 >= TARGET_TILES * 3:
        return 1
    splits = max(1, min(-(-TARGET_TILES // tiles), kblocks // MIN_KBLOCKS_PER_SPLIT))
    per_split = -(-kblocks // splits)
    return -(-kblocks // per_split)  # no split left empty


def gemm_palette(x: jax.Array, w: operands.PaletteOperands, *, variant: int | str = 0) -> jax.Array:
    """x @ W.T for a palette-resident W (FORMAT.md section 3 with its escape index)."""
    return _run("unweight_gemm_palette", x, *operands.palette_operands(w), variant)


def gemm_exponent(x: jax.Array, exp: jax.Array, sm: jax.Array, *, variant: int | str = 0) -> jax.Array:
    """x @ W.T for W given as exponent bytes and sign+mantissa bytes, both u8 [R, C]."""
    return _run("unweight_gemm_exponent", x, *operands.exponent_operands(exp, sm), variant)


def gemm_bf16(x: jax.Array, w: jax.Array, *, variant: int | str = 0) -> jax.Array:
    """x @ w.T for a plain bf16 w [R, C]: the twin of the fused kernels."""
    return _run("unweight_gemm_bf16", x, *operands.bf16_operands(w), variant)


def _run(target: str, x: jax.Array, rows: int, cols: int, weight: tuple[jax.Array, ...], variant: int | str) -> jax.Array:
    name = operands.check_x(target, x, rows, cols, VARIANTS, variant)
    batch = int(x.shape[0])
    if not _shape_ok(rows, cols, batch):
        raise ValueError(
            f"{target}: the kernel does not take a weight [{rows}, {cols}] at batch {batch} "
            f"(rows a positive multiple of {TILE_M}, columns a positive multiple of {TILE_K}, batch >= 1)"
        )
    vid = VARIANTS[name].id
    splits = splits_for(rows, cols, batch, vid)
    partials = (splits, batch, rows) if splits > 1 else (0,)
    call = jax.ffi.ffi_call(
        target,
        (jax.ShapeDtypeStruct((batch, rows), jnp.bfloat16), jax.ShapeDtypeStruct(partials, jnp.float32)),
        vmap_method="sequential",  # vmap over a batch of weights runs one GEMM per element
    )
    y, _ = call(x, *weight, variant=np.int32(vid), splits=np.int32(splits))
    return y


def _shape_ok(rows: int, cols: int, batch: int) -> bool:
    return rows >= TILE_M and rows % TILE_M == 0 and cols >= TILE_K and cols % TILE_K == 0 and 1 <= batch < 2**30
