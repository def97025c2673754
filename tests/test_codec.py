"""The C++ codec (`unweight_jax.codec`) against the numpy reference: the same bytes for every
input, bit-exact round trips, and a FormatError (never a crash) for every kind of bad input."""

from __future__ import annotations

import dataclasses
import heapq

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unweight_jax import FormatError, codec, reference
from unweight_jax.format import GROUP, MAX_CODE_LEN, HuffmanParts, as_matrix_shape, split_bf16

BF16 = ml_dtypes.bfloat16
HUFFMAN_FIELDS = ("sm", "words", "chunks", "table")
PALETTE_FIELDS = ("palette", "idx", "sm", "esc_groups", "esc_exp")


# ---------------------------------------------------------------- inputs


def make_bits(shape: tuple[int, ...], kind: str, seed: int) -> np.ndarray:
    """bf16 bit patterns (uint16) of `shape` drawn from one of several exponent distributions."""
    rng = np.random.default_rng(seed)
    if kind == "weights":  # trained-weight-like: ~2.6 bits of exponent entropy
        bits = (rng.standard_normal(shape) * 0.02).astype(BF16).view(np.uint16)
    elif kind == "wide":  # many exponents in use: the palette escapes often
        bits = (rng.standard_normal(shape) * np.exp2(rng.integers(-40, 40, shape))).astype(BF16).view(np.uint16)
    elif kind == "any_bits":  # NaNs, infinities, subnormals: every exponent
        bits = rng.integers(0, 1 << 16, shape, dtype=np.uint16)
    elif kind == "few":  # three exponents, random signs and mantissas
        e = rng.choice(np.array([120, 121, 127], np.uint16), shape)
        bits = (e << 7) | rng.integers(0, 1 << 7, shape, dtype=np.uint16) | (rng.integers(0, 2, shape, np.uint16) << 15)
    else:
        raise ValueError(kind)
    return np.asarray(bits, dtype=np.uint16).reshape(shape)


@st.composite
def shapes(draw: st.DrawFn, max_elements: int = 4000) -> tuple[int, ...]:
    """Shapes of rank 0..3, sides not multiples of 64 or of any chunk size, including empty ones."""
    shape, budget = [], max_elements
    for _ in range(draw(st.integers(0, 3))):
        side = min(draw(st.one_of(st.integers(0, 9), st.integers(60, 200))), budget)
        shape.append(side)
        budget //= max(side, 1)
    return tuple(shape)


def assert_parts_equal(ours: object, ref: object, fields: tuple[str, ...]) -> None:
    for f in fields:
        a, b = getattr(ours, f), getattr(ref, f)
        assert a.dtype == b.dtype, f
        assert a.shape == b.shape, f
        np.testing.assert_array_equal(a, b, err_msg=f)


def assert_huffman_matches_reference(parts: HuffmanParts, bits: np.ndarray, chunk_steps: int) -> None:
    ref = reference.encode(bits, chunk_steps)
    if bits.ndim == 0:  # the reference flattens a 0-d tensor to shape (1,); the bytes are what count
        ref = dataclasses.replace(ref, shape=(), sm=ref.sm.reshape(()))
    assert parts.shape == bits.shape
    assert parts.chunk_steps == chunk_steps
    assert_parts_equal(parts, ref, HUFFMAN_FIELDS)


KINDS = st.sampled_from(["weights", "wide", "any_bits", "few"])
SEEDS = st.integers(0, 2**32 - 1)
CHUNK_STEPS = st.sampled_from([1, 2, 3, 7, 512])
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- byte identity with the reference


@PROPERTY
@given(shape=shapes(), kind=KINDS, seed=SEEDS, chunk_steps=CHUNK_STEPS)
def test_huffman_matches_reference(shape: tuple[int, ...], kind: str, seed: int, chunk_steps: int) -> None:
    bits = make_bits(shape, kind, seed)
    parts = codec.compress(bits, chunk_steps=chunk_steps)
    assert_huffman_matches_reference(parts, bits, chunk_steps)

    out = codec.decompress(parts)
    assert out.dtype == BF16 and out.shape == shape
    np.testing.assert_array_equal(out.view(np.uint16), bits)
    np.testing.assert_array_equal(codec.decode_exponents(parts), split_bf16(bits)[0])
    if bits.size:
        np.testing.assert_array_equal(codec.decoder_table(parts), reference.decode_lut(parts.table))


@PROPERTY
@given(shape=shapes(), kind=KINDS, seed=SEEDS, chunk_steps=CHUNK_STEPS)
def test_palette_matches_reference(shape: tuple[int, ...], kind: str, seed: int, chunk_steps: int) -> None:
    bits = make_bits(shape, kind, seed)
    ref = reference.to_palette(bits)
    ours = codec.to_palette(bits)
    assert ours.shape == shape
    assert_parts_equal(ours, ref, PALETTE_FIELDS)
    transcoded = codec.huffman_to_palette(codec.compress(bits, chunk_steps=chunk_steps))
    assert transcoded.shape == shape
    assert_parts_equal(transcoded, ref, PALETTE_FIELDS)

    out = codec.from_palette(ours)
    assert out.dtype == BF16 and out.shape == shape
    np.testing.assert_array_equal(out.view(np.uint16), bits)


def test_every_bf16_pattern_round_trips() -> None:
    """All 65,536 patterns: NaN payloads, +-inf, subnormals, -0."""
    bits = np.random.default_rng(0).permutation(np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)).reshape(256, 256)
    parts = codec.compress(bits.view(BF16), chunk_steps=16)
    assert_huffman_matches_reference(parts, bits, 16)
    np.testing.assert_array_equal(codec.decompress(parts).view(np.uint16), bits)

    palette = codec.to_palette(bits)
    assert_parts_equal(palette, reference.to_palette(bits), PALETTE_FIELDS)
    assert_parts_equal(codec.huffman_to_palette(parts), palette, PALETTE_FIELDS)
    np.testing.assert_array_equal(codec.from_palette(palette).view(np.uint16), bits)


def test_single_exponent() -> None:
    """One symbol: a table of one row of length 1, one bit per weight, no escape group."""
    bits = make_bits((37, 100), "weights", 1)
    bits = (bits & 0x807F) | (np.uint16(119) << 7)
    parts = codec.compress(bits, chunk_steps=2)
    np.testing.assert_array_equal(parts.table, [[119, 1]])
    assert_huffman_matches_reference(parts, bits, 2)
    np.testing.assert_array_equal(codec.decompress(parts).view(np.uint16), bits)

    palette = codec.to_palette(bits)
    assert len(palette.esc_groups) == 0
    assert_parts_equal(palette, reference.to_palette(bits), PALETTE_FIELDS)
    assert_parts_equal(codec.huffman_to_palette(parts), palette, PALETTE_FIELDS)
    np.testing.assert_array_equal(codec.from_palette(palette).view(np.uint16), bits)


def test_every_group_escapes() -> None:
    """Each 64-element group holds one exponent outside the palette of the 16 most frequent."""
    rows, cols = 9, 150  # 3 groups per row, the last one short
    rng = np.random.default_rng(2)
    e = rng.integers(100, 116, (rows, cols)).astype(np.uint16)  # 16 common exponents
    for g in range(-(-cols // GROUP)):
        e[:, g * GROUP + rng.integers(0, min(GROUP, cols - g * GROUP))] = rng.integers(130, 140, rows)  # rare ones
    bits = (e << 7) | rng.integers(0, 1 << 7, e.shape, dtype=np.uint16)

    palette = codec.to_palette(bits)
    np.testing.assert_array_equal(palette.esc_groups, np.arange(rows * 3))
    assert not palette.idx.any()
    assert_parts_equal(palette, reference.to_palette(bits), PALETTE_FIELDS)
    assert_parts_equal(codec.huffman_to_palette(codec.compress(bits, chunk_steps=3)), palette, PALETTE_FIELDS)
    np.testing.assert_array_equal(codec.from_palette(palette).view(np.uint16), bits)


def unlimited_max_len(counts: np.ndarray) -> int:
    """Longest code of a plain (not length-limited) Huffman code."""
    heap = [(int(c), 0) for c in counts if c]
    heapq.heapify(heap)
    while len(heap) > 1:
        (a, da), (b, db) = heapq.heappop(heap), heapq.heappop(heap)
        heapq.heappush(heap, (a + b, max(da, db) + 1))
    return heap[0][1]


def test_length_limit() -> None:
    """Fibonacci exponent counts: plain Huffman would need 15-bit codes; the table stops at 12."""
    counts = [1, 1]
    while len(counts) < 16:
        counts.append(counts[-1] + counts[-2])
    e = np.repeat(np.arange(100, 116, dtype=np.uint16), counts)
    bits = np.random.default_rng(3).permutation((e << 7) | np.uint16(0x8011))
    assert unlimited_max_len(np.bincount(split_bf16(bits)[0], minlength=256)) > MAX_CODE_LEN

    parts = codec.compress(bits, chunk_steps=4)
    assert parts.max_len == MAX_CODE_LEN
    assert_huffman_matches_reference(parts, bits, 4)
    np.testing.assert_array_equal(codec.decompress(parts).view(np.uint16), bits)


def test_empty_and_zero_d_tensors() -> None:
    for shape in [(0,), (3, 0), (0, 5), ()]:
        bits = make_bits(shape, "weights", 4)
        parts = codec.compress(bits)
        assert parts.shape == shape and parts.sm.shape == shape
        assert len(parts.chunks) == (1 if bits.size else 0)
        assert parts.table.shape == ((1, 2) if bits.size else (0, 2))
        np.testing.assert_array_equal(codec.decompress(parts).view(np.uint16), bits)
        palette = codec.to_palette(bits)
        assert palette.idx.shape == (as_matrix_shape(shape)[0], -(-as_matrix_shape(shape)[1] // 2))
        np.testing.assert_array_equal(codec.from_palette(palette).view(np.uint16), bits)
    np.testing.assert_array_equal(codec.decoder_table(codec.compress(np.zeros(0, np.uint16))), [0])


# ---------------------------------------------------------------- threads


def test_thread_counts_give_identical_bytes() -> None:
    """Large enough for many work blocks of every pass (chunks, groups, histogram ranges)."""
    bits = make_bits((700, 1000), "wide", 5)
    one = codec.compress(bits, chunk_steps=4, threads=1)
    for threads in (2, None):
        assert_parts_equal(codec.compress(bits, chunk_steps=4, threads=threads), one, HUFFMAN_FIELDS)
    np.testing.assert_array_equal(codec.decompress(one, threads=2).view(np.uint16), bits)

    palette = codec.to_palette(bits, threads=1)
    assert len(palette.esc_groups) > 0
    assert_parts_equal(codec.to_palette(bits, threads=2), palette, PALETTE_FIELDS)
    assert_parts_equal(codec.huffman_to_palette(one, threads=2), palette, PALETTE_FIELDS)
    np.testing.assert_array_equal(codec.from_palette(palette, threads=2).view(np.uint16), bits)


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def parts() -> HuffmanParts:
    return codec.compress(make_bits((40, 90), "weights", 6), chunk_steps=2)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_corrupt_words_agree_with_reference(parts: HuffmanParts, data: st.DataObject) -> None:
    """Flipped bits, dropped or added words: FormatError exactly where the reference finds the
    stream corrupt, and otherwise the reference's (wrong) bytes."""
    words = parts.words.copy()
    for _ in range(data.draw(st.integers(1, 4))):
        words[data.draw(st.integers(0, len(words) - 1))] ^= np.uint16(1 << data.draw(st.integers(0, 15)))
    cut = data.draw(st.integers(-3, 3))
    words = words[:cut] if cut < 0 else np.concatenate([words, np.zeros(cut, np.uint16)])
    corrupt = dataclasses.replace(parts, words=words)

    try:
        expected = reference.decode(corrupt)
    except FormatError:
        with pytest.raises(FormatError, match="corrupt Huffman stream: chunk"):
            codec.decompress(corrupt)
    else:
        np.testing.assert_array_equal(codec.decompress(corrupt).view(np.uint16), expected)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_random_streams_agree_with_reference(data: st.DataObject) -> None:
    """Garbage words and chunk offsets under a valid table: FormatError exactly where the
    reference decoder fails, and otherwise its bytes."""
    table = data.draw(st.sampled_from([[[7, 1]], [[3, 1], [9, 2], [200, 2]]]))  # one symbol: code 1 is none
    n = data.draw(st.integers(1, 300))
    chunk_steps = data.draw(st.sampled_from([1, 3, 16]))
    rng = np.random.default_rng(data.draw(SEEDS))
    words = rng.integers(0, 1 << 16, data.draw(st.integers(1, 60)), dtype=np.uint16)
    n_chunks = -(-n // (32 * chunk_steps))
    chunks = np.sort(rng.integers(0, len(words) + 1, n_chunks)).astype(np.uint32)
    chunks[0] = 0
    parts = HuffmanParts((n,), chunk_steps, np.zeros(n, np.uint8), words, chunks, np.array(table, np.uint8))

    try:
        expected = reference.decode_exponents(parts)
    except FormatError:
        with pytest.raises(FormatError, match="corrupt Huffman stream: chunk"):
            codec.decode_exponents(parts)
    else:
        np.testing.assert_array_equal(codec.decode_exponents(parts), expected)


def test_truncated_or_padded_words_fail(parts: HuffmanParts) -> None:
    with pytest.raises(FormatError, match="runs past its words"):
        codec.decompress(dataclasses.replace(parts, words=parts.words[:-1]))
    with pytest.raises(FormatError, match="words unread"):
        codec.decompress(dataclasses.replace(parts, words=np.append(parts.words, np.uint16(0))))
    with pytest.raises(FormatError):
        codec.decompress(dataclasses.replace(parts, words=parts.words[:0]))


def test_flipped_bit_under_single_symbol_code_fails() -> None:
    parts = codec.compress(np.full((3, 50), 0x3F80, np.uint16), chunk_steps=1)  # all 1.0
    words = parts.words.copy()
    words[0] ^= 0x8000  # the first code of lane 0 becomes 1: no code
    with pytest.raises(FormatError, match="not in the table"):
        codec.decompress(dataclasses.replace(parts, words=words))


@pytest.mark.parametrize(
    "table, message",
    [
        ([[5, 1], [5, 1]], "distinct and ascending"),
        ([[9, 1], [5, 1]], "distinct and ascending"),
        ([[5, 0], [9, 1]], "outside 1..12"),
        ([[5, 13], [9, 1]], "outside 1..12"),
        ([[5, 1], [9, 1], [12, 2]], "above 1"),
        ([[5, 1], [9, 2]], "below 1"),
        ([[5, 2]], "single-symbol"),
    ],
)
def test_bad_table_fails(parts: HuffmanParts, table: list, message: str) -> None:
    bad = dataclasses.replace(parts, table=np.array(table, np.uint8))
    with pytest.raises(FormatError, match=message):
        codec.validate(bad)
    with pytest.raises(FormatError, match=message):
        codec.decompress(bad)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p.chunks + np.uint32(1), r"chunks\[0\] is 1"),
        (lambda p: p.chunks[::-1].copy(), "chunks.0. is|decrease"),
        (lambda p: np.where(np.arange(len(p.chunks)) == 5, np.uint32(10**6), p.chunks).astype(np.uint32), "past the"),
        (lambda p: p.chunks[:-1].copy(), "'chunks' has shape"),
        (lambda p: p.chunks.astype(np.int64), "'chunks' must be a uint32"),
    ],
)
def test_bad_chunk_offsets_fail(parts: HuffmanParts, change, message: str) -> None:
    bad = dataclasses.replace(parts, chunks=change(parts))
    with pytest.raises(FormatError, match=message):
        codec.validate(bad)
    with pytest.raises(FormatError, match=message):
        codec.huffman_to_palette(bad)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("sm", np.zeros((40, 91), np.uint8), "'sm' has shape"),
        ("words", np.zeros((2, 3), np.uint16), "'words' has shape"),
        ("words", np.zeros(10, np.int16), "'words' must be a uint16"),
        ("table", np.zeros((3, 3), np.uint8), "'table' has shape"),
        ("table", np.zeros((0, 2), np.uint8), "table has 0 rows"),
        ("chunk_steps", 0, "chunk_steps must be a positive int32"),
        ("chunk_steps", 2**31, "chunk_steps must be a positive int32"),
        ("shape", (40, -90), "not a tensor shape"),
    ],
)
def test_inconsistent_parts_fail(parts: HuffmanParts, field: str, value: object, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        codec.validate(dataclasses.replace(parts, **{field: value}))


def test_bad_palette_parts_fail() -> None:
    bits = make_bits((10, 130), "wide", 7)
    palette = codec.to_palette(bits)
    assert len(palette.esc_groups) > 0
    n_groups = 10 * 3
    with pytest.raises(FormatError, match="is not a group id"):
        codec.from_palette(dataclasses.replace(palette, esc_groups=np.full_like(palette.esc_groups, n_groups)))
    with pytest.raises(FormatError, match="'idx' has shape"):
        codec.from_palette(dataclasses.replace(palette, idx=palette.idx[:, :-1].copy()))
    with pytest.raises(FormatError, match="'esc_exp' has shape"):
        codec.from_palette(dataclasses.replace(palette, esc_exp=palette.esc_exp[:-1].copy()))
    with pytest.raises(FormatError, match="'palette' has shape"):
        codec.from_palette(dataclasses.replace(palette, palette=palette.palette[:8].copy()))


def test_bad_arguments_fail() -> None:
    bits = make_bits((4, 5), "weights", 8)
    for wrong in (bits.astype(np.float32), bits.astype(np.int16), bits.view(np.float16)):
        with pytest.raises(TypeError, match="bfloat16"):
            codec.compress(wrong)
        with pytest.raises(TypeError, match="bfloat16"):
            codec.to_palette(wrong)
    with pytest.raises(ValueError, match="chunk_steps"):
        codec.compress(bits, chunk_steps=0)
    with pytest.raises(ValueError, match="threads"):
        codec.compress(bits, threads=0)


def test_non_contiguous_input() -> None:
    bits = make_bits((30, 80), "weights", 9)
    view = bits.view(BF16)[:, ::3]
    np.testing.assert_array_equal(codec.decompress(codec.compress(view)), view)
    np.testing.assert_array_equal(codec.from_palette(codec.to_palette(view.T)), view.T)
