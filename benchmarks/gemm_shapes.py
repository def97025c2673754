"""The tensor-core GEMM (unweight_jax.ops.gemm) against XLA's bf16 dot on the Llama-3.1-8B MLP
shapes, batch 64 to 2048, on one GPU (DESIGN.md section 6).

Timing: one jit runs the same product on COPIES distinct copies of the weight (distinct buffers:
XLA cannot merge the calls, and every call finds its weight out of L2, since one copy alone is
over 50 MB); the per-call time is (T[COPIES calls] - T[FEW calls]) / (COPIES - FEW), which
cancels the dispatch cost, each T the median of --reps back-to-back runs after WARMUP_S of
warm-up runs (a GPU left idle during compilation runs its first milliseconds at low clocks).
Baseline and ours run side by side in the same process, as does a device-to-device copy whose
bandwidth is reported with them.

Writes gemm_shapes-<device>.json (the schema of DESIGN.md section 6, plus variant, splits,
TFLOP/s and weight bytes) and a markdown table beside it; both are rewritten after every case,
so a run cut short keeps what it measured.

    python benchmarks/gemm_shapes.py --out benchmarks/results
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
from unweight_jax.format import split_bf16
from unweight_jax.ops import gemm
from unweight_jax.weights import PaletteWeight
from run_info import run_info

SHAPES = {"gate_up": (14336, 4096), "down": (4096, 14336)}
BATCHES = (64, 128, 256, 512, 1024, 2048)
KERNELS = ("palette", "exponent", "bf16")
COPIES = 32
FEW = 8
WARMUP_S = 0.3
BASELINE = "xla_bf16_dot"


def xla_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """What the uncompressed model runs: bf16 operands, fp32 accumulation, bf16 result."""
    return jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(jnp.bfloat16)


def seconds_per_call(op: Callable, x: jax.Array, weights: Sequence, reps: int) -> float:
    """(T[len(weights) calls] - T[FEW calls]) / (len(weights) - FEW), medians of `reps` runs."""

    def timed(ws: Sequence) -> float:
        fn = jax.jit(lambda x, ws: [op(x, w) for w in ws])
        jax.block_until_ready(fn(x, ws))  # compile
        warm_until = time.perf_counter() + WARMUP_S
        while time.perf_counter() < warm_until:
            jax.block_until_ready(fn(x, ws))
        runs = []
        for _ in range(reps):
            start = time.perf_counter()
            jax.block_until_ready(fn(x, ws))
            runs.append(time.perf_counter() - start)
        return statistics.median(runs)

    return (timed(weights) - timed(weights[:FEW])) / (len(weights) - FEW)


def copy_bandwidth(reps: int) -> float:
    """Device-to-device copy bandwidth in GB/s, bytes read plus bytes written (64 MiB arrays)."""
    arrays = [jnp.full((1 << 25,), i, jnp.bfloat16) for i in range(COPIES)]
    per_copy = seconds_per_call(lambda _, a: a + jnp.bfloat16(1), arrays[0], arrays, reps)
    return 2 * arrays[0].nbytes / per_copy / 1e9


def weight_forms(rows: int, cols: int, seed: int) -> dict[str, list]:
    """COPIES device copies of one N(0, 0.02) bf16 weight in each form the kernels read."""
    w = np.random.default_rng(seed).standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)
    bits = w.astype(ml_dtypes.bfloat16).view(np.uint16)
    exp, sm = split_bf16(bits)
    first = {
        "bf16": jnp.asarray(bits.view(ml_dtypes.bfloat16)),
        "palette": PaletteWeight.from_parts(codec.to_palette(bits)),
        "exponent": (jnp.asarray(exp), jnp.asarray(sm)),
    }
    return {k: [v] + [jax.tree.map(lambda a: jnp.array(a, copy=True), v) for _ in range(COPIES - 1)] for k, v in first.items()}


def ours(kernel: str, variant: str) -> Callable:
    if kernel == "palette":
        return lambda x, w: gemm.gemm_palette(x, w, variant=variant)
    if kernel == "exponent":
        return lambda x, w: gemm.gemm_exponent(x, *w, variant=variant)
    return lambda x, w: gemm.gemm_bf16(x, w, variant=variant)


def nbytes(w) -> int:
    return sum(int(a.nbytes) for a in jax.tree.leaves(w))


def write(out: Path, report: dict) -> None:
    stem = out / f"gemm_shapes-{report['device_tag']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        f"# Tensor-core GEMM vs XLA bf16 dot, Llama-3.1-8B MLP shapes ({report['device']})",
        "",
        f"driver {report['driver']}, jax {report['jax_version']}, {report['date']}, commit {report['commit']}; "
        f"device-to-device copy {report['copy_gbps']:.0f} GB/s (read + write). Per-call times with the weight "
        "out of L2; ratio = XLA ms / ours ms (above 1: faster).",
        "",
        *([f"Note: {report['note']}", ""] if report.get("note") else []),
        "| shape | batch | kernel | variant | splits | ours ms | XLA ms | ratio | ours TFLOP/s | XLA TFLOP/s | weight GB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['shape_name']} {r['shape'][0]}x{r['shape'][1]} | {r['batch']} | {r['pipeline']} | {r['variant']} | "
            f"{r['splits']} | {r['ours_ms']:.4f} | {r['baseline_ms']:.4f} | {r['ratio']:.2f} | "
            f"{r['ours_tflops']:.0f} | {r['baseline_tflops']:.0f} | {r['weight_gbps']:.0f} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--variants", nargs="+", default=list(gemm.VARIANTS), choices=list(gemm.VARIANTS),
                        help="variants timed for the palette kernel; the others run the first one")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="stop starting cases after this long")
    parser.add_argument("--commit", help="the commit measured, where the tree has no .git (default: git's)")
    args = parser.parse_args()
    start = time.monotonic()

    rows_, cols_ = SHAPES[args.shapes[0]]
    if not gemm.supports(rows_, cols_, args.batches[0]):
        raise SystemExit("gemm_shapes: the tensor-core GEMM needs a Hopper GPU and the CUDA build of unweight_jax")
    args.out.mkdir(parents=True, exist_ok=True)
    env = run_info("gemm_shapes", commit=args.commit)
    report = {
        **env,
        "device_tag": next((tag for tag in ("h100", "h200") if tag in env["device"].lower()), "gpu"),
        "copy_gbps": copy_bandwidth(args.reps),
        "method": f"per-call time from {COPIES} vs {FEW} calls on distinct weight copies in one jit, median of {args.reps}",
        "rows": [],
    }
    print(f"{env['device']}, driver {env['driver']}, jax {env['jax_version']}: copy {report['copy_gbps']:.0f} GB/s")

    forms = {name: weight_forms(*SHAPES[name], seed=0) for name in args.shapes}
    for batch in args.batches:  # every shape at a batch before the next batch: a cut-short run stays balanced
        for shape_name in args.shapes:
            if time.monotonic() - start > args.budget_s:
                print(f"budget of {args.budget_s:.0f} s spent: stopping before {shape_name} batch {batch}")
                write(args.out, report)
                return
            rows, cols = SHAPES[shape_name]
            x = jnp.asarray(np.random.default_rng(batch).standard_normal((batch, cols), np.float32), jnp.bfloat16)
            flops = 2.0 * batch * rows * cols
            base_s = seconds_per_call(xla_dot, x, forms[shape_name]["bf16"], args.reps)
            for kernel in args.kernels:
                for variant in args.variants if kernel == "palette" else args.variants[:1]:
                    weights = forms[shape_name][kernel]
                    ours_s = seconds_per_call(ours(kernel, variant), x, weights, args.reps)
                    row = {
                        "batch": batch,
                        "shape": [rows, cols],
                        "shape_name": shape_name,
                        "pipeline": kernel if kernel != "bf16" else "bf16_twin",
                        "variant": variant,
                        "splits": gemm.splits_for(rows, cols, batch, variant),
                        "ours_ms": ours_s * 1e3,
                        "baseline_ms": base_s * 1e3,
                        "baseline": BASELINE,
                        "ratio": base_s / ours_s,
                        "ours_tflops": flops / ours_s / 1e12,
                        "baseline_tflops": flops / base_s / 1e12,
                        "weight_bytes": nbytes(weights[0]),
                        "weight_gbps": nbytes(weights[0]) / ours_s / 1e9,
                    }
                    report["rows"].append(row)
                    print(
                        f"{shape_name:8s} B={batch:5d} {row['pipeline']:9s} {variant:8s} splits={row['splits']} "
                        f"ours {row['ours_ms']:.4f} ms ({row['ours_tflops']:.0f} TF/s)  "
                        f"XLA {row['baseline_ms']:.4f} ms ({row['baseline_tflops']:.0f} TF/s)  ratio {row['ratio']:.2f}"
                    )
                    write(args.out, report)
    write(args.out, report)


if __name__ == "__main__":
    main()
