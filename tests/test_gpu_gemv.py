"""The GEMV family (unweight_jax.ops.gemv, ffi/cuda/gemv.cu).

On a CUDA GPU: for every variant, the palette and exponent kernels equal their bf16 twin bit for
bit (their proof of losslessness) on the Llama-3.1-8B shapes, odd batches, row counts that are
not a multiple of 16, matrices full of escape groups and several seeds; the twin is within the
fp32-accumulation bound of XLA's own dot; no NaN. On any machine: `supports` and the argument
checks of the wrappers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from unweight_jax import codec
from unweight_jax.format import split_bf16
from unweight_jax.ops import gemv, registry
from unweight_jax.weights import PaletteWeight

LLAMA_8B = [(14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096)]  # gate/up, down, q/o, k/v
SMALL = [(37, 64), (100, 192), (300, 640), (16, 4096)]  # partial tiles, few steps, leftover steps
MMA = [name for name in gemv.VARIANTS if name not in gemv.FMA_VARIANTS + gemv.STREAM_VARIANTS]
FMA = list(gemv.FMA_VARIANTS)
STREAM = list(gemv.STREAM_VARIANTS)  # Hopper only


def batches_for(variant: str, mma: tuple[int, ...], fma: tuple[int, ...], stream: tuple[int, ...]) -> tuple[int, ...]:
    return fma if variant in FMA else stream if variant in STREAM else mma


def needs_hopper(variant: str) -> None:
    if variant in STREAM and not any(d.compute_capability == "9.0" for d in jax.devices("gpu")):
        pytest.skip("the stream variants need a Hopper GPU")


def weight_bits(rows: int, cols: int, seed: int, exponent_spread: int = 0) -> np.ndarray:
    """bf16 bit patterns [rows, cols]: N(0, 0.02) like trained weights (about 0.5 % escape
    groups); with `exponent_spread`, exponents uniform over that many values below 2^0, so that
    nearly every group of 64 holds one outside any 16-entry palette."""
    rng = np.random.default_rng(seed)
    if exponent_spread:
        mant = rng.uniform(1.0, 2.0, (rows, cols)).astype(np.float32)
        scale = np.exp2(-rng.integers(1, exponent_spread + 1, (rows, cols))).astype(np.float32)
        w = np.where(rng.random((rows, cols)) < 0.5, -mant, mant) * scale
    else:
        w = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)
    return w.astype(ml_dtypes.bfloat16).view(np.uint16)


class Forms:
    """One weight in the three forms the kernels read."""

    def __init__(self, bits: np.ndarray):
        self.bits = bits
        self.bf16 = jnp.asarray(bits.view(ml_dtypes.bfloat16))
        self.palette = PaletteWeight.from_parts(codec.to_palette(bits))
        exp, sm = split_bf16(bits)
        self.exp, self.sm = jnp.asarray(exp), jnp.asarray(sm)


@functools.cache
def forms(rows: int, cols: int, seed: int = 0, exponent_spread: int = 0) -> Forms:
    return Forms(weight_bits(rows, cols, seed, exponent_spread))


def activations(batch: int, cols: int, seed: int) -> jax.Array:
    x = np.random.default_rng(seed).standard_normal((batch, cols), dtype=np.float32)
    return jnp.asarray(x.astype(ml_dtypes.bfloat16))


def bits_of(y: jax.Array) -> np.ndarray:
    return np.asarray(y).view(np.uint16)


def check_against_xla(x: jax.Array, w: jax.Array, y: jax.Array, *, on_host: bool = False) -> None:
    """|y - ref| <= 2^-22 K S + 2^-7 max(|y|, |ref|), ref = XLA's dot rounded to bf16 (`on_host`:
    the product in float64 by numpy, rounded to bf16, so that no cuBLAS kernel runs: racecheck
    then sees only ours).

    Both sides sum the same exact products (bf16 x bf16 fits fp32) in fp32 (float64 on the host),
    in different orders: each sum is off the exact one by at most K 2^-23 S (S = sum |x_k w_k|;
    2^-23 allows for truncating adders), so they differ by at most 2^-22 K S; rounding each to
    bf16 moves it by at most half a bf16 ulp, 2^-8 of its magnitude."""
    if on_host:
        x64, w64 = (np.asarray(a, np.float64) for a in (x, w))
        ref = (x64 @ w64.T).astype(np.float32).astype(ml_dtypes.bfloat16)
        s = np.abs(x64) @ np.abs(w64).T
    else:
        ref = jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
        s = jnp.dot(jnp.abs(x).astype(jnp.float32), jnp.abs(w).T.astype(jnp.float32))
    y, ref, s = (np.asarray(a, dtype=np.float64) for a in (y, ref, s))
    assert not np.isnan(y).any()
    k = x.shape[1]
    tol = 2.0**-22 * k * s * 1.001 + 2.0**-7 * np.maximum(np.abs(y), np.abs(ref)) + 2.0**-133
    bad = np.abs(y - ref) > tol
    assert not bad.any(), f"{bad.sum()} of {bad.size} outputs beyond the bound, e.g. {y[bad][:4]} vs {ref[bad][:4]}"
    assert np.linalg.norm(y - ref) <= 1e-2 * np.linalg.norm(ref)


def run_all(f: Forms, x: jax.Array, variant: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    return (
        gemv.gemv_palette(x, f.palette, variant=variant),
        gemv.gemv_exponent(x, f.exp, f.sm, variant=variant),
        gemv.gemv_bf16(x, f.bf16, variant=variant),
    )


def check_case(f: Forms, batch: int, variant: str, seed: int = 0, *, on_host: bool = False) -> None:
    rows, cols = f.bits.shape
    x = activations(batch, cols, seed)
    palette, exponent, twin = run_all(f, x, variant)
    assert twin.shape == (batch, rows) and twin.dtype == jnp.bfloat16
    np.testing.assert_array_equal(bits_of(palette), bits_of(twin))
    np.testing.assert_array_equal(bits_of(exponent), bits_of(twin))
    check_against_xla(x, f.bf16, twin, on_host=on_host)


# ------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("variant", MMA)
@pytest.mark.parametrize("batch", [1, 5, 9, 16])
@pytest.mark.parametrize("shape", LLAMA_8B)
def test_mma_llama_shapes(shape: tuple[int, int], batch: int, variant: str) -> None:
    check_case(forms(*shape), batch, variant, seed=batch)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", FMA)
@pytest.mark.parametrize("batch", [1, 3, 4])
@pytest.mark.parametrize("shape", LLAMA_8B[:2])
def test_fma_llama_shapes(shape: tuple[int, int], batch: int, variant: str) -> None:
    check_case(forms(*shape), batch, variant, seed=batch)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", STREAM)
@pytest.mark.parametrize("batch", [1, 5, 9, 16])
@pytest.mark.parametrize("shape", LLAMA_8B)
def test_stream_llama_shapes(shape: tuple[int, int], batch: int, variant: str) -> None:
    """Gate/up: 896 tiles of 16 rows, several per persistent block; down: 28 stages per row."""
    needs_hopper(variant)
    check_case(forms(*shape), batch, variant, seed=batch)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", MMA + FMA + STREAM)
@pytest.mark.parametrize("shape", SMALL)
def test_small_shapes_odd_batches(shape: tuple[int, int], variant: str) -> None:
    """Also the compute-sanitizer set (BUILD.md): the reference is computed on the host."""
    needs_hopper(variant)
    for batch in batches_for(variant, (1, 2, 3, 7, 8, 9, 15, 16), (1, 2, 3, 4), (1, 2, 3, 8, 9, 16)):
        check_case(forms(*shape, seed=batch), batch, variant, seed=batch, on_host=True)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", MMA + FMA + STREAM)
@pytest.mark.parametrize("shape", [(4096, 4096), (300, 640)])
def test_escape_groups_everywhere(shape: tuple[int, int], variant: str) -> None:
    """The stream kernels hold 2 escape groups of a row per stage and read the others from
    global memory: here nearly all 8 of every stage are escapes."""
    needs_hopper(variant)
    f = forms(*shape, seed=7, exponent_spread=24)
    groups = shape[0] * shape[1] // 64
    assert f.palette.esc_exp.shape[0] > 0.9 * groups
    for batch in batches_for(variant, (1, 7, 16), (1, 3), (1, 7, 16)):
        check_case(f, batch, variant, seed=batch)


@pytest.mark.gpu
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_random_seeds(seed: int) -> None:
    f = forms(1024, 4096, seed=seed)
    for variant in MMA + FMA + STREAM:
        needs_hopper(variant)
        check_case(f, 3, variant, seed=seed)


@pytest.mark.gpu
def test_under_jit_and_vmap() -> None:
    stack = [forms(100, 192, seed=s) for s in (1, 2)]
    x = activations(4, 192, 0)
    exp, sm = jnp.stack([f.exp for f in stack]), jnp.stack([f.sm for f in stack])
    got = jax.jit(jax.vmap(lambda e, s: gemv.gemv_exponent(x, e, s)))(exp, sm)
    for i, f in enumerate(stack):
        np.testing.assert_array_equal(bits_of(got[i]), bits_of(jax.jit(gemv.gemv_palette)(x, f.palette)))


@pytest.mark.gpu
def test_handler_rejects_a_malformed_escape_index() -> None:
    f = forms(100, 192)
    x = activations(2, 192, 0)
    call = jax.ffi.ffi_call("unweight_gemv_palette", jax.ShapeDtypeStruct((2, 100), jnp.bfloat16))
    w = f.palette
    with pytest.raises(Exception, match="esc_mask"):
        jax.block_until_ready(
            call(x, w.palette, w.idx, w.sm, w.esc_mask[:50], w.esc_prefix, w.esc_exp, variant=np.int32(0))
        )


# ------------------------------------------------------------------------------------ any machine


def test_supports() -> None:
    assert gemv.supports(14336, 4096, 1) and gemv.supports(4096, 14336, 16)
    assert gemv.supports(37, 64, 16, "mma_rows32")
    assert gemv.supports(1024, 4096, 4, "fma") and not gemv.supports(1024, 4096, 5, "fma")
    assert gemv.supports(1024, 4096, 16, "mma_u1") and not gemv.supports(1024, 4096, 5, "rows")
    assert gemv.supports(64, 65536, 4, "rows") and not gemv.supports(64, 65600, 4, "rows")
    assert not gemv.supports(4096, 4096, 17)
    assert not gemv.supports(4096, 4096, 0)
    assert not gemv.supports(64, 172, 1)  # stories260K's MLP: C not a multiple of 64
    assert not gemv.supports(0, 64, 1)
    assert not gemv.supports(64, 64, 1, "no_such_variant") and not gemv.supports(64, 64, 1, 99)
    hopper = registry.hopper_available(["unweight_gemv_palette"])
    assert gemv.supports(4096, 14336, 16, "stream") == hopper and not gemv.supports(4096, 14336, 17, "stream")


def test_wrappers_check_their_arguments() -> None:
    f = Forms(weight_bits(32, 128, 0))
    x = activations(2, 128, 0)
    with pytest.raises(ValueError, match="unknown variant"):
        gemv.gemv_palette(x, f.palette, variant="fast")
    with pytest.raises(ValueError, match="batch 17"):
        gemv.gemv_bf16(activations(17, 128, 0), f.bf16)
    with pytest.raises(ValueError, match="batch 5"):
        gemv.gemv_exponent(activations(5, 128, 0), f.exp, f.sm, variant="fma")
    with pytest.raises(ValueError, match="x must be bf16"):
        gemv.gemv_bf16(x.astype(jnp.float32), f.bf16)
    with pytest.raises(ValueError, match="columns"):
        gemv.gemv_bf16(activations(2, 64, 0), f.bf16)
    with pytest.raises(ValueError, match="exp must be uint8"):
        gemv.gemv_exponent(x, f.exp[:16], f.sm)
    odd = Forms(weight_bits(8, 96, 0))
    with pytest.raises(ValueError, match="multiple of 64"):
        gemv.gemv_bf16(activations(1, 96, 0), odd.bf16)
