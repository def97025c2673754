"""CPU checks of the GEMV kernels' register layout (ffi/cuda/gemv_fragment.cuh) and escape index
math (format.h `escape_slot`): the very C++ the kernels run, compiled here for the host, against
numpy and the reference codec; and the mma fragment assignment of gemv.cu, emulated lane by lane.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from unweight_jax import reference
from unweight_jax.format import GROUP, split_bf16
from unweight_jax.weights import ESC_WORD_BITS, escape_index

REPO = Path(__file__).resolve().parents[1]

SHIM = r"""
#include <cstddef>
#include "gemv_fragment.cuh"
using namespace unweight;
extern "C" {
// Four weights at a time: exponent and sign+mantissa bytes -> (even, odd) pair words.
void join_pairs(const uint32_t* e4, const uint32_t* sm4, size_t n, uint32_t* out) {
  for (size_t i = 0; i < n; ++i) {
    const gemv::PairWords p = gemv::join_bf16_pairs(e4[i], sm4[i]);
    out[2 * i] = p.even;
    out[2 * i + 1] = p.odd;
  }
}
// Four bf16 values at a time, as (c0, c1), (c2, c3) words -> (even, odd) pair words.
void bf16_pairs(const uint32_t* w, size_t n, uint32_t* out) {
  for (size_t i = 0; i < n; ++i) {
    const gemv::PairWords p = gemv::bf16_pairs(w[2 * i], w[2 * i + 1]);
    out[2 * i] = p.even;
    out[2 * i + 1] = p.odd;
  }
}
uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t sel) { return gemv::byte_perm(a, b, sel); }
uint32_t escape_slot(uint32_t mask, uint32_t prefix, uint32_t bit) { return unweight::escape_slot(mask, prefix, bit); }
}
"""

U32P = np.ctypeslib.ndpointer(np.uint32, flags="C_CONTIGUOUS")


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("needs a C++ compiler to build the host shim")
    d = tmp_path_factory.mktemp("gemv_shim")
    (d / "shim.cc").write_text(SHIM)
    lib = d / "libshim.so"
    include = [f"-I{REPO / 'ffi' / 'include'}", f"-I{REPO / 'ffi' / 'cuda'}"]
    command = [cxx, "-std=c++17", "-O1", "-shared", "-fPIC", *include, str(d / "shim.cc"), "-o", str(lib)]
    subprocess.run(command, check=True)
    so = ctypes.CDLL(str(lib))
    so.join_pairs.argtypes = [U32P, U32P, ctypes.c_size_t, U32P]
    so.bf16_pairs.argtypes = [U32P, ctypes.c_size_t, U32P]
    for f in (so.byte_perm, so.escape_slot):
        f.argtypes = [ctypes.c_uint32] * 3
        f.restype = ctypes.c_uint32
    return so


def as_words(bytes_: np.ndarray) -> np.ndarray:
    """uint8 [..., 4] -> one little-endian uint32 per 4 bytes."""
    return np.ascontiguousarray(bytes_, dtype=np.uint8).view(np.uint32).reshape(-1)


def expected_pairs(bits: np.ndarray) -> np.ndarray:
    """bf16 patterns [n, 4] -> the (c0, c2), (c1, c3) pair words, interleaved."""
    b = bits.astype(np.uint32)
    return np.stack([b[:, 0] | (b[:, 2] << 16), b[:, 1] | (b[:, 3] << 16)], axis=1).reshape(-1)


def test_byte_perm_picks_bytes_of_b_a(shim: ctypes.CDLL) -> None:
    a, b = 0x33221100, 0x77665544
    assert shim.byte_perm(a, b, 0x3210) == a
    assert shim.byte_perm(a, b, 0x7654) == b
    assert shim.byte_perm(a, b, 0x0415) == 0x00441155
    assert shim.byte_perm(a, b, 0x2200) == 0x22220000


def test_join_bf16_pairs_rebuilds_every_pattern(shim: ctypes.CDLL) -> None:
    # Each of the 65,536 patterns once in each of the four positions.
    patterns = np.arange(1 << 16, dtype=np.uint16)
    rng = np.random.default_rng(0)
    bits = np.stack([np.roll(rng.permutation(patterns), k) for k in range(4)], axis=1)
    e, sm = split_bf16(bits)
    out = np.empty(2 * len(bits), np.uint32)
    shim.join_pairs(as_words(e), as_words(sm), len(bits), out)
    np.testing.assert_array_equal(out, expected_pairs(bits))


def test_bf16_pairs_pairs_columns_0_2_and_1_3(shim: ctypes.CDLL) -> None:
    bits = np.random.default_rng(1).integers(0, 1 << 16, size=(4096, 4), dtype=np.uint16)
    out = np.empty(2 * len(bits), np.uint32)
    shim.bf16_pairs(np.ascontiguousarray(bits).view(np.uint32).reshape(-1), len(bits), out)
    np.testing.assert_array_equal(out, expected_pairs(bits))


@pytest.mark.parametrize("rows, cols, scale", [(7, 64 * 70, 1e4), (33, 192, 1e12), (5, 64, 1e3)])
def test_escape_slot_finds_each_escape_group(shim: ctypes.CDLL, rows: int, cols: int, scale: float) -> None:
    # Log-uniform magnitudes over many exponents: some (scale 1e12: all) groups escape.
    rng = np.random.default_rng(rows)
    w = (rng.standard_normal((rows, cols)) * scale ** rng.random((rows, cols))).astype(ml_dtypes.bfloat16)
    parts = reference.to_palette(w.view(np.uint16))
    assert len(parts.esc_groups) > 0
    mask, prefix = escape_index(parts.esc_groups, rows, cols)
    r, g = np.divmod(parts.esc_groups.astype(np.int64), cols // GROUP)
    word, bit = g // ESC_WORD_BITS, g % ESC_WORD_BITS
    slots = [shim.escape_slot(int(mask[i, j]), int(prefix[i, j]), int(b)) for i, j, b in zip(r, word, bit)]
    np.testing.assert_array_equal(slots, np.arange(len(parts.esc_groups)))


def lane_pairs(row: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
    """The (even, odd) pair words of lane t's 16 columns of a 64-column step, as join_bf16_pairs
    builds them: even[j] = (c[4j], c[4j+2]), odd[j] = (c[4j+1], c[4j+3])."""
    c = row[16 * t : 16 * t + 16].reshape(4, 4)
    return c[:, [0, 2]], c[:, [1, 3]]


def test_mma_fragments_cover_each_column_once() -> None:
    """Emulates the four mma.m16n8k16 of one warp step of gemv.cu on a 16 x 64 tile of W and 8
    rows of x, placing each lane's registers where PTX's fragment layout puts them, and checks
    that they sum to W @ x.T exactly (the products of small integers are exact)."""
    rng = np.random.default_rng(2)
    w = rng.integers(-8, 8, size=(16, GROUP)).astype(np.float64)
    x = rng.integers(-8, 8, size=(8, GROUP)).astype(np.float64)
    d = np.zeros((16, 8))
    for j in range(4):
        a = np.full((16, 16), np.nan)  # [row, k-slot]
        b = np.full((16, 8), np.nan)  # [k-slot, batch]
        for lane in range(32):
            g, t = divmod(lane, 4)
            ea, oa = lane_pairs(w[g], t)
            eb, ob = lane_pairs(w[g + 8], t)
            ex, ox = lane_pairs(x[g], t)
            # A: a0 (row g, k 2t..2t+1), a1 (row g+8, 2t..), a2 (row g, 2t+8..), a3 (row g+8, 2t+8..)
            a[g, 2 * t : 2 * t + 2] = ea[j]
            a[g + 8, 2 * t : 2 * t + 2] = eb[j]
            a[g, 2 * t + 8 : 2 * t + 10] = oa[j]
            a[g + 8, 2 * t + 8 : 2 * t + 10] = ob[j]
            # B: b0 (k 2t..2t+1, column g), b1 (k 2t+8..2t+9, column g)
            b[2 * t : 2 * t + 2, g] = ex[j]
            b[2 * t + 8 : 2 * t + 10, g] = ox[j]
        assert not np.isnan(a).any() and not np.isnan(b).any()
        d += a @ b
    np.testing.assert_array_equal(d, w @ x.T)
