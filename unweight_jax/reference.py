"""The reference codec: docs/FORMAT.md transcribed into plain numpy.

Short and slow on purpose. The fast C++ codec (`unweight_jax.codec`) must produce the same bytes;
the tests hold the two against each other. Nothing here is used on a hot path.
"""

from __future__ import annotations

import numpy as np

from .format import (
    DEFAULT_CHUNK_STEPS,
    GROUP,
    LANES,
    MAX_CODE_LEN,
    PALETTE_SIZE,
    WORD_BITS,
    FormatError,
    HuffmanParts,
    PaletteParts,
    as_matrix_shape,
    join_bf16,
    split_bf16,
)


# ---------------------------------------------------------------- code lengths (section 2.1)


def code_lengths(counts: np.ndarray) -> np.ndarray:
    """Length-limited Huffman code lengths for 256 symbol counts (0 = symbol unused)."""
    counts = np.asarray(counts, dtype=np.int64)
    used = sorted((int(counts[s]), s) for s in range(256) if counts[s] > 0)
    lengths = np.zeros(256, dtype=np.int64)
    if not used:
        return lengths
    if len(used) == 1:
        lengths[used[0][1]] = 1
        return lengths

    # Two-queue Huffman: leaves sorted by (count, symbol); merged nodes in creation order.
    leaves = [(c, ("leaf", s)) for c, s in used]
    merged: list[tuple[int, tuple]] = []
    li = mi = 0

    def take() -> tuple[int, tuple]:
        nonlocal li, mi
        if li < len(leaves) and (mi >= len(merged) or leaves[li][0] <= merged[mi][0]):
            li += 1
            return leaves[li - 1]
        mi += 1
        return merged[mi - 1]

    for _ in range(len(used) - 1):
        a, b = take(), take()
        merged.append((a[0] + b[0], ("node", a[1], b[1])))

    depth = {}
    stack = [(merged[-1][1], 0)]
    while stack:
        node, d = stack.pop()
        if node[0] == "leaf":
            depth[node[1]] = d
        else:
            stack.append((node[1], d + 1))
            stack.append((node[2], d + 1))

    maxlen = max(depth.values())
    bits = [0] * (max(maxlen, MAX_CODE_LEN) + 1)
    for d in depth.values():
        bits[d] += 1
    for i in range(maxlen, MAX_CODE_LEN, -1):  # JPEG Annex K.3
        while bits[i] > 0:
            j = i - 2
            while bits[j] == 0:
                j -= 1
            bits[i] -= 2
            bits[i - 1] += 1
            bits[j + 1] += 2
            bits[j] -= 1

    by_frequency = sorted(used, key=lambda cs: (-cs[0], cs[1]))
    ladder = [length for length in range(1, MAX_CODE_LEN + 1) for _ in range(bits[length])]
    for (_, s), length in zip(by_frequency, ladder):
        lengths[s] = length
    return lengths


def canonical_codes(table: np.ndarray) -> dict[int, tuple[int, int]]:
    """symbol -> (code, length) for a table of (symbol, length) rows."""
    rows = sorted((int(length), int(s)) for s, length in table)
    codes = {}
    code, prev_len = 0, rows[0][0] if rows else 0
    for i, (length, s) in enumerate(rows):
        if i:
            code = (code + 1) << (length - prev_len)
        codes[s] = (code, length)
        prev_len = length
    return codes


def decode_lut(table: np.ndarray) -> np.ndarray:
    """The 2^L decoder table: entry = (len << 8) | symbol; 0 marks a code not in the table."""
    max_len = int(table[:, 1].max())
    lut = np.zeros(1 << max_len, dtype=np.uint16)
    for s, (code, length) in canonical_codes(table).items():
        lo = code << (max_len - length)
        lut[lo : lo + (1 << (max_len - length))] = (length << 8) | s
    return lut


# ---------------------------------------------------------------- Huffman encode / decode


def encode(bits: np.ndarray, chunk_steps: int = DEFAULT_CHUNK_STEPS) -> HuffmanParts:
    """bf16 bit patterns (uint16, any shape) -> Huffman parts."""
    bits = np.asarray(bits, dtype=np.uint16, order="C")
    shape = tuple(bits.shape)
    e, sm = split_bf16(bits.reshape(-1))
    lengths = code_lengths(np.bincount(e, minlength=256))
    table = np.array([(s, lengths[s]) for s in range(256) if lengths[s]], dtype=np.uint8).reshape(-1, 2)
    if e.size == 0:
        return HuffmanParts(shape, chunk_steps, sm.reshape(shape), np.zeros(0, np.uint16), np.zeros(0, np.uint32), table)
    codes = canonical_codes(table)
    max_len = int(table[:, 1].max())

    per_chunk = LANES * chunk_steps
    words: list[int] = []
    chunk_starts: list[int] = []
    for base in range(0, e.size, per_chunk):
        chunk = e[base : base + per_chunk]
        chunk_starts.append(len(words))
        lane_words = [_lane_words([codes[int(s)] for s in chunk[lane::LANES]]) for lane in range(LANES)]
        lane_next = [0] * LANES
        avail = [0] * LANES
        for k in range(-(-chunk.size // LANES)):
            active = range(min(LANES, chunk.size - k * LANES))
            for lane in active:
                if avail[lane] < max_len:
                    i = lane_next[lane]
                    words.append(lane_words[lane][i] if i < len(lane_words[lane]) else 0)
                    lane_next[lane] += 1
                    avail[lane] += WORD_BITS
            for lane in active:
                avail[lane] -= codes[int(chunk[k * LANES + lane])][1]
    return HuffmanParts(
        shape, chunk_steps, sm.reshape(shape), np.array(words, np.uint16), np.array(chunk_starts, np.uint32), table
    )


def _lane_words(codes: list[tuple[int, int]]) -> list[int]:
    """Concatenate codes MSB first and cut into 16-bit words, the last padded with zeros."""
    acc, nbits, out = 0, 0, []
    for code, length in codes:
        acc = (acc << length) | code
        nbits += length
        while nbits >= WORD_BITS:
            nbits -= WORD_BITS
            out.append((acc >> nbits) & 0xFFFF)
            acc &= (1 << nbits) - 1
    if nbits:
        out.append((acc << (WORD_BITS - nbits)) & 0xFFFF)
    return out


def decode_exponents(parts: HuffmanParts) -> np.ndarray:
    """Huffman parts -> exponent bytes (flat). Raises ValueError on a corrupt stream."""
    n = parts.sm.size
    out = np.zeros(n, dtype=np.uint8)
    if n == 0:
        return out
    lut = decode_lut(parts.table)
    max_len = parts.max_len
    per_chunk = LANES * parts.chunk_steps
    words = parts.words
    for c, base in enumerate(range(0, n, per_chunk)):
        m = min(per_chunk, n - base)
        w = int(parts.chunks[c])
        end = int(parts.chunks[c + 1]) if c + 1 < len(parts.chunks) else len(words)
        buf = [0] * LANES
        avail = [0] * LANES
        for k in range(-(-m // LANES)):
            active = range(min(LANES, m - k * LANES))
            for lane in active:
                if avail[lane] < max_len:
                    if w >= end:
                        raise FormatError(f"corrupt Huffman stream: chunk {c} runs past its words")
                    buf[lane] |= int(words[w]) << (WORD_BITS - avail[lane])
                    avail[lane] += WORD_BITS
                    w += 1
            for lane in active:
                entry = int(lut[buf[lane] >> (32 - max_len)])
                length = entry >> 8
                if length == 0:
                    raise FormatError(f"corrupt Huffman stream: chunk {c} holds a code not in the table")
                out[base + k * LANES + lane] = entry & 0xFF
                buf[lane] = (buf[lane] << length) & 0xFFFFFFFF
                avail[lane] -= length
        if w != end:
            raise FormatError(f"corrupt Huffman stream: chunk {c} leaves {end - w} words unread")
    return out


def decode(parts: HuffmanParts) -> np.ndarray:
    """Huffman parts -> bf16 bit patterns (uint16, the tensor's shape)."""
    return join_bf16(decode_exponents(parts), parts.sm.reshape(-1)).reshape(parts.shape)


# ---------------------------------------------------------------- palette (section 3)


def choose_palette(e: np.ndarray) -> np.ndarray:
    counts = np.bincount(e.reshape(-1), minlength=256)
    ranked = sorted((s for s in range(256) if counts[s]), key=lambda s: (-counts[s], s))[:PALETTE_SIZE]
    palette = np.zeros(PALETTE_SIZE, dtype=np.uint8)
    palette[: len(ranked)] = sorted(ranked)
    return palette


def to_palette(bits: np.ndarray) -> PaletteParts:
    """bf16 bit patterns -> palette parts."""
    bits = np.asarray(bits, dtype=np.uint16)
    shape = tuple(bits.shape)
    rows, cols = as_matrix_shape(shape)
    e, sm = split_bf16(bits.reshape(rows, cols))
    palette = choose_palette(e)
    n_used = int(np.count_nonzero(np.bincount(e.reshape(-1), minlength=256)))
    index_of = np.full(256, -1, dtype=np.int64)
    index_of[palette[: min(n_used, PALETTE_SIZE)]] = np.arange(min(n_used, PALETTE_SIZE))

    groups = -(-cols // GROUP)
    nib = index_of[e]  # -1 where the exponent is not in the palette
    esc_groups, esc_exp = [], []
    for r in range(rows):
        for g in range(groups):
            seg = slice(g * GROUP, min((g + 1) * GROUP, cols))
            if (nib[r, seg] < 0).any():
                esc_groups.append(r * groups + g)
                verbatim = np.zeros(GROUP, np.uint8)
                verbatim[: seg.stop - seg.start] = e[r, seg]
                esc_exp.append(verbatim)
                nib[r, seg] = 0
    padded = np.zeros((rows, 2 * (-(-cols // 2))), dtype=np.uint8)
    padded[:, :cols] = nib
    idx = (padded[:, 0::2] | (padded[:, 1::2] << 4)).astype(np.uint8)
    return PaletteParts(
        shape,
        palette,
        idx,
        sm,
        np.array(esc_groups, dtype=np.uint32),
        np.array(esc_exp, dtype=np.uint8).reshape(-1, GROUP),
    )


def from_palette(parts: PaletteParts) -> np.ndarray:
    """Palette parts -> bf16 bit patterns."""
    rows, cols = as_matrix_shape(parts.shape)
    nib = np.stack([parts.idx & 0xF, parts.idx >> 4], axis=-1).reshape(rows, -1)[:, :cols]
    e = parts.palette[nib]
    groups = -(-cols // GROUP)
    for gid, verbatim in zip(parts.esc_groups, parts.esc_exp):
        r, g = divmod(int(gid), groups)
        seg = slice(g * GROUP, min((g + 1) * GROUP, cols))
        e[r, seg] = verbatim[: seg.stop - seg.start]
    return join_bf16(e, parts.sm).reshape(parts.shape)
