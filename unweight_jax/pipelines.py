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

import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

from .format import as_matrix_shape
from .ops import decode, gemm, gemv, registry
from .weights import CompressedWeight, ExponentWeight, HuffmanWeight, PaletteWeight, TranscodeWeight

PIPELINES = ("full", "exponent", "transcode", "palette")
KERNELS = ("xla", "gemv", "gemm")
GEMV_MAX_BATCH = 16

# Until the autotuner chooses per shape and batch, the variants that were fastest on the 8B MLP
# stack on an H100 (benchmarks/results/mlp_stack-h100.json): (largest batch, variant name).
GEMV_VARIANTS = ((8, "mma_acc4"), (GEMV_MAX_BATCH, "mma"))
GEMM_VARIANTS = ((128, "n128_s6"), (2**31, "n256_s4"))

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


# The pipeline each resident form runs unless told otherwise: the one it is resident for.
_OWN_PIPELINE = {PaletteWeight: "palette", TranscodeWeight: "transcode", HuffmanWeight: "full", ExponentWeight: "exponent"}


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
    """The plan used when nobody asked for one: the form's own pipeline (or the one forced by
    $UNWEIGHT_PIPELINE, where the form allows it), fused where a kernel takes the case: the GEMV
    up to batch 16, the tensor-core kernel above."""
    allowed = pipelines_for(w)
    pipeline = _OWN_PIPELINE[type(w)]
    forced = os.environ.get(PIPELINE_ENV)
    if forced:
        if forced not in PIPELINES:
            raise ValueError(f"{PIPELINE_ENV}={forced!r} is not one of {PIPELINES}")
        if forced in allowed:
            pipeline = forced
    rows, cols = as_matrix_shape(w.shape)
    kernels = fused_kernels(pipeline, rows, cols, batch) if x_dtype == jnp.bfloat16 else ()
    if batch <= GEMV_MAX_BATCH and "gemv" in kernels:
        return Plan(pipeline, "gemv", _variant(gemv.VARIANTS, GEMV_VARIANTS, batch))
    if "gemm" in kernels:
        return Plan(pipeline, "gemm", _variant(gemm.VARIANTS, GEMM_VARIANTS, batch))
    return Plan(pipeline)


def _variant(variants: dict, by_batch: tuple[tuple[int, str], ...], batch: int) -> int:
    return next(variants[name].id for limit, name in by_batch if batch <= limit)


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


_FUSED = {
    "gemv": (gemv.gemv_palette, gemv.gemv_exponent),
    "gemm": (gemm.gemm_palette, gemm.gemm_exponent),
}


def _run(plan: Plan, x: jax.Array, w: CompressedWeight, rows: int, cols: int) -> jax.Array:
    if plan.kernel == "xla":
        return dense(x, decompress(w))
    fused_palette, fused_exponent = _FUSED[plan.kernel]
    if plan.pipeline == "palette":
        return fused_palette(x, w, variant=plan.variant)
    huff = w.huffman if isinstance(w, TranscodeWeight) else w
    if plan.pipeline == "exponent":
        if isinstance(w, ExponentWeight):
            return fused_exponent(x, w.exp, w.sm, variant=plan.variant)
        exp = decode.huffman_to_exponent(
            huff.words, huff.chunks, huff.lut, shape=(rows, cols), chunk_steps=huff.chunk_steps
        )
        return fused_exponent(x, exp, huff.sm.reshape(rows, cols), variant=plan.variant)
    # transcode: rebuild the 4-bit indices, borrow the resident palette side tables
    idx = decode.huffman_to_palette(
        huff.words, huff.chunks, huff.lut, w.sym_to_idx, w.esc_groups, shape=(rows, cols), chunk_steps=huff.chunk_steps
    )
    view = PaletteWeight(
        palette=w.palette,
        idx=idx,
        sm=huff.sm.reshape(rows, cols),
        esc_groups=w.esc_groups,
        esc_mask=w.esc_mask,
        esc_prefix=w.esc_prefix,
        esc_exp=w.esc_exp,
        shape=(rows, cols),
    )
    return fused_palette(x, view, variant=plan.variant)
