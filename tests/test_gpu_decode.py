"""The CUDA decode kernels (ffi/cuda/) against the C++ codec and the numpy reference, bit for bit.

Every op runs through its JAX wrapper under jit. Test ids containing "small" are the cases the
compute-sanitizer run of BUILD.md uses (memcheck and racecheck).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from unweight_jax import codec, reference
from unweight_jax.format import GROUP, HuffmanParts, PaletteParts, as_matrix_shape, join_bf16
from unweight_jax.ops import decode as ops
from unweight_jax.weights import palette_lookup

pytestmark = pytest.mark.gpu

# (shape, chunk_steps): odd and even row lengths, sizes that are not multiples of a chunk, a
# stage (512 elements) or a group, 1-D and 3-D tensors, one-step chunks and the writers' default.
CASES = [
    pytest.param((1,), 512, id="small-1"),
    pytest.param((37,), 1, id="small-37-s1"),
    pytest.param((5, 7, 9), 3, id="small-5x7x9-s3"),
    pytest.param((33, 65), 2, id="small-33x65-s2"),
    pytest.param((64, 130), 16, id="small-64x130-s16"),
    pytest.param((3, 1001), 7, id="small-3x1001-s7"),
    pytest.param((129, 257), 512, id="129x257"),
    pytest.param((96, 4096), 512, id="96x4096"),
    pytest.param((1024, 1000), 100, id="1024x1000-s100"),
    pytest.param((777, 333), 33, id="777x333-s33"),
]


def _gaussian_bits(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """bf16 bit patterns of N(0, sigma) weights (sigma drawn per tensor) with a few arbitrary patterns."""
    rng = np.random.default_rng(seed)
    sigma = 10.0 ** rng.uniform(-3, 0)
    x = (rng.standard_normal(shape, dtype=np.float32) * sigma).astype(ml_dtypes.bfloat16).view(np.uint16)
    wild = rng.random(shape) < 1e-3  # rare exponents: long codes and escape groups
    return np.where(wild, rng.integers(0, 1 << 16, shape, dtype=np.uint16), x)


def _palette_side(bits: np.ndarray) -> tuple[PaletteParts, np.ndarray]:
    """The palette form of `bits` and the symbol -> palette index table of the transcode op."""
    palette = codec.to_palette(bits.view(ml_dtypes.bfloat16))
    n_used = min(np.count_nonzero(np.bincount(((bits >> 7) & 0xFF).ravel(), minlength=256)), len(palette.palette))
    return palette, palette_lookup(palette.palette, n_used)


def _bf16_from_huffman(parts: HuffmanParts) -> np.ndarray:
    run = jax.jit(ops.huffman_to_bf16, static_argnames="chunk_steps")
    out = run(parts.sm, parts.words, parts.chunks, codec.decoder_table(parts), chunk_steps=parts.chunk_steps)
    return np.asarray(out).view(np.uint16)


def _exponents_from_huffman(parts: HuffmanParts) -> np.ndarray:
    run = jax.jit(ops.huffman_to_exponent, static_argnames=("shape", "chunk_steps"))
    lut = codec.decoder_table(parts)
    return np.asarray(run(parts.words, parts.chunks, lut, shape=parts.shape, chunk_steps=parts.chunk_steps))


def _idx_from_huffman(parts: HuffmanParts, sym_to_idx: np.ndarray, esc_groups: np.ndarray) -> np.ndarray:
    run = jax.jit(ops.huffman_to_palette, static_argnames=("shape", "chunk_steps"))
    lut = codec.decoder_table(parts)
    rows_cols = as_matrix_shape(parts.shape)
    return np.asarray(
        run(parts.words, parts.chunks, lut, sym_to_idx, esc_groups, shape=rows_cols, chunk_steps=parts.chunk_steps)
    )


def _bf16_from_palette(p: PaletteParts) -> np.ndarray:
    out = jax.jit(ops.palette_to_bf16)(p.palette, p.idx, p.sm, p.esc_groups, p.esc_exp)
    return np.asarray(out).view(np.uint16)


def _check_all_kernels(bits: np.ndarray, chunk_steps: int) -> None:
    parts = codec.compress(bits, chunk_steps=chunk_steps)
    palette, sym_to_idx = _palette_side(bits)
    np.testing.assert_array_equal(_bf16_from_huffman(parts), bits)
    np.testing.assert_array_equal(_exponents_from_huffman(parts), (bits >> 7).astype(np.uint8))
    np.testing.assert_array_equal(_idx_from_huffman(parts, sym_to_idx, palette.esc_groups), palette.idx)
    np.testing.assert_array_equal(_bf16_from_palette(palette), bits.reshape(palette.sm.shape))


@pytest.mark.parametrize("shape, chunk_steps", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_kernels_match_codec(shape: tuple[int, ...], chunk_steps: int, seed: int) -> None:
    _check_all_kernels(_gaussian_bits(shape, seed), chunk_steps)


@pytest.mark.parametrize("chunk_steps", [4, 512])
def test_small_all_bf16_patterns(chunk_steps: int) -> None:
    """Every bf16 pattern (NaN payloads, infinities, subnormals, -0) in a shuffled 256x256 matrix:
    256 distinct exponents, so nearly every group escapes the palette."""
    bits = np.random.default_rng(7).permutation(np.arange(1 << 16, dtype=np.uint32)).astype(np.uint16)
    bits = bits.reshape(256, 256)
    parts = reference.encode(bits, chunk_steps)
    palette = reference.to_palette(bits)
    n_used = len(palette.palette)
    np.testing.assert_array_equal(_bf16_from_huffman(parts), bits)
    np.testing.assert_array_equal(_exponents_from_huffman(parts), (bits >> 7).astype(np.uint8))
    idx = _idx_from_huffman(parts, palette_lookup(palette.palette, n_used), palette.esc_groups)
    np.testing.assert_array_equal(idx, palette.idx)
    np.testing.assert_array_equal(_bf16_from_palette(palette), bits)


def test_small_every_group_escapes() -> None:
    """32 exponents per group, each row rotated: every group of every row is an escape group."""
    rows, cols = 40, 3 * GROUP + 17
    exponents = (100 + (np.arange(cols)[None, :] + np.arange(rows)[:, None]) % 32).astype(np.uint16)
    signmant = np.random.default_rng(3).integers(0, 1 << 8, (rows, cols), dtype=np.uint16)
    bits = ((signmant & 0x80) << 8 | exponents << 7 | (signmant & 0x7F)).astype(np.uint16)
    palette, _ = _palette_side(bits)
    assert len(palette.esc_groups) == rows * -(-cols // GROUP)
    _check_all_kernels(bits, chunk_steps=8)


def test_small_single_exponent() -> None:
    """One symbol: a one-entry code of length 1 and a one-entry palette."""
    bits = np.full((9, 31), 0x3F80, dtype=np.uint16) | np.arange(9 * 31, dtype=np.uint16).reshape(9, 31) % 128
    _check_all_kernels(bits, chunk_steps=2)


def test_small_vmap() -> None:
    """vmap over the sign+mantissa bytes (one exponent stream) and over palette indices."""
    bits = _gaussian_bits((24, 80), seed=5)
    parts = codec.compress(bits, chunk_steps=4)
    rng = np.random.default_rng(6)
    sms = np.stack([parts.sm, rng.integers(0, 256, parts.sm.shape, dtype=np.uint8), parts.sm[::-1]])
    lut = codec.decoder_table(parts)
    decode = jax.vmap(lambda sm: ops.huffman_to_bf16(sm, parts.words, parts.chunks, lut, chunk_steps=4))
    got = np.asarray(jax.jit(decode)(sms)).view(np.uint16)
    e = (bits >> 7).astype(np.uint8)
    want = np.stack([join_bf16(e, sm) for sm in sms])
    np.testing.assert_array_equal(got, want)

    palette, _ = _palette_side(bits)
    idxs = np.stack([palette.idx, palette.idx[::-1], rng.integers(0, 256, palette.idx.shape, dtype=np.uint8)])
    rebuild = jax.vmap(lambda idx, sm: ops.palette_to_bf16(palette.palette, idx, sm, palette.esc_groups, palette.esc_exp))
    got = np.asarray(jax.jit(rebuild)(idxs, sms)).view(np.uint16)
    want = np.stack(
        [
            reference.from_palette(PaletteParts(palette.shape, palette.palette, idx, sm, palette.esc_groups, palette.esc_exp))
            for idx, sm in zip(idxs, sms)
        ]
    )
    np.testing.assert_array_equal(got, want)


def test_small_corrupt_inputs_stay_in_bounds() -> None:
    """Garbage words, chunk offsets past the stream, invalid table entries and out-of-range escape
    ids give wrong values but no fault: the next decode on the device is still exact."""
    rng = np.random.default_rng(11)
    bits = _gaussian_bits((50, 96), seed=12)
    parts = codec.compress(bits, chunk_steps=2)
    words = rng.integers(0, 1 << 16, parts.words.size // 3, dtype=np.uint16)
    chunks = rng.integers(0, 1 << 32, parts.chunks.size, dtype=np.uint32)
    lut = rng.integers(0, 1 << 16, codec.decoder_table(parts).size, dtype=np.uint16)
    esc = np.array([0, 2**32 - 1, 50 * 2, 50 * 2 - 1], dtype=np.uint32)
    jax.block_until_ready(
        [
            jax.jit(ops.huffman_to_bf16, static_argnames="chunk_steps")(parts.sm, words, chunks, lut, chunk_steps=2),
            jax.jit(ops.huffman_to_palette, static_argnames=("shape", "chunk_steps"))(
                words, chunks, lut, rng.integers(0, 256, 256, dtype=np.uint8), esc, shape=(50, 96), chunk_steps=2
            ),
            jax.jit(ops.palette_to_bf16)(
                rng.integers(0, 256, 16, dtype=np.uint8),
                rng.integers(0, 256, (50, 48), dtype=np.uint8),
                parts.sm,
                esc,
                rng.integers(0, 256, (esc.size, GROUP), dtype=np.uint8),
            ),
        ]
    )
    np.testing.assert_array_equal(_bf16_from_huffman(parts), bits)


def test_small_handler_rejects_inconsistent_buffers() -> None:
    """The CUDA handler's own checks (called without the wrapper, which may check first)."""
    parts = codec.compress(_gaussian_bits((16, 64), seed=13), chunk_steps=4)
    lut = codec.decoder_table(parts)
    out = jax.ShapeDtypeStruct(parts.shape, jnp.bfloat16)
    call = jax.ffi.ffi_call("unweight_huffman_to_bf16", out, vmap_method="sequential")

    def run(chunks: np.ndarray, lut: np.ndarray) -> None:
        decode = jax.jit(lambda sm, words, chunks, lut: call(sm, words, chunks, lut, chunk_steps=np.int32(4)))
        jax.block_until_ready(decode(parts.sm, parts.words, chunks, lut))

    run(parts.chunks, lut)
    with pytest.raises(jax.errors.JaxRuntimeError, match="chunks has"):
        run(parts.chunks[:-1], lut)
    with pytest.raises(jax.errors.JaxRuntimeError, match="lut has"):
        run(parts.chunks, lut[:-1])


@pytest.mark.parametrize("shape", [(4096, 14336), (14336, 4096)])
def test_full_pipeline_dot_is_bit_identical(shape: tuple[int, int]) -> None:
    """Llama-3.1-8B MLP shapes: XLA's dot on the GPU-decoded weight equals its dot on the original."""
    rng = np.random.default_rng(sum(shape))
    w = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    parts = codec.compress(w)
    lut = codec.decoder_table(parts)

    @jax.jit
    def both(x: jax.Array, w: jax.Array, sm: jax.Array, words: jax.Array, chunks: jax.Array, lut: jax.Array):
        decoded = ops.huffman_to_bf16(sm, words, chunks, lut, chunk_steps=parts.chunk_steps)
        return decoded, jnp.dot(x, w.T), jnp.dot(x, decoded.T)

    for batch in (1, 16, 128):
        x = jnp.asarray(rng.standard_normal((batch, shape[1]), dtype=np.float32), dtype=jnp.bfloat16)
        decoded, want, got = both(x, w, parts.sm, parts.words, parts.chunks, lut)
        np.testing.assert_array_equal(np.asarray(decoded).view(np.uint16), w.view(np.uint16))
        np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16))
