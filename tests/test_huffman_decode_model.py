"""A lane-by-lane model of the CUDA Huffman decoder, run on the CPU against the reference codec.

The model follows ffi/cuda/huffman_ring.cuh (the shared-memory ring with its mirrored tail),
huffman_lane.cuh (one step: the predicated refill in `buf`/`shift` form, the table index as the
high word of buf * 2^L) and huffman_core.cuh (16-step stages, the partial last stage, the block's
table with lengths above L marked invalid), with the kernels' constants read from those headers.
It checks what the GPU cannot show cheaply: every word a refilling lane takes is the stream word
FORMAT.md 2.3 gives it, every shared-memory index stays inside its array and the window, each
chunk consumes exactly its words, and the exponents equal the reference's, for any chunk_steps.
"""

from __future__ import annotations

import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from unweight_jax import codec, reference
from unweight_jax.format import LANES, MAX_CODE_LEN, WORD_BITS

CUDA = Path(__file__).resolve().parents[1] / "ffi" / "cuda"
MASK32 = (1 << 32) - 1
INT32_MAX = (1 << 31) - 1


def _kernel_constants() -> dict[str, int]:
    """The `constexpr int` constants of the decoder headers, evaluated in order (each is integer
    arithmetic on format constants and earlier ones)."""
    values = {"kLanes": LANES, "kMaxCodeLen": MAX_CODE_LEN}
    for header in ("huffman_ring.cuh", "huffman_core.cuh"):
        for name, expr in re.findall(r"constexpr int (\w+) = ([^;]+);", (CUDA / header).read_text()):
            values[name] = int(eval(expr, {"__builtins__": {}}, dict(values)))
    return values


K = _kernel_constants()
FETCH_WORDS, RING_WORDS = K["kFetchWords"], K["kRingWords"]
WINDOW_WORDS, MIRROR_WORDS, RING_SLOTS = K["kWindowWords"], K["kMirrorWords"], K["kRingSlots"]
STAGE_STEPS, STAGE_ELEMS = K["kStageSteps"], K["kStageElems"]
LANE = np.arange(LANES)


class WarpRing:
    """huffman_ring.cuh: slots hold stream words; `stream_at` remembers which word each slot holds."""

    def __init__(self, words: np.ndarray, start: int, end: int) -> None:
        self.words = np.append(words.astype(np.int64), 0)  # a word to clamp to, even for an empty stream
        self.end = end
        self.slots = np.zeros(RING_SLOTS, dtype=np.int64)
        self.stream_at = np.full(RING_SLOTS, -1, dtype=np.int64)
        self.pos = start
        self.fetched = start & ~7
        first, second = self._fetch(self.fetched), self._fetch(self.fetched + FETCH_WORDS)
        self.next = self._fetch(self.fetched + 2 * FETCH_WORDS)
        self._store(first)
        self._store(second)

    def _fetch(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Words [g, g + FETCH_WORDS) (lane l: 8 from g + 8l), 0 at or past the chunk's end, and their
        stream indices."""
        i = g + 8 * LANE[:, None] + np.arange(8)
        return np.where(i < self.end, self.words[np.minimum(i, len(self.words) - 1)], 0), i

    def _store(self, block: tuple[np.ndarray, np.ndarray]) -> None:
        values, stream_index = block
        slot = (self.fetched + 8 * LANE) & (RING_WORDS - 1)
        for copy in (slot, np.where(slot < MIRROR_WORDS, RING_WORDS + slot, -1)):
            keep = copy >= 0
            target = copy[keep, None] + np.arange(8)
            self.slots[target], self.stream_at[target] = values[keep], stream_index[keep]
        self.fetched += FETCH_WORDS

    def window(self) -> int:
        """The slot of stream word pos; the next WINDOW_WORDS slots hold the next words."""
        while self.fetched - self.pos < WINDOW_WORDS:
            self._store(self.next)
            self.next = self._fetch(self.fetched)
        return self.pos & (RING_WORDS - 1)


class LaneBits:
    """huffman_lane.cuh LaneBits for the 32 lanes."""

    def __init__(self) -> None:
        self.buf = np.zeros(LANES, dtype=np.int64)
        self.shift = np.full(LANES, WORD_BITS, dtype=np.int64)  # 16 - avail


def decode_step(lane: LaneBits, ring: WarpRing, window: int, next_word: int, table: np.ndarray, max_len: int,
                refill_above: np.ndarray) -> tuple[np.ndarray, int]:
    """huffman_lane.cuh decode_step: returns every lane's table entry and the new next_word slot."""
    needs = lane.shift > refill_above
    offset = np.cumsum(needs) - needs  # popc(ballot & lanemask_lt)
    slot = next_word + offset  # every lane loads, as the PTX does
    assert slot.min() >= 0 and slot.max() < RING_SLOTS and (slot - window).max() < WINDOW_WORDS, "word outside the window"
    stream_word = ring.pos + (slot - window)
    assert np.array_equal(ring.stream_at[slot[needs]], stream_word[needs]), "ring slot holds another word"
    word = ring.slots[slot]
    lane.buf = np.where(needs, (lane.buf + (word << np.where(needs, lane.shift, 0))) & MASK32, lane.buf)
    lane.shift = np.where(needs, lane.shift - WORD_BITS, lane.shift)
    index = (lane.buf << max_len) >> 32  # __umulhi(buf, 2^L)
    assert index.max() < len(table)
    entry = table[index]
    length = entry >> 8
    lane.buf = (lane.buf << length) & MASK32
    lane.shift = lane.shift + length
    return entry, next_word + int(needs.sum())


def kernel_table(lut: np.ndarray) -> tuple[np.ndarray, int]:
    """The block's shared table (huffman_core.cuh build_table, symbols unmapped) and L."""
    max_len = int(len(lut)).bit_length() - 1
    lut = lut.astype(np.int64)
    length = np.where(lut >> 8 <= max_len, lut >> 8, 0)
    return length << 8 | (lut & 0xFF), max_len


def decode_chunk(words: np.ndarray, chunks: np.ndarray, table: np.ndarray, max_len: int, n: int, chunk_steps: int,
                 c: int) -> tuple[np.ndarray, int, int]:
    """huffman_core.cuh decode_chunk: chunk c's symbols, the words it consumed and its end offset."""
    m = min(LANES * chunk_steps, n - c * LANES * chunk_steps)
    n_words = len(words)
    start = min(int(chunks[c]), n_words)
    end = max(start, min(int(chunks[c + 1]), n_words)) if c + 1 < len(chunks) else n_words
    ring, lane = WarpRing(words, start, end), LaneBits()
    refill_above = WORD_BITS - max_len
    symbols = np.zeros(m, dtype=np.int64)
    for done in range(0, m, STAGE_ELEMS):
        count = min(STAGE_ELEMS, m - done)
        window = ring.window()
        next_word = window
        for k in range(min(STAGE_STEPS, -(-count // LANES))):
            active = k * LANES + LANE < count
            entry, next_word = decode_step(lane, ring, window, next_word, table, max_len,
                                           np.where(active, refill_above, INT32_MAX))
            symbols[done + k * LANES + LANE[active]] = entry[active] & 0xFF
        ring.pos += next_word - window
    return symbols, ring.pos - start, end


def model_exponents(words: np.ndarray, chunks: np.ndarray, lut: np.ndarray, n: int, chunk_steps: int,
                    check_consumed: bool = True) -> np.ndarray:
    """The exponents of every chunk, decoded as the kernel does; with `check_consumed`, each chunk
    must take exactly its words (FORMAT.md 2.3)."""
    table, max_len = kernel_table(lut)
    out = []
    for c in range(len(chunks)):
        symbols, consumed, end = decode_chunk(words, chunks, table, max_len, n, chunk_steps, c)
        if check_consumed:
            assert consumed == end - int(chunks[c]), f"chunk {c} consumed {consumed} words"
        out.append(symbols)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _gaussian_bits(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """bf16 patterns of N(0, sigma) weights with a few arbitrary patterns (long codes)."""
    rng = np.random.default_rng(seed)
    sigma = 10.0 ** rng.uniform(-3, 0)
    x = (rng.standard_normal(shape, dtype=np.float32) * sigma).astype(ml_dtypes.bfloat16).view(np.uint16)
    wild = rng.random(shape) < 1e-3
    return np.where(wild, rng.integers(0, 1 << 16, shape, dtype=np.uint16), x)


def _check(bits: np.ndarray, chunk_steps: int) -> None:
    parts = codec.compress(bits, chunk_steps=chunk_steps)
    got = model_exponents(parts.words, parts.chunks, codec.decoder_table(parts), parts.size, chunk_steps)
    np.testing.assert_array_equal(got, ((bits >> 7) & 0xFF).ravel())


@pytest.mark.parametrize(
    "shape, chunk_steps",
    [
        ((1,), 512),
        ((37,), 1),
        ((5, 7, 9), 3),
        ((33, 65), 2),
        ((3, 1001), 7),
        ((64, 130), 16),
        ((129, 257), 17),
        ((777, 333), 33),
        ((48, 1024), 512),  # three full 512-step chunks
        ((40, 1000), 600),  # full stages and a partial one inside each chunk
    ],
)
def test_model_matches_reference(shape: tuple[int, ...], chunk_steps: int) -> None:
    _check(_gaussian_bits(shape, seed=sum(shape) + chunk_steps), chunk_steps)


@pytest.mark.parametrize("chunk_steps", [4, 512])
def test_model_all_bf16_patterns(chunk_steps: int) -> None:
    """256 exponents (L = 8 here: every code is short and nearly every lane refills often)."""
    bits = np.random.default_rng(7).permutation(np.arange(1 << 16, dtype=np.uint32)).astype(np.uint16)
    _check(bits.reshape(256, 256), chunk_steps)


def test_model_longest_codes() -> None:
    """Exponent counts halving from one to the next: the JPEG limit makes L = 12 with many 12-bit
    codes, so lanes refill with as few as 0 valid bits left."""
    counts = np.maximum(1, (1 << 15) >> np.arange(40))
    exponents = np.repeat(np.arange(40) + 90, counts)
    exponents = np.random.default_rng(3).permutation(exponents).astype(np.uint16)
    bits = exponents << 7 | np.arange(len(exponents), dtype=np.uint16) % 128
    parts = codec.compress(bits, chunk_steps=512)
    assert parts.max_len == MAX_CODE_LEN
    _check(bits, 512)


def test_model_single_symbol() -> None:
    """One exponent: L = 1, a table of a code `0` and an invalid entry."""
    _check(np.full((9, 31), 0x3F80, dtype=np.uint16), chunk_steps=2)


def test_model_reference_encoder() -> None:
    """The same decoding of the reference encoder's output (the C++ encoder matches it byte for byte)."""
    bits = _gaussian_bits((20, 300), seed=9)
    parts = reference.encode(bits, 5)
    got = model_exponents(parts.words, parts.chunks, reference.decode_lut(parts.table), parts.size, 5)
    np.testing.assert_array_equal(got, reference.decode_exponents(parts).ravel())


@pytest.mark.parametrize("seed", range(4))
def test_model_corrupt_input_stays_in_bounds(seed: int) -> None:
    """Garbage words, chunk offsets past the stream and a garbage table: wrong values, but every
    index the model asserts on stays inside its array."""
    rng = np.random.default_rng(seed)
    bits = _gaussian_bits((50, 96), seed=seed)
    parts = codec.compress(bits, chunk_steps=(2, 512)[seed % 2])
    words = rng.integers(0, 1 << 16, max(1, parts.words.size // 3), dtype=np.uint16)
    chunks = rng.integers(0, 1 << 32, parts.chunks.size, dtype=np.uint64)
    lut = rng.integers(0, 1 << 16, codec.decoder_table(parts).size, dtype=np.uint16)
    model_exponents(words, chunks, lut, parts.size, parts.chunk_steps, check_consumed=False)
