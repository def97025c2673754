"""The decode ops (`unweight_jax.ops.decode`) on the CPU: under jit and vmap they give the C++
codec's bytes; bad data fails the computation with a message, bad shapes fail at trace time."""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from unweight_jax import codec
from unweight_jax.format import HuffmanParts, PaletteParts, split_bf16
from unweight_jax.ops import decode, registry

BF16 = ml_dtypes.bfloat16
CHUNK_STEPS = 3


def weights(shape: tuple[int, ...], seed: int, spread: int = 0) -> np.ndarray:
    """bf16 weights; `spread` widens the exponents so that groups escape the palette."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 0.02 * np.exp2(rng.integers(-spread, spread + 1, shape))
    return np.asarray(x).astype(BF16)


def sym_to_idx(bits: np.ndarray, palette: PaletteParts) -> np.ndarray:
    """Exponent -> palette slot for the slots in use; other exponents map to 0."""
    n_used = min(len(np.unique(split_bf16(bits.view(np.uint16))[0])), 16)
    table = np.zeros(256, np.uint8)
    table[palette.palette[:n_used]] = np.arange(n_used)
    return table


class Case:
    """A tensor in both forms, with the op inputs derived from them."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x
        self.huffman: HuffmanParts = codec.compress(x, chunk_steps=CHUNK_STEPS)
        self.lut = codec.decoder_table(self.huffman)
        self.palette: PaletteParts = codec.to_palette(x)
        self.sym_to_idx = sym_to_idx(x, self.palette)

    def stream(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.huffman.words, self.huffman.chunks, self.lut


SHAPES = [(70, 130), (3, 5, 67), (200,), ()]


@pytest.fixture(autouse=True)
def on_cpu() -> Iterator[None]:
    """The CPU handlers, also on a machine whose default device is a GPU."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


@pytest.fixture(scope="module", params=SHAPES, ids=str)
def case(request: pytest.FixtureRequest) -> Case:
    return Case(weights(request.param, seed=len(request.param), spread=6))


def bits_of(y: jax.Array) -> np.ndarray:
    return np.asarray(y).view(np.uint16)


def test_cpu_targets_registered() -> None:
    assert registry.CPU_TARGETS == {
        "unweight_huffman_to_bf16",
        "unweight_huffman_to_exponent",
        "unweight_huffman_to_palette",
        "unweight_palette_to_bf16",
    }


def test_huffman_to_bf16(case: Case) -> None:
    f = jax.jit(lambda sm, w, c, lut: decode.huffman_to_bf16(sm, w, c, lut, chunk_steps=CHUNK_STEPS))
    y = f(case.huffman.sm, *case.stream())
    assert y.dtype == jnp.bfloat16 and y.shape == case.x.shape
    np.testing.assert_array_equal(bits_of(y), codec.decompress(case.huffman).view(np.uint16))


def test_huffman_to_exponent(case: Case) -> None:
    f = jax.jit(lambda w, c, lut: decode.huffman_to_exponent(w, c, lut, shape=case.x.shape, chunk_steps=CHUNK_STEPS))
    e = f(*case.stream())
    assert e.dtype == jnp.uint8 and e.shape == case.x.shape
    np.testing.assert_array_equal(np.asarray(e), codec.decode_exponents(case.huffman))


def test_huffman_to_palette(case: Case) -> None:
    assert len(case.palette.esc_groups) > 0 or case.x.size < 64

    def f(w, c, lut, s2i, esc):
        return decode.huffman_to_palette(w, c, lut, s2i, esc, shape=case.x.shape, chunk_steps=CHUNK_STEPS)

    idx = jax.jit(f)(*case.stream(), case.sym_to_idx, case.palette.esc_groups)
    assert idx.dtype == jnp.uint8
    expected = codec.huffman_to_palette(case.huffman).idx
    assert idx.shape == expected.shape
    np.testing.assert_array_equal(np.asarray(idx), expected)


def test_palette_to_bf16(case: Case) -> None:
    p = case.palette
    sm = case.huffman.sm  # any leading shape: viewed as [R, C]
    y = jax.jit(decode.palette_to_bf16)(p.palette, p.idx, sm, p.esc_groups, p.esc_exp)
    assert y.dtype == jnp.bfloat16 and y.shape == case.x.shape
    np.testing.assert_array_equal(bits_of(y), codec.from_palette(p).view(np.uint16))


# ---------------------------------------------------------------- vmap


@pytest.fixture(scope="module")
def pair() -> tuple[Case, Case]:
    """Two tensors with different exponent streams of the same word count, as vmap needs equal
    shapes: the second swaps steps 0 and 1 of every chunk (3 steps, all full), which keeps the
    bits each lane codes before its last code, hence its words."""
    first = weights((48, 100), 1, spread=6)
    steps = first.reshape(-1, CHUNK_STEPS, 32)
    second = steps[:, [1, 0, 2]].reshape(first.shape)
    return Case(first), Case(second)


def stacked(*arrays: np.ndarray) -> np.ndarray:
    return np.stack(arrays)


def palette_indices(x: np.ndarray, table: np.ndarray, esc_groups: np.ndarray) -> np.ndarray:
    """FORMAT.md section 3 indices of `x` [R, C] for a given slot table and escape list."""
    rows, cols = x.shape
    nibbles = np.zeros((rows, 2 * -(-cols // 2)), np.uint8)
    nibbles[:, :cols] = table[split_bf16(x.view(np.uint16))[0]]
    groups = -(-cols // 64)
    for gid in esc_groups:
        r, g = divmod(int(gid), groups)
        nibbles[r, g * 64 : min((g + 1) * 64, cols)] = 0
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def test_pair_differs_in_stream_only(pair: tuple[Case, Case]) -> None:
    a, b = pair
    assert not np.array_equal(a.huffman.words, b.huffman.words)
    np.testing.assert_array_equal(a.huffman.chunks, b.huffman.chunks)
    np.testing.assert_array_equal(a.lut, b.lut)


def test_vmap_huffman_to_bf16(pair: tuple[Case, Case]) -> None:
    a, b = pair
    f = jax.jit(jax.vmap(lambda sm, w, c, lut: decode.huffman_to_bf16(sm, w, c, lut, chunk_steps=CHUNK_STEPS)))
    y = f(stacked(a.huffman.sm, b.huffman.sm), *(stacked(u, v) for u, v in zip(a.stream(), b.stream())))
    np.testing.assert_array_equal(bits_of(y), stacked(a.x, b.x).view(np.uint16))
    # one unbatched stream shared by a batch of sign/mantissa bytes
    g = jax.vmap(lambda sm: decode.huffman_to_bf16(sm, *a.stream(), chunk_steps=CHUNK_STEPS))
    sm_flipped = a.huffman.sm ^ np.uint8(0x80)
    expected = stacked(a.x.view(np.uint16), a.x.view(np.uint16) ^ np.uint16(0x8000))
    np.testing.assert_array_equal(bits_of(g(stacked(a.huffman.sm, sm_flipped))), expected)


def test_vmap_huffman_to_exponent(pair: tuple[Case, Case]) -> None:
    a, b = pair
    f = jax.vmap(lambda w, c, lut: decode.huffman_to_exponent(w, c, lut, shape=a.x.shape, chunk_steps=CHUNK_STEPS))
    e = jax.jit(f)(*(stacked(u, v) for u, v in zip(a.stream(), b.stream())))
    expected = stacked(codec.decode_exponents(a.huffman), codec.decode_exponents(b.huffman))
    np.testing.assert_array_equal(np.asarray(e), expected)


def test_vmap_huffman_to_palette(pair: tuple[Case, Case]) -> None:
    a, b = pair
    assert len(a.palette.esc_groups) > 0
    f = jax.vmap(
        lambda w, c, lut, s2i, esc: decode.huffman_to_palette(
            w, c, lut, s2i, esc, shape=a.x.shape, chunk_steps=CHUNK_STEPS
        ),
        in_axes=(0, 0, 0, None, None),
    )
    idx = jax.jit(f)(*(stacked(u, v) for u, v in zip(a.stream(), b.stream())), a.sym_to_idx, a.palette.esc_groups)
    np.testing.assert_array_equal(np.asarray(idx[0]), a.palette.idx)
    np.testing.assert_array_equal(np.asarray(idx[1]), palette_indices(b.x, a.sym_to_idx, a.palette.esc_groups))


def test_vmap_palette_to_bf16(pair: tuple[Case, Case]) -> None:
    a, _ = pair
    p = a.palette
    flipped = p.sm ^ np.uint8(0x80)  # a batch of sign/mantissa bytes over one set of indices
    y = jax.jit(jax.vmap(decode.palette_to_bf16, in_axes=(None, None, 0, None, None)))(
        p.palette, p.idx, stacked(p.sm, flipped), p.esc_groups, p.esc_exp
    )
    x = a.x.view(np.uint16)
    np.testing.assert_array_equal(bits_of(y), stacked(x, x ^ np.uint16(0x8000)))
    both = jax.vmap(decode.palette_to_bf16)(*(stacked(part, part) for part in (p.palette, p.idx, p.sm, p.esc_groups, p.esc_exp)))
    np.testing.assert_array_equal(bits_of(both), stacked(x, x))


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def plain() -> Case:
    return Case(weights((40, 100), 2, spread=6))


def test_corrupt_stream_fails_the_computation(plain: Case) -> None:
    words, chunks, lut = plain.stream()
    with pytest.raises(Exception, match="unweight_huffman_to_bf16: corrupt Huffman stream: chunk .* runs past"):
        jax.block_until_ready(decode.huffman_to_bf16(plain.huffman.sm, words[:-1], chunks, lut, chunk_steps=CHUNK_STEPS))
    bad_chunks = chunks.copy()
    bad_chunks[-1] = len(words) + 1
    with pytest.raises(Exception, match="unweight_huffman_to_exponent: .* is past the"):
        jax.block_until_ready(
            decode.huffman_to_exponent(words, bad_chunks, lut, shape=plain.x.shape, chunk_steps=CHUNK_STEPS)
        )
    bad_lut = lut.copy()
    bad_lut[0] = 13 << 8
    with pytest.raises(Exception, match="unweight_huffman_to_bf16: decoder table entry 0 has length 13"):
        jax.block_until_ready(decode.huffman_to_bf16(plain.huffman.sm, words, chunks, bad_lut, chunk_steps=CHUNK_STEPS))


def test_escape_id_out_of_range_fails_the_computation(plain: Case) -> None:
    p = plain.palette
    n_groups = 40 * 2
    esc = np.full_like(p.esc_groups, n_groups)
    with pytest.raises(Exception, match="unweight_palette_to_bf16: esc_groups.* is not a group id"):
        jax.block_until_ready(decode.palette_to_bf16(p.palette, p.idx, p.sm, esc, p.esc_exp))
    with pytest.raises(Exception, match="unweight_huffman_to_palette: esc_groups.* is not a group id"):
        jax.block_until_ready(
            decode.huffman_to_palette(
                *plain.stream(), plain.sym_to_idx, esc, shape=plain.x.shape, chunk_steps=CHUNK_STEPS
            )
        )


def test_bad_shapes_fail_at_trace_time(plain: Case) -> None:
    words, chunks, lut = plain.stream()
    sm = plain.huffman.sm
    with pytest.raises(TypeError, match="sm must be a uint8"):
        decode.huffman_to_bf16(sm.astype(np.int8), words, chunks, lut, chunk_steps=CHUNK_STEPS)
    with pytest.raises(ValueError, match="chunks has shape"):
        decode.huffman_to_bf16(sm, words, chunks, lut, chunk_steps=CHUNK_STEPS + 1)
    with pytest.raises(ValueError, match="lut has 3 entries"):
        decode.huffman_to_exponent(words, chunks, lut[:3], shape=sm.shape, chunk_steps=CHUNK_STEPS)
    with pytest.raises(ValueError, match="sym_to_idx has shape"):
        decode.huffman_to_palette(
            words, chunks, lut, plain.sym_to_idx[:16], plain.palette.esc_groups, shape=sm.shape, chunk_steps=CHUNK_STEPS
        )
    p = plain.palette
    with pytest.raises(ValueError, match="idx has shape"):
        decode.palette_to_bf16(p.palette, p.idx[:, :-1], p.sm, p.esc_groups, p.esc_exp)
