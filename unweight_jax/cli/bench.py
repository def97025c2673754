"""`unweight bench`: a whole Llama decode step, compressed against bf16 under XLA, side by side on
one device (or tensor-parallel over several): ms per step, tokens per second, weights read per
step, device memory held and the bundle's size on disk."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import CommandError

BATCHES = "1,4,16,64,256,1024"
CONTEXTS = "1024,4096"
# Decode steps per timed call: a call's own cost (dispatch, one device buffer per weight array:
# about 1.6 ms for the 8B bf16 model and 5.4 ms for the compressed one with its seven arrays per
# weight, benchmarks/results/call_overhead-h100) is spread over them, as over a generation's
# tokens in `generate`'s device loop.
STEPS = 32
REPS = 5


def positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers (example: 1,4,16)") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be at least 1")
    return values


def plan_spec(text: str):
    """`auto`, or a plan as `pipelines.Plan` prints it: `palette` (decode, then XLA's dot) or
    `palette/<gemv|gemm>:<variant name or id>`."""
    if text == "auto":
        return None
    from ..ops import gemm, gemv
    from ..pipelines import Plan

    pipeline, _, kernel_variant = text.partition("/")
    if pipeline != "palette":
        raise argparse.ArgumentTypeError(
            f"{text!r}: the compressed model is palette-resident, so its pipeline is 'palette' (or 'auto')"
        )
    if not kernel_variant:
        return Plan("palette")
    kernel, _, variant = kernel_variant.partition(":")
    families = {"gemv": gemv.VARIANTS, "gemm": gemm.VARIANTS}
    if kernel not in families:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown kernel family {kernel!r}; expected gemv or gemm")
    variants = families[kernel]
    ids = {str(v.id): v.id for v in variants.values()} | {name: v.id for name, v in variants.items()}
    if variant not in ids:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown {kernel} variant {variant!r}; known: {', '.join(variants)}")
    return Plan("palette", kernel, ids[variant])


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "bench",
        help="time a whole Llama decode step, compressed against bf16, and measure its memory",
        description=__doc__.split("\n\n")[0].removeprefix("`unweight bench`: ").replace("\n", " "),
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--size", choices=("8b", "tiny"), help="generated weights: the Llama-3.1-8B configuration "
                        "(default) or a tiny Llama that runs in seconds on a CPU")
    source.add_argument("--checkpoint", type=Path, metavar="DIR", help="a Hugging Face Llama directory instead")
    source.add_argument("--bundle", type=Path, metavar="BUNDLE", help="an unweight bundle instead")
    parser.add_argument("--batch", type=positive_ints, default=BATCHES, metavar="B,...",
                        help=f"batch sizes: sequences decoding together (default {BATCHES})")
    parser.add_argument("--context", type=positive_ints, default=CONTEXTS, metavar="T,...",
                        help=f"tokens already in the KV cache (default {CONTEXTS})")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"decode steps per timed call (default {STEPS})")
    parser.add_argument("--reps", type=int, default=REPS, help=f"timed calls per case; the median counts (default {REPS})")
    parser.add_argument("--pipeline", type=plan_spec, default="auto", metavar="PLAN",
                        help="force every compressed layer's plan: palette (decode, then XLA's dot) or "
                        "palette/gemv:VARIANT, palette/gemm:VARIANT; default auto: the library's choice")
    parser.add_argument("--tp", type=int, metavar="N", help="tensor-parallel degree: both models split over the first "
                        "N devices (the compressed one loads from a bundle, written to a temporary directory)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), metavar="DIR",
                        help="where bench-<device>.json, .md and .png go (default benchmarks/results)")
    parser.add_argument("--device-tag", help="file name suffix (default: from the device, e.g. h100, cpu)")
    parser.add_argument("--skip-disk", action="store_true", help="do not encode a bundle to measure its size on disk")
    parser.add_argument("--no-mlp-stack", action="store_true", help="do not run the MLP-stack micro-benchmark (nor the DFloat11 peer beside it)")
    parser.add_argument("--compile-workers", type=int, default=1, metavar="N",
                        help="compile every case up front on N threads before timing anything (default 1: each "
                        "case just before it runs). Faster; XLA's own GEMM autotuning then shares the device")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--commit", help="commit measured (default: git rev-parse HEAD)")
    parser.set_defaults(run=run)


# Both models and the KV cache share one device: let JAX's allocator take most of it (its default
# pool is 75 %), unless the user chose. Read when JAX starts its GPU backend, so set before that.
MEMORY_FRACTION = "0.95"


def run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", MEMORY_FRACTION)
    import jax

    from ..bench.run import Options, run_bench

    if min(args.steps, args.reps, args.compile_workers) < 1:
        raise CommandError(f"--steps, --reps and --compile-workers must be at least 1, got {args.steps}, "
                           f"{args.reps} and {args.compile_workers}")
    for flag, path in (("--checkpoint", args.checkpoint), ("--bundle", args.bundle)):
        if path is not None and not path.exists():
            raise CommandError(f"{flag} {path}: no such file or directory")
    if args.tp is not None:  # (jax.devices() takes the GPU: only here, where no PyTorch peer runs before)
        if args.pipeline is not None:
            raise CommandError("--tp and --pipeline: each tensor-parallel shard takes the autotuner's plan; give one of them")
        if not 1 <= args.tp <= len(jax.devices()):
            raise CommandError(f"--tp {args.tp}: needs between 1 and the {len(jax.devices())} devices present")
    options = Options(
        size=args.size or "8b",
        checkpoint=args.checkpoint,
        bundle=args.bundle,
        batches=args.batch,
        contexts=args.context,
        steps=args.steps,
        reps=args.reps,
        plan=args.pipeline,
        tp=args.tp,
        out=args.out,
        device_tag=args.device_tag,
        skip_disk=args.skip_disk,
        mlp_stack=not args.no_mlp_stack,
        seed=args.seed,
        commit=args.commit,
        compile_workers=args.compile_workers,
    )
    try:
        run_bench(options)
    except ValueError as e:
        raise CommandError(str(e)) from None
    return 0
