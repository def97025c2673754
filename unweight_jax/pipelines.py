"""The four pipelines of DESIGN.md section 3 behind one entry point, `matmul(x, w)`.

| pipeline | before the matmul | the matmul |
|---|---|---|
| full | Huffman -> bf16 in HBM | XLA's dot |
| exponent | Huffman -> exponent bytes in HBM | fused kernel on exponent + sign/mantissa |
| transcode | Huffman -> 4-bit palette indices in HBM | fused kernel on palette |
| palette | nothing (palette resident) | fused kernel on palette |

A `Plan` (pipeline, kernel family, variant) is fixed at trace time, when the batch size is static.
Where a fused kernel cannot run (no GPU, activations not bf16, a shape the kernel does not take)
the pipeline's decode runs and XLA's dot does the product, so every plan works everywhere and
the `full` plan is bit-identical to the uncompressed model.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

from .format import as_matrix_shape
from .ops import decode, gemm, gemv, registry
from .weights import CompressedWeight, ExponentWeight, HuffmanWeight, PaletteWeight, TranscodeWeight

PIPELINES = ("full", "exponent", "transcode", "palette")
KERNELS = ("xla", "gemv", "gemm")
PIPELINE_ENV = "UNWEIGHT_PIPELINE"


@dataclass(frozen=True)
class Plan:
    """How one compressed matmul runs: `kernel` "xla" means decode to bf16, then XLA's dot."""

    pipeline: str
    kernel: str = "xla"
    variant: int = 0

    def __str__(self) -> str:
        return self.pipeline if self.kernel == "xla" else f"{self.pipeline}/{self.kernel}:{self.variant}"


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x @ w.T` in x's dtype with fp32 accumulation: the one XLA product that both the
    uncompressed model and the `full` pipeline use, so that their outputs are bit-identical."""
    y = lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def join_bf16(e: jax.Array, sm: jax.Array) -> jax.Array:
    """bf16 from exponent bytes and sign+mantissa bytes (FORMAT.md section 1), in plain jnp."""
    e, sm = e.astype(jnp.uint16), sm.astype(jnp.uint16)
    return lax.bitcast_convert_type(((sm & 0x80) << 8) | (e << 7) | (sm & 0x7F), jnp.bfloat16)


def pipelines_for(w: CompressedWeight) -> tuple[str, ...]:
    """The pipelines a resident form can feed."""
    if isinstance(w, PaletteWeight):
        return ("palette",)
    if isinstance(w, TranscodeWeight):
        return ("full", "exponent", "transcode")
    if isinstance(w, HuffmanWeight):
        return ("full", "exponent")
    if isinstance(w, ExponentWeight):
        return ("exponent",)
    raise TypeError(f"not a compressed weight: {type(w).__name__}")


def fused_kernels(pipeline: str, rows: int, cols: int, batch: int) -> tuple[str, ...]:
    """Fused kernel families that can run `pipeline` on this shape and batch, on this backend."""
    if pipeline == "full" or jax.default_backend() != "gpu" or not registry.CUDA_TARGETS:
        return ()
    found = []
    if gemv.supports(rows, cols, batch):
        found.append("gemv")
    if gemm.supports(rows, cols, batch):
        found.append("gemm")
    return tuple(found)


def default_plan(w: CompressedWeight, batch: int, x_dtype: jnp.dtype) -> Plan:
    """The plan used when nobody asked for one: the autotuner's choice (unweight_jax.autotune:
    forced, cached or measured; with tuning off, the form's own pipeline, fused where a kernel
    takes the case, or the pipeline $UNWEIGHT_PIPELINE forces where the form allows it)."""
    from . import autotune  # imported here: the tuner builds on this module

    return autotune.choose(w, batch, x_dtype)


def matmul(x: jax.Array, w: CompressedWeight, *, plan: Plan | None = None) -> jax.Array:
    """`x @ W.T` for a compressed `W` of shape [R, C]; `x` is [..., C], the result [..., R]."""
    rows, cols = as_matrix_shape(w.shape)
    if x.shape[-1] != cols:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {w.shape} expects {cols}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, cols)
    plan = plan or default_plan(w, x2.shape[0], x.dtype)
    if plan.kernel not in KERNELS:
        raise ValueError(f"unknown kernel family {plan.kernel!r}; expected one of {KERNELS}")
    if plan.pipeline not in pipelines_for(w):
        raise ValueError(f"pipeline {plan.pipeline!r} cannot run from {type(w).__name__}")
    if plan.kernel != "xla" and x2.dtype != jnp.bfloat16:
        raise ValueError(f"fused kernels take bf16 activations, got {x2.dtype}")
    y = _run(plan, x2, w, rows, cols)
    return y.reshape(*lead, rows)


def decompress(w: CompressedWeight) -> jax.Array:
    """The bf16 weight [R, C] (on the device), whatever the resident form."""
    if isinstance(w, TranscodeWeight):
        w = w.huffman
    if isinstance(w, HuffmanWeight):
        flat = decode.huffman_to_bf16(w.sm, w.words, w.chunks, w.lut, chunk_steps=w.chunk_steps)
        return flat.reshape(as_matrix_shape(w.shape))
    if isinstance(w, PaletteWeight):
        return decode.palette_to_bf16(w.palette, w.idx, w.sm, w.esc_groups, w.esc_exp)
    if isinstance(w, ExponentWeight):
        return join_bf16(w.exp, w.sm)
    raise TypeError(f"not a compressed weight: {type(w).__name__}")


# kernel family -> (its palette-input op, its exponent-input op)
FUSED = {
    "gemv": (gemv.gemv_palette, gemv.gemv_exponent),
    "gemm": (gemm.gemm_palette, gemm.gemm_exponent),
}


def _run(plan: Plan, x: jax.Array, w: CompressedWeight, rows: int, cols: int) -> jax.Array:
    """The plan's pipeline up to its matmul's input, then the fused kernel on that input, or (kernel
    "xla") the bf16 weight joined from that same input and XLA's dot: each pipeline is its own
    path on every backend, which is what the autotuner chooses between on the CPU."""
    if plan.pipeline == "full":
        return dense(x, decompress(w))
    fused_palette, fused_exponent = FUSED.get(plan.kernel, (None, None))
    if plan.pipeline == "exponent":
        exp, sm = _exponent_bytes(w, rows, cols)
        return fused_exponent(x, exp, sm, variant=plan.variant) if fused_exponent else dense(x, join_bf16(exp, sm))
    palette = w if plan.pipeline == "palette" else transcode(w)
    return fused_palette(x, palette, variant=plan.variant) if fused_palette else dense(x, decompress(palette))


def _exponent_bytes(w: CompressedWeight, rows: int, cols: int) -> tuple[jax.Array, jax.Array]:
    """(exponent bytes, sign+mantissa bytes), both u8 [R, C]: resident, or decoded from Huffman."""
    if isinstance(w, ExponentWeight):
        return w.exp, w.sm
    huff = w.huffman if isinstance(w, TranscodeWeight) else w
    exp = decode.huffman_to_exponent(
        huff.words, huff.chunks, huff.lut, shape=(rows, cols), chunk_steps=huff.chunk_steps
    )
    return exp, huff.sm.reshape(rows, cols)


def transcode_indices(w: TranscodeWeight) -> jax.Array:
    """The 4-bit palette indices of a transcode-resident weight, rebuilt from its Huffman stream:
    the only array `transcode` computes (a side stream decodes just this, issue 12)."""
    rows, cols = as_matrix_shape(w.shape)
    huff = w.huffman
    return decode.huffman_to_palette(
        huff.words, huff.chunks, huff.lut, w.sym_to_idx, w.esc_groups, shape=(rows, cols), chunk_steps=huff.chunk_steps
    )


def transcode(w: TranscodeWeight, idx: jax.Array | None = None) -> PaletteWeight:
    """The palette form of a transcode-resident weight: its 4-bit indices (`idx`, or rebuilt here
    from the Huffman stream), the resident palette side tables borrowed."""
    rows, cols = as_matrix_shape(w.shape)
    return PaletteWeight(
        palette=w.palette,
        idx=transcode_indices(w) if idx is None else idx,
        sm=w.huffman.sm.reshape(rows, cols),
        esc_groups=w.esc_groups,
        esc_mask=w.esc_mask,
        esc_prefix=w.esc_prefix,
        esc_exp=w.esc_exp,
        shape=(rows, cols),
    )
