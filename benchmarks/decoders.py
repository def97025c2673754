"""The four CUDA decode kernels against the device's copy bandwidth, on Llama-3.1-8B MLP shapes.

For each shape (bf16 weights drawn N(0, 0.02)) and kernel: the kernel's time, the time of an
XLA pass that reads and writes as many bytes as the kernel writes (`hbm_copy_same_bytes`: a
uint32 xor with a runtime scalar, so nothing can elide it), the bytes the kernel must move
(every input read once, every output written once), and its bandwidth as a share of the copy
bandwidth measured in the same process.

Timing: each measured call runs the op on K distinct device copies of its inputs inside one
jit; the per-op time is the slope between K = 2 and K = 10 (median wall time of several calls
each), which removes dispatch and synchronisation. Each invocation reads inputs no earlier
invocation of the call touched, more than the 50 MB L2 apart: the L2 holds none of them.

    python benchmarks/decoders.py --out DIR    # writes DIR/decoders-h100.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from unweight_jax import codec
from unweight_jax.ops import decode as ops
from unweight_jax.weights import palette_lookup
from run_info import run_info

SHAPES = [(4096, 14336), (14336, 4096)]
K_LO, K_HI = 2, 10
REPS = 7
BASELINE = "hbm_copy_same_bytes"


def call_ms(fn: Callable, args: Sequence, reps: int = REPS) -> float:
    """Median wall time of fn(args) in ms, after a compiling warm-up call."""
    jax.block_until_ready(fn(args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def per_op_ms(op: Callable, copies: Sequence[tuple]) -> float:
    """Device time of one op(*inputs): the slope between calls running it on K_LO and K_HI copies."""
    run = jax.jit(lambda inputs: [op(*c) for c in inputs])
    return (call_ms(run, copies[:K_HI]) - call_ms(run, copies[:K_LO])) / (K_HI - K_LO)


def device_copies(*arrays: np.ndarray) -> list[tuple[jax.Array, ...]]:
    """K_HI separate device copies of the inputs."""
    return [tuple(jax.device_put(a) for a in arrays) for _ in range(K_HI)]


def copy_ms(nbytes: int) -> float:
    """A device pass reading and writing `nbytes` (uint32 xor with a runtime scalar)."""
    words = np.random.default_rng(0).integers(0, 1 << 32, nbytes // 4, dtype=np.uint32)
    key = jnp.uint32(0x5A5A5A5A)
    return per_op_ms(lambda x, k: x ^ k, [(x, key) for (x,) in device_copies(words)])


def kernel_rows(shape: tuple[int, int]) -> list[dict]:
    rows, cols = shape
    n = rows * cols
    w = (np.random.default_rng(sum(shape)).standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    bits = w.view(np.uint16)
    parts = codec.compress(w)
    lut = codec.decoder_table(parts)
    palette = codec.huffman_to_palette(parts)
    n_used = min(np.count_nonzero(np.bincount(((bits >> 7) & 0xFF).ravel(), minlength=256)), len(palette.palette))
    sym_to_idx = palette_lookup(palette.palette, n_used)
    steps = parts.chunk_steps
    stream_bytes = parts.words.nbytes + parts.chunks.nbytes + lut.nbytes
    esc_bytes = palette.esc_groups.nbytes + palette.esc_exp.nbytes

    # name: (op, inputs, expected output bits, bytes read + written, bytes written)
    kernels = {
        "huffman_to_bf16": (
            lambda sm, words, chunks, lut: ops.huffman_to_bf16(sm, words, chunks, lut, chunk_steps=steps),
            (parts.sm, parts.words, parts.chunks, lut),
            bits,
            n + stream_bytes + 2 * n,
            2 * n,
        ),
        "huffman_to_exponent": (
            lambda words, chunks, lut: ops.huffman_to_exponent(words, chunks, lut, shape=shape, chunk_steps=steps),
            (parts.words, parts.chunks, lut),
            (bits >> 7).astype(np.uint8),
            stream_bytes + n,
            n,
        ),
        "huffman_to_palette": (
            lambda words, chunks, lut, s2i, esc: ops.huffman_to_palette(
                words, chunks, lut, s2i, esc, shape=shape, chunk_steps=steps
            ),
            (parts.words, parts.chunks, lut, sym_to_idx, palette.esc_groups),
            palette.idx,
            stream_bytes + sym_to_idx.nbytes + palette.esc_groups.nbytes + palette.idx.nbytes,
            palette.idx.nbytes,
        ),
        "palette_to_bf16": (
            ops.palette_to_bf16,
            (palette.palette, palette.idx, palette.sm, palette.esc_groups, palette.esc_exp),
            bits,
            palette.palette.nbytes + palette.idx.nbytes + n + esc_bytes + 2 * n,
            2 * n,
        ),
    }

    copy_bytes = 2 * n  # the bf16 matrix: the copy bandwidth of this shape
    copy_tb_s = 2 * copy_bytes / (copy_ms(copy_bytes) * 1e-3) / 1e12
    out = []
    for name, (op, inputs, expected, moved, written) in kernels.items():
        got = np.asarray(jax.jit(op)(*inputs))
        if got.dtype == jnp.bfloat16:
            got = got.view(np.uint16)
        if not np.array_equal(got, expected):
            raise AssertionError(f"{name} {shape}: output differs from the codec's")
        ours = per_op_ms(op, device_copies(*inputs))
        baseline = copy_ms(written)
        achieved = moved / (ours * 1e-3) / 1e12
        row = {
            "batch": None,
            "shape": list(shape),
            "pipeline": name,
            "ours_ms": round(ours, 4),
            "baseline_ms": round(baseline, 4),
            "baseline": BASELINE,
            "ratio": round(baseline / ours, 3),
            "bytes_moved": int(moved),
            "achieved_tb_s": round(achieved, 3),
            "copy_tb_s": round(copy_tb_s, 3),
            "pct_of_copy": round(100 * achieved / copy_tb_s, 1),
        }
        if name.endswith("_to_bf16"):
            row["bf16_written_tb_s"] = round(2 * n / (ours * 1e-3) / 1e12, 3)
        out.append(row)
        print(f"{shape} {name}: {ours:.4f} ms, {achieved:.3f} TB/s ({row['pct_of_copy']}% of copy)", flush=True)
    return out


def markdown(rows: list[dict]) -> str:
    lines = [
        "| shape | kernel | ours ms | copy of output ms | ratio | MB moved | TB/s | copy TB/s | % of copy | bf16 TB/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape'][0]}x{r['shape'][1]} | {r['pipeline']} | {r['ours_ms']:.4f} | {r['baseline_ms']:.4f} | "
            f"{r['ratio']:.3f} | {r['bytes_moved'] / 1e6:.1f} | {r['achieved_tb_s']:.3f} | {r['copy_tb_s']:.3f} | "
            f"{r['pct_of_copy']:.1f} | {r.get('bf16_written_tb_s', '')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="directory for the JSON and table")
    parser.add_argument("--commit", default=None, help="commit measured (default: git rev-parse HEAD)")
    parser.add_argument("--device-tag", default="h100", help="file name suffix: decoders-<tag>.json")
    args = parser.parse_args()

    rows = [row for shape in SHAPES for row in kernel_rows(shape)]
    report = {
        **run_info("decoders", commit=args.commit),
        "timing": f"slope of median wall time (of {REPS}) between jit calls running the op on {K_LO} and {K_HI} "
        "distinct device copies of its inputs; no input is in L2 when read",
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"decoders-{args.device_tag}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(rows)
    header = f"{report['device']}, driver {report['driver']}, jax {report['jax_version']}, {report['date']}\n\n"
    stem.with_suffix(".md").write_text(header + table)
    print(table)


if __name__ == "__main__":
    main()
