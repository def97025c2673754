"""The Llama-3.1-8B MLP stack, one decode or prefill step at a time: ours against XLA bf16.

32 layers of gate 14336x4096, up 14336x4096 and down 4096x14336, bf16 weights drawn N(0, 0.02)
on the device (11.3 GB; 2.55 bits of exponent entropy, close to trained weights' 2.6) and
transcoded there to the palette form (FORMAT.md section 3). The step, the candidates and the
timing are `unweight_jax.bench.mlp_stack`'s; this script runs every kernel variant:

- `gemv:<variant>` (batch <= 16): the GEMV kernels on the palette form (unweight_jax.ops.gemv);
- `gemm:<variant>`: the tensor-core kernels on the palette form (unweight_jax.ops.gemm), where
  that module is built and supports the case;
- `full`: the palette form decoded to bf16 (unweight_jax.ops.decode), then XLA's dot;
- reported beside them, never as ours: `gemv_exponent:<variant>` (exponent + sign/mantissa
  bytes, 16 bits a weight: the matmul of the `exponent` pipeline) and `gemv_bf16:<variant>` (the
  twin on plain bf16: the kernel's own speed on uncompressed weights).

Timing: each measured call runs STEPS steps in a `fori_loop` inside one jit; a step's time is the
median wall time of REPS calls (after a compiling warm-up) divided by STEPS. The stack is 230
times the 50 MB L2, so every weight comes from HBM. The device-to-device copy bandwidth is
measured in the same process (a uint32 xor over 4 GiB, counting bytes read and written).

    python benchmarks/mlp_stack.py --out DIR [--batches 1,4,16]   # DIR/mlp_stack-h100.{json,md,png}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from unweight_jax.bench.mlp_stack import LLAMA_8B_STACK, REPS, STEPS, candidates, make_stack, markdown, measure
from unweight_jax.bench.plots import plot_speedup
from run_info import run_info

BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="directory for the results")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    parser.add_argument("--commit", default=None, help="commit measured (default: git rev-parse HEAD)")
    parser.add_argument("--device-tag", default="h100", help="file name suffix: mlp_stack-<tag>.json")
    parser.add_argument("--candidates", default="", help="regex: measure only the candidates it matches")
    parser.add_argument(
        "--per-matrix", default="", help="regex: also time one gate and one down alone for these candidates and XLA"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    batches = [int(b) for b in args.batches.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"mlp_stack-{args.device_tag}"
    shape = LLAMA_8B_STACK

    def write(rows: list[dict], info: dict) -> None:
        report = {
            **run_info("mlp_stack", commit=args.commit),
            "timing": f"median wall time of {REPS} jit calls of {STEPS} steps each (fori_loop), over {STEPS}",
            **info,
            "rows": rows,
        }
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        table = markdown(report, shape)
        stem.with_suffix(".md").write_text(table)
        plot_speedup({"ours (best candidate)": rows}, stem.with_suffix(".png"), f"{shape.name}, {report['device']}")
        print(table, flush=True)

    measure(
        shape,
        make_stack(shape, args.seed),
        batches,
        lambda batch: candidates(shape, batch, args.candidates),
        write,
        matrix_candidates_for=(lambda batch: candidates(shape, batch, args.per_matrix)) if args.per_matrix else None,
    )


if __name__ == "__main__":
    main()
