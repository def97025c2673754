"""The tensor-core GEMM (unweight_jax.ops.gemm, ffi/cuda/gemm_sm90.cu).

On a Hopper GPU: the palette and exponent kernels equal their bf16 twin bit for bit (their proof
of losslessness) on the Llama-3.1-8B MLP shapes, batch tails, split-K, escape-heavy matrices and
random seeds, and the twin is within the fp32-accumulation bound of a float64 reference and of
XLA's own dot. On any machine: the split-K choice, the argument checks, and an emulation of one
warpgroup's fragment rebuild (the kernel's PRMT/LOP3 data path over TMA-swizzled tiles) against
the format's bf16 values in WGMMA's A-fragment order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from unweight_jax import codec
from unweight_jax.format import GROUP, split_bf16
from unweight_jax.ops import gemm
from unweight_jax.weights import PaletteWeight

GATE_UP = (14336, 4096)  # Llama-3.1-8B MLP gate/up [R, C]
DOWN = (4096, 14336)

hopper = pytest.mark.skipif("not gemm.supports(128, 64, 64)", reason="needs a Hopper GPU and the CUDA build")


# ------------------------------------------------------------------------------------ data


def weight_bits(rows: int, cols: int, seed: int, *, tiny: float = 0.0, spread: int = 0) -> np.ndarray:
    """bf16 bit patterns [rows, cols] drawn like trained weights: N(0, 0.02), which leaves about
    0.5 % escape groups. With `tiny` > 0 that fraction of the values is scaled by 2^-24, below
    the palette's exponents (0.011 gives ~17 % escape groups); with `spread` > 0 the exponents are
    uniform over that many values instead, so that (for 40) every group escapes."""
    rng = np.random.default_rng(seed)
    if spread:
        magnitude = rng.uniform(1.0, 2.0, (rows, cols)) * np.exp2(-rng.integers(1, spread + 1, (rows, cols)))
        w = np.where(rng.random((rows, cols)) < 0.5, -magnitude, magnitude).astype(np.float32)
    else:
        w = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)
        if tiny:
            w = np.where(rng.random((rows, cols)) < tiny, w * np.float32(2.0**-24), w)
    return w.astype(ml_dtypes.bfloat16).view(np.uint16)


def activations(batch: int, cols: int, seed: int) -> jax.Array:
    x = np.random.default_rng(seed).standard_normal((batch, cols), dtype=np.float32)
    return jnp.asarray(x.astype(ml_dtypes.bfloat16))


class Forms:
    """One weight in the three forms the kernels read."""

    def __init__(self, bits: np.ndarray):
        self.bits = bits
        self.palette = PaletteWeight.from_parts(codec.to_palette(bits))
        exp, sm = split_bf16(bits)
        self.exp, self.sm = jnp.asarray(exp), jnp.asarray(sm)
        self.bf16 = jnp.asarray(bits.view(ml_dtypes.bfloat16))

    def run_all(self, x: jax.Array, variant: int | str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        twin = gemm.gemm_bf16(x, self.bf16, variant=variant)
        pal = gemm.gemm_palette(x, self.palette, variant=variant)
        exp = gemm.gemm_exponent(x, self.exp, self.sm, variant=variant)
        return tuple(np.asarray(y).view(np.uint16) for y in (twin, pal, exp))


@functools.cache
def forms(rows: int, cols: int, seed: int, tiny: float = 0.0, spread: int = 0) -> Forms:
    return Forms(weight_bits(rows, cols, seed, tiny=tiny, spread=spread))


def assert_bitwise(twin: np.ndarray, fused: np.ndarray, what: str) -> None:
    diff = np.argwhere(twin != fused)
    assert diff.size == 0, f"{what}: {len(diff)} of {twin.size} outputs differ from the twin, first at {diff[0]}"


def assert_within_fp32_bound(y: np.ndarray, x: np.ndarray, w: np.ndarray, rows: np.ndarray, what: str) -> None:
    """|y - exact| <= 2^-8 |exact| + K 2^-23 sum_k |x_k w_k| on the sampled weight rows: bf16
    rounding of the output plus a worst-case fp32 summation error (gamma_K), each doubled; and the
    relative Frobenius error under 5e-3 (output rounding alone gives ~1e-3; a wrong element order
    gives ~1)."""
    x64 = x.astype(np.float64)
    w64 = w[rows].astype(np.float64)
    exact = x64 @ w64.T
    magnitude = np.abs(x64) @ np.abs(w64).T
    got = y[:, rows].astype(np.float64)
    assert not np.isnan(got).any(), f"{what}: NaN in the output"
    bound = 2.0**-8 * np.abs(exact) + x.shape[1] * 2.0**-23 * magnitude
    over = np.argwhere(np.abs(got - exact) > bound)
    assert over.size == 0, f"{what}: {len(over)} outputs outside the fp32-accumulation bound, first at {over[0]}"
    rel = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    assert rel < 5e-3, f"{what}: relative error {rel:.2e}"


# ------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("shape", [GATE_UP, DOWN], ids=["gate_up", "down"])
@pytest.mark.parametrize("batch", [64, 200, 293, 1024])
def test_fused_equal_twin_on_8b_shapes(shape: tuple[int, int], batch: int) -> None:
    rows, cols = shape
    f = forms(rows, cols, seed=1)
    x = activations(batch, cols, seed=batch)
    twin, pal, exp = f.run_all(x, variant=0)
    assert_bitwise(twin, pal, f"palette {shape} batch {batch}")
    assert_bitwise(twin, exp, f"exponent {shape} batch {batch}")
    sample = np.random.default_rng(0).choice(rows, 192, replace=False)
    bf16 = ml_dtypes.bfloat16
    assert_within_fp32_bound(
        twin.view(bf16), np.asarray(x), f.bits.view(bf16), sample, f"twin {shape} batch {batch}"
    )


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("variant", list(gemm.VARIANTS))
@pytest.mark.parametrize("batch", [37, 256])
def test_every_variant(variant: str, batch: int) -> None:
    rows, cols = DOWN
    f = forms(rows, cols, seed=1)
    x = activations(batch, cols, seed=7 + batch)
    twin, pal, exp = f.run_all(x, variant=variant)
    assert_bitwise(twin, pal, f"palette {variant} batch {batch}")
    assert_bitwise(twin, exp, f"exponent {variant} batch {batch}")
    bf16 = ml_dtypes.bfloat16
    sample = np.random.default_rng(1).choice(rows, 128, replace=False)
    assert_within_fp32_bound(twin.view(bf16), np.asarray(x), f.bits.view(bf16), sample, f"twin {variant}")


@pytest.mark.gpu
@hopper
def test_twin_close_to_xla() -> None:
    rows, cols = GATE_UP
    f = forms(rows, cols, seed=1)
    x = activations(512, cols, seed=3)
    twin = np.asarray(gemm.gemm_bf16(x, f.bf16)).astype(np.float64)
    xla = jnp.dot(x, f.bf16.T, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    xla = np.asarray(xla).astype(np.float64)
    rel = np.linalg.norm(twin - xla) / np.linalg.norm(xla)
    assert rel < 5e-3, f"twin vs XLA: relative difference {rel:.2e}"
    assert np.abs(twin - xla).max() <= 2.0**-6 * np.abs(xla).max()


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize(("tiny", "spread"), [(0.011, 0), (0.0, 40)], ids=["many_escapes", "all_escapes"])
def test_escape_heavy(tiny: float, spread: int) -> None:
    rows, cols = 1024, 4096
    f = forms(rows, cols, seed=5, tiny=tiny, spread=spread)
    escaping = len(f.palette.esc_exp) / (rows * cols // GROUP)
    assert escaping > (0.99 if spread else 0.1), f"the test matrix has only {escaping:.1%} escape groups"
    x = activations(300, cols, seed=11)
    twin, pal, exp = f.run_all(x, variant=0)
    assert_bitwise(twin, pal, f"palette, {escaping:.0%} escape groups")
    assert_bitwise(twin, exp, "exponent")
    bf16 = ml_dtypes.bfloat16
    sample = np.arange(0, rows, 7)
    assert_within_fp32_bound(twin.view(bf16), np.asarray(x), f.bits.view(bf16), sample, "twin, escape-heavy")


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("seed", [21, 22, 23])
@pytest.mark.parametrize("batch", [1, 130])
def test_random_seeds(seed: int, batch: int) -> None:
    rows, cols = 384, 1024
    f = Forms(weight_bits(rows, cols, seed, tiny=0.004 * (seed - 20)))
    x = activations(batch, cols, seed=seed)
    for variant in gemm.VARIANTS:
        twin, pal, exp = f.run_all(x, variant=variant)
        assert_bitwise(twin, pal, f"palette seed {seed} {variant}")
        assert_bitwise(twin, exp, f"exponent seed {seed} {variant}")
    bf16 = ml_dtypes.bfloat16
    assert_within_fp32_bound(twin.view(bf16), np.asarray(x), f.bits.view(bf16), np.arange(rows), f"seed {seed}")


@pytest.mark.gpu
@hopper
def test_vmap_and_jit() -> None:
    rows, cols = 256, 512
    stack = [Forms(weight_bits(rows, cols, seed)) for seed in (31, 32)]
    x = activations(96, cols, seed=4)
    w = jnp.stack([f.bf16 for f in stack])
    got = jax.jit(jax.vmap(gemm.gemm_bf16, in_axes=(None, 0)))(x, w)
    for i, f in enumerate(stack):
        assert_bitwise(np.asarray(gemm.gemm_bf16(x, f.bf16)).view(np.uint16), np.asarray(got[i]).view(np.uint16), "vmap")


# ------------------------------------------------------------------------------------ any machine


def test_splits_fill_the_gpu_only_when_needed() -> None:
    assert gemm.splits_for(*GATE_UP, 64) == 1  # 112 tiles
    assert gemm.splits_for(*DOWN, 64) == 4  # 32 tiles x 4 splits of 56 k-blocks
    assert gemm.splits_for(*DOWN, 512) == 2
    assert gemm.splits_for(*DOWN, 1024) == 1
    assert gemm.splits_for(1024, 4096, 64) == 8  # 8 k-blocks per split, the minimum
    assert gemm.splits_for(*GATE_UP, 64, "n64_s8") == 1  # the narrow tile: still 112 tiles
    assert gemm.splits_for(*DOWN, 200, "n64_s8") == 1  # 32 x 4 batch tiles
    assert gemm.splits_for(128, 64, 1) == 1  # one k-block cannot split
    for rows, cols, batch in [(4096, 4096, 100), (1024, 14336, 7), (128, 704, 3000)]:
        splits = gemm.splits_for(rows, cols, batch)
        kblocks = cols // 64
        per = -(-kblocks // splits)
        assert (splits - 1) * per < kblocks, "a split without k-blocks"


def test_rejects_shapes_the_kernel_does_not_take() -> None:
    x = jnp.zeros((4, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiple of 128"):
        gemm.gemm_bf16(x, jnp.zeros((100, 64), jnp.bfloat16))
    with pytest.raises(ValueError, match="x has 64 columns"):
        gemm.gemm_bf16(x, jnp.zeros((128, 128), jnp.bfloat16))
    with pytest.raises(ValueError, match="unknown variant"):
        gemm.gemm_bf16(x, jnp.zeros((128, 64), jnp.bfloat16), variant="n512")
    with pytest.raises(ValueError, match="x must be bf16"):
        gemm.gemm_bf16(x.astype(jnp.float32), jnp.zeros((128, 64), jnp.bfloat16))
    assert not gemm.supports(100, 64, 4) and not gemm.supports(128, 96, 4) and not gemm.supports(128, 64, 0)


# Emulation of the consumer warpgroup's rebuild (gemm_sm90_kernel.cuh), on numpy uint32 lanes.


def _prmt(a: np.ndarray | int, b: np.ndarray | int, sel: np.ndarray | int) -> np.ndarray:
    a, b, sel = np.broadcast_arrays(*(np.asarray(v, dtype=np.uint64) for v in (a, b, sel)))
    assert not (sel & 0x8888).any(), "a PRMT selector asks for sign replication"
    both = (b << np.uint64(32)) | a
    out = np.zeros(a.shape, np.uint64)
    for i in range(4):
        out |= ((both >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i)
    return out.astype(np.uint32)


def _select(mask: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a & np.uint32(mask)) | (b & np.uint32(~mask & 0xFFFFFFFF))


def _swizzled(tile: np.ndarray, span: int) -> np.ndarray:
    """A [rows, span]-byte tile as TMA lays it out with its `span`-byte swizzle: 16-byte chunk c
    of row r lands at chunk c ^ ((r * span / 128) % (span / 16))."""
    rows = tile.shape[0]
    flat = np.zeros(rows * span, np.uint8)
    for r in range(rows):
        for c in range(span // 16):
            dst = r * span + 16 * (c ^ ((r * span // 128) % (span // 16)))
            flat[dst : dst + 16] = tile[r, 16 * c : 16 * c + 16]
    return flat


def _words(flat: np.ndarray, offsets: np.ndarray, count: int) -> list[np.ndarray]:
    return [flat.view(np.uint8)[offsets[:, None] + 4 * k + np.arange(4)].view(np.uint32)[:, 0] for k in range(count)]


@pytest.mark.parametrize("tiny", [0.0, 0.02])
def test_fragment_rebuild_emulation(tiny: float) -> None:
    rows, cols = 64, 64  # one warpgroup, one k-block (one escape group per row)
    bits = weight_bits(rows, cols, seed=41, tiny=tiny)
    parts = codec.to_palette(bits)
    escape_rows = {int(g) // (cols // GROUP) for g in parts.esc_groups}
    esc_tile = np.zeros((rows, GROUP), np.uint8)
    for slot, g in enumerate(parts.esc_groups):
        esc_tile[int(g)] = parts.esc_exp[slot]
    sm_smem = _swizzled(parts.sm, 64)
    idx_smem = _swizzled(parts.idx, 32)
    pal = np.frombuffer(parts.palette.tobytes(), np.uint32)

    thread = np.arange(128)
    warp, g, t = thread // 32, (thread % 32) // 4, thread % 4
    sel_sm = (2 * t) | (2 * t << 4) | ((2 * t + 1) << 8) | ((2 * t + 1) << 12)
    sel_exp = (2 * t) | ((2 * t + 1) << 8)
    sel_idx = t | ((t + 4) << 4)

    def pair(row: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
        sm = _words(sm_smem, row * 64 + 16 * (s ^ ((row >> 1) & 3)), 4)
        idx = _words(idx_smem, row * 32 + 16 * ((s >> 1) ^ ((row >> 2) & 1)) + 8 * (s & 1), 2)
        q = _prmt(idx[0], idx[1], sel_idx)
        low = q & 0x7777
        pick = ((q >> 1) & 0x4444) | 0x3210
        e = _prmt(_prmt(pal[0], pal[1], low), _prmt(pal[2], pal[3], low), pick)
        e0, e1 = _prmt(e, 0, 0x0100), _prmt(e, 0, 0x0302)
        esc = _words(esc_tile.reshape(-1), row * 64 + 16 * s, 4)
        escaping = np.isin(row, list(escape_rows))
        e0 = np.where(escaping, _prmt(esc[0], esc[1], sel_exp), e0)
        e1 = np.where(escaping, _prmt(esc[2], esc[3], sel_exp), e1)
        join = lambda y, x: _select(0x807F807F, y, (x * np.uint32(128)).astype(np.uint32))  # noqa: E731
        return join(_prmt(sm[0], sm[1], sel_sm), e0), join(_prmt(sm[2], sm[3], sel_sm), e1)

    r0 = 16 * warp + g
    for s in range(4):
        lo, hi = pair(r0, s), pair(r0 + 8, s)
        frag = [lo[0], hi[0], lo[1], hi[1]]
        # WGMMA A fragment, register j: rows g (+8 for j odd), columns 2t, 2t+1 (+8 for j >= 2)
        for j in range(4):
            row = r0 + 8 * (j % 2)
            col = 16 * s + 2 * t + 8 * (j // 2)
            want = bits[row, col].astype(np.uint32) | (bits[row, col + 1].astype(np.uint32) << 16)
            np.testing.assert_array_equal(frag[j], want, err_msg=f"step {s} register {j}")
