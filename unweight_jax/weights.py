"""Compressed weights as JAX pytrees: what a layer holds on the device, one type per resident form.

Each type is a `flax.struct.dataclass` whose leaves are plain arrays and whose layout facts
(shape, chunk size) are static, so a compressed weight goes through `jit`, `nnx.split`/`merge`
and sharding like any array. Which pipelines a form can feed (DESIGN.md section 3):

| type | resident in HBM | pipelines |
|---|---|---|
| `HuffmanWeight` | Huffman stream + sign/mantissa bytes (~10.7 bits/weight) | full, exponent |
| `TranscodeWeight` | the same + palette side tables (escape groups) | full, exponent, transcode |
| `PaletteWeight` | 4-bit palette indices + sign/mantissa + escapes (~12 bits) | palette, palette-full |
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .format import FORMS, GROUP, HuffmanParts, PaletteParts, as_matrix_shape

ESC_WORD_BITS = 32


def escape_index(esc_groups: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row bitmask of escape groups and the slot of each mask word's first escape.

    The slot of escape group (r, g) in `esc_exp` is
    `esc_prefix[r, g // 32] + popc(esc_mask[r, g // 32] & ((1 << (g % 32)) - 1))`:
    one bit per 64 weights, so a kernel tests a group with one load and no search.
    """
    groups = -(-cols // GROUP)
    words = -(-groups // ESC_WORD_BITS)
    esc_groups = np.asarray(esc_groups, dtype=np.int64)
    if esc_groups.size and (esc_groups.max() >= rows * groups or np.any(np.diff(esc_groups) <= 0)):
        raise ValueError(f"escape group ids must be ascending and below {rows * groups}")
    flags = np.zeros((rows, words * ESC_WORD_BITS), dtype=bool)
    r, g = np.divmod(esc_groups, groups)
    flags[r, g] = True
    bits = flags.reshape(rows, words, ESC_WORD_BITS).astype(np.uint64) << np.arange(ESC_WORD_BITS, dtype=np.uint64)
    mask = bits.sum(axis=-1).astype(np.uint32)
    counts = flags.reshape(rows, words, ESC_WORD_BITS).sum(axis=-1).reshape(-1)
    prefix = (np.cumsum(counts) - counts).astype(np.uint32).reshape(rows, words)
    return mask, prefix


def palette_lookup(palette: np.ndarray, n_used: int) -> np.ndarray:
    """symbol -> palette index for the first `n_used` palette entries; other symbols map to 0."""
    table = np.zeros(256, dtype=np.uint8)
    table[palette[:n_used]] = np.arange(n_used, dtype=np.uint8)
    return table


@struct.dataclass
class HuffmanWeight:
    """Huffman-resident weight (FORMAT.md section 2): decoded on the fly by the full/exponent pipelines."""

    sm: jax.Array  # u8 [*shape]
    words: jax.Array  # u16 [n_words]
    chunks: jax.Array  # u32 [n_chunks]
    lut: jax.Array  # u16 [2^L], entry = (len << 8) | symbol
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    chunk_steps: int = struct.field(pytree_node=False)

    @classmethod
    def from_parts(cls, parts: HuffmanParts) -> HuffmanWeight:
        from .reference import decode_lut  # the table is tiny; one definition of it

        lut = decode_lut(parts.table) if len(parts.table) else np.zeros(1, np.uint16)
        return cls(
            sm=jnp.asarray(parts.sm),
            words=jnp.asarray(parts.words),
            chunks=jnp.asarray(parts.chunks),
            lut=jnp.asarray(lut),
            shape=tuple(parts.shape),
            chunk_steps=parts.chunk_steps,
        )

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (self.sm, self.words, self.chunks, self.lut))


@struct.dataclass
class PaletteWeight:
    """Palette-resident weight (FORMAT.md section 3) plus the kernels' escape index."""

    palette: jax.Array  # u8 [16]
    idx: jax.Array  # u8 [R, ceil(C/2)]
    sm: jax.Array  # u8 [R, C]
    esc_groups: jax.Array  # u32 [n_esc], flat group ids
    esc_mask: jax.Array  # u32 [R, ceil(G/32)]
    esc_prefix: jax.Array  # u32 [R, ceil(G/32)]
    esc_exp: jax.Array  # u8 [n_esc, 64]
    shape: tuple[int, ...] = struct.field(pytree_node=False)

    @classmethod
    def from_parts(cls, parts: PaletteParts) -> PaletteWeight:
        rows, cols = as_matrix_shape(parts.shape)
        mask, prefix = escape_index(parts.esc_groups, rows, cols)
        return cls(
            palette=jnp.asarray(parts.palette),
            idx=jnp.asarray(parts.idx),
            sm=jnp.asarray(parts.sm.reshape(rows, cols)),
            esc_groups=jnp.asarray(parts.esc_groups),
            esc_mask=jnp.asarray(mask),
            esc_prefix=jnp.asarray(prefix),
            esc_exp=jnp.asarray(parts.esc_exp),
            shape=tuple(parts.shape),
        )

    @property
    def nbytes(self) -> int:
        return sum(
            int(a.nbytes)
            for a in (self.palette, self.idx, self.sm, self.esc_groups, self.esc_mask, self.esc_prefix, self.esc_exp)
        )


@struct.dataclass
class ExponentWeight:
    """Exponent bytes and sign/mantissa bytes side by side: the `exponent` pipeline's matmul input."""

    exp: jax.Array  # u8 [R, C]
    sm: jax.Array  # u8 [R, C]
    shape: tuple[int, ...] = struct.field(pytree_node=False)


@struct.dataclass
class TranscodeWeight:
    """Huffman-resident weight with the palette side tables, for the `transcode` pipeline.

    The 4-bit indices are rebuilt from the Huffman stream at every call; the escape groups are
    few (0.3-1.7 % of groups on real weights) and stay resident verbatim.
    """

    huffman: HuffmanWeight
    palette: jax.Array  # u8 [16]
    sym_to_idx: jax.Array  # u8 [256]
    esc_groups: jax.Array  # u32 [n_esc]
    esc_mask: jax.Array
    esc_prefix: jax.Array
    esc_exp: jax.Array  # u8 [n_esc, 64]

    @classmethod
    def from_parts(cls, huffman: HuffmanParts, palette: PaletteParts) -> TranscodeWeight:
        rows, cols = as_matrix_shape(huffman.shape)
        mask, prefix = escape_index(palette.esc_groups, rows, cols)
        n_used = min(len(huffman.table), len(palette.palette))
        return cls(
            huffman=HuffmanWeight.from_parts(huffman),
            palette=jnp.asarray(palette.palette),
            sym_to_idx=jnp.asarray(palette_lookup(palette.palette, n_used)),
            esc_groups=jnp.asarray(palette.esc_groups),
            esc_mask=jnp.asarray(mask),
            esc_prefix=jnp.asarray(prefix),
            esc_exp=jnp.asarray(palette.esc_exp),
        )

    @property
    def shape(self) -> tuple[int, ...]:
        return self.huffman.shape

    @property
    def nbytes(self) -> int:
        side = (self.palette, self.sym_to_idx, self.esc_groups, self.esc_mask, self.esc_prefix, self.esc_exp)
        return self.huffman.nbytes + sum(int(a.nbytes) for a in side)


CompressedWeight = HuffmanWeight | PaletteWeight | TranscodeWeight | ExponentWeight


def from_huffman(parts: HuffmanParts, form: str) -> CompressedWeight:
    """The device weight of a resident `form` built from a tensor's Huffman parts, on the host,
    one tensor at a time (the bf16 matrix is never materialised for the Huffman forms)."""
    from . import codec

    if form == "huffman":
        return HuffmanWeight.from_parts(parts)
    if form == "transcode":
        return TranscodeWeight.from_parts(parts, codec.huffman_to_palette(parts))
    if form == "palette":
        return PaletteWeight.from_parts(codec.huffman_to_palette(parts))
    if form == "exponent":
        rows, cols = as_matrix_shape(parts.shape)
        exp = codec.decode_exponents(parts).reshape(rows, cols)
        return ExponentWeight(exp=jnp.asarray(exp), sm=jnp.asarray(parts.sm.reshape(rows, cols)), shape=parts.shape)
    raise ValueError(f"unknown resident form {form!r}; expected one of {FORMS}")
