"""Runs each GEMV variant once on one shape, palette form and bf16 twin, for a profiler to watch.

    ncu --clock-control none -k regex:gemv --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats python benchmarks/profile_gemv.py --shape 14336x4096 --batch 1
"""

from __future__ import annotations

import argparse

import jax

from gemm_shapes import weight_forms
from unweight_jax.ops import gemv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="14336x4096", help="ROWSxCOLS")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(gemv.VARIANTS), choices=list(gemv.VARIANTS))
    args = parser.parse_args()
    rows, cols = (int(n) for n in args.shape.split("x"))
    forms = weight_forms(rows, cols, seed=0)
    x = jax.random.normal(jax.random.key(0), (args.batch, cols), jax.numpy.bfloat16)
    for variant in args.variants:
        if gemv.supports(rows, cols, args.batch, variant):
            jax.block_until_ready(gemv.gemv_palette(x, forms["palette"][0], variant=variant))
            jax.block_until_ready(gemv.gemv_bf16(x, forms["bf16"][0], variant=variant))


if __name__ == "__main__":
    main()
