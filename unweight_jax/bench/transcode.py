"""bf16 -> palette form (FORMAT.md section 3) on the device, as `unweight_jax.reference.to_palette`
does on the host: benchmarks build gigabytes of compressed weights without a round trip through
host memory. Only the escape flags (one bool per 64 weights) visit the host, to number the groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..format import GROUP, PALETTE_SIZE
from ..weights import PaletteWeight, escape_index


@jax.jit
def _palette_arrays(w: jax.Array) -> tuple[jax.Array, ...]:
    """The palette, the indices (0 in escape groups), the sign+mantissa bytes, the escape flag of
    each group [R, G] and the exponent bytes [R, C] of a bf16 [R, C]."""
    rows, cols = w.shape
    groups = -(-cols // GROUP)
    bits = lax.bitcast_convert_type(w, jnp.uint16)
    e = ((bits >> 7) & 0xFF).astype(jnp.uint8)
    sm = (((bits >> 8) & 0x80) | (bits & 0x7F)).astype(jnp.uint8)
    counts = jnp.bincount(e.reshape(-1), length=256)
    ranked = jnp.argsort(-counts, stable=True)[:PALETTE_SIZE]  # most frequent first, ties: smaller exponent
    chosen = jnp.sort(jnp.where(counts[ranked] > 0, ranked, 256))  # ascending, unused slots last
    slot_of = jnp.full(257, -1, jnp.int32).at[chosen].set(jnp.arange(PALETTE_SIZE, dtype=jnp.int32))[:256]
    palette = jnp.where(chosen < 256, chosen, 0).astype(jnp.uint8)
    nib = slot_of[e]
    # A short last group is padded with in-palette slots, so only its real columns can escape it.
    padded = jnp.pad(nib, ((0, 0), (0, groups * GROUP - cols)))
    escape = (padded < 0).reshape(rows, groups, GROUP).any(-1)
    nib = jnp.where(jnp.repeat(escape, GROUP, axis=1)[:, :cols], 0, nib)
    nib = jnp.pad(nib, ((0, 0), (0, cols % 2)))  # odd C: a zero padding nibble
    idx = (nib[:, 0::2] | (nib[:, 1::2] << 4)).astype(jnp.uint8)
    return palette, idx, sm, escape, e


@jax.jit
def _escape_exponents(e: jax.Array, esc_groups: jax.Array) -> jax.Array:
    """The verbatim exponents [n_esc, 64] of the flat groups `esc_groups` (0 past a short group's end)."""
    rows, cols = e.shape
    groups = -(-cols // GROUP)
    padded = jnp.pad(e, ((0, 0), (0, groups * GROUP - cols)))
    return padded.reshape(rows * groups, GROUP)[esc_groups.astype(jnp.int32)]


def palette_and_exponent(w: jax.Array) -> tuple[PaletteWeight, tuple[jax.Array, jax.Array]]:
    """The palette form of a bf16 [R, C] weight and its (exponent, sign+mantissa) bytes, on the device."""
    if w.ndim != 2 or w.dtype != jnp.bfloat16:
        raise ValueError(f"the device transcoder takes a 2-D bf16 matrix, got {w.dtype} {w.shape}")
    rows, cols = w.shape
    palette, idx, sm, escape, e = _palette_arrays(w)
    esc_groups = np.flatnonzero(np.asarray(escape)).astype(np.uint32)
    mask, prefix = escape_index(esc_groups, rows, cols)
    device_groups = jnp.asarray(esc_groups)
    weight = PaletteWeight(
        palette=palette,
        idx=idx,
        sm=sm,
        esc_groups=device_groups,
        esc_mask=jnp.asarray(mask),
        esc_prefix=jnp.asarray(prefix),
        esc_exp=_escape_exponents(e, device_groups),
        shape=(rows, cols),
    )
    return weight, (e, sm)


def palette_weight(w: jax.Array) -> PaletteWeight:
    """The palette form of a bf16 [R, C] weight, built on its device."""
    return palette_and_exponent(w)[0]
