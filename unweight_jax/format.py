"""Format v1 constants and the host-side containers of a compressed tensor (docs/FORMAT.md).

`HuffmanParts` (distribution form) and `PaletteParts` (inference form) hold numpy arrays exactly
as the format defines them; both codecs (`reference`, `codec`) produce and consume them, and the
bundle stores `HuffmanParts`. Device-side weights are built from them in `unweight_jax.weights`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORMAT_VERSION = 1
LANES = 32
MAX_CODE_LEN = 12
WORD_BITS = 16
GROUP = 64
PALETTE_SIZE = 16
DEFAULT_CHUNK_STEPS = 512

# Resident forms of a compressed tensor on the device (`unweight_jax.weights` builds them).
FORMS = ("huffman", "transcode", "palette", "exponent")


class FormatError(ValueError):
    """Compressed data that does not follow the format (corrupt, truncated or inconsistent)."""


def as_matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The [R, C] view of a tensor of any rank (FORMAT.md section 1)."""
    if len(shape) == 0:
        return 1, 1
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return rows, int(shape[-1])


def num_chunks(n: int, chunk_steps: int) -> int:
    per_chunk = LANES * chunk_steps
    return -(-n // per_chunk)


@dataclass(frozen=True)
class HuffmanParts:
    """The Huffman form of one tensor (FORMAT.md section 2.4)."""

    shape: tuple[int, ...]
    chunk_steps: int
    sm: np.ndarray  # uint8, `shape`
    words: np.ndarray  # uint16 [n_words]
    chunks: np.ndarray  # uint32 [n_chunks]
    table: np.ndarray  # uint8 [k, 2]: (symbol, length) rows sorted by symbol

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def max_len(self) -> int:
        return int(self.table[:, 1].max()) if len(self.table) else 0

    @property
    def nbytes(self) -> int:
        """Bytes of all parts: what the tensor costs on disk, before container overhead."""
        return self.sm.nbytes + self.words.nbytes + self.chunks.nbytes + self.table.nbytes


@dataclass(frozen=True)
class PaletteParts:
    """The palette form of one tensor (FORMAT.md section 3)."""

    shape: tuple[int, ...]
    palette: np.ndarray  # uint8 [16], ascending; unused slots 0
    idx: np.ndarray  # uint8 [R, ceil(C/2)], low nibble = even column
    sm: np.ndarray  # uint8 [R, C]
    esc_groups: np.ndarray  # uint32 [n_esc], flat group ids r * G + g, ascending
    esc_exp: np.ndarray  # uint8 [n_esc, 64], verbatim exponents

    @property
    def nbytes(self) -> int:
        return self.palette.nbytes + self.idx.nbytes + self.sm.nbytes + self.esc_groups.nbytes + self.esc_exp.nbytes


def split_bf16(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint16 bf16 patterns -> (exponent bytes, sign+mantissa bytes)."""
    bits = np.asarray(bits).astype(np.uint16, copy=False)
    e = ((bits >> 7) & 0xFF).astype(np.uint8)
    sm = (((bits >> 8) & 0x80) | (bits & 0x7F)).astype(np.uint8)
    return e, sm


def join_bf16(e: np.ndarray, sm: np.ndarray) -> np.ndarray:
    """(exponent bytes, sign+mantissa bytes) -> uint16 bf16 patterns."""
    e = e.astype(np.uint16)
    sm = sm.astype(np.uint16)
    return (((sm & 0x80) << 8) | (e << 7) | (sm & 0x7F)).astype(np.uint16)


def exponent_entropy_bits(bits: np.ndarray) -> float:
    """Shannon entropy of the exponent bytes in bits per element; the size bound is 8 + this."""
    e, _ = split_bf16(np.asarray(bits).reshape(-1))
    if e.size == 0:
        return 0.0
    p = np.bincount(e, minlength=256) / e.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())
