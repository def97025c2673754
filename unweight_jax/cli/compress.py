"""`unweight compress SRC -o OUT`: a checkpoint into a bundle."""

from __future__ import annotations

import argparse
import re
import sys

from ..compress import compress_checkpoint
from ..policy import CompressionPolicy
from ._units import human_bytes

_UNITS = {
    **{"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12},
    **{"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40},
}


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20 (as Hugging Face's max_shard_size)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 5GB, 500MiB, 1000000)")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be positive")
    return size


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "compress",
        help="compress a checkpoint into a bundle",
        description="Compress the bf16 weights of a checkpoint losslessly into a bundle (*.unw.safetensors). "
        "Attention and MLP projections are compressed; norms, 1-D and non-bf16 tensors are stored unchanged.",
    )
    parser.add_argument("src", metavar="SRC", help="a Hugging Face checkpoint directory or a llama2.c .bin file")
    parser.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="the bundle to write, NAME.unw.safetensors"
    )
    parser.add_argument(
        "--cast-bf16",
        action="store_true",
        help="round fp32/fp16 tensors to bf16 first. LOSSY: the bundle then holds the bf16 model, not the "
        "source (the bundle records it). Without it, non-bf16 weights are stored raw",
    )
    parser.add_argument("--embeddings", action="store_true", help="also compress the token embeddings and lm_head")
    parser.add_argument(
        "--max-shard-size", type=parse_size, metavar="SIZE", help="write shards of at most SIZE (e.g. 5GB)"
    )
    parser.add_argument("--threads", type=positive_int, metavar="N", help="encoder threads (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle at OUT")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    report = compress_checkpoint(
        args.src,
        args.output,
        policy=CompressionPolicy.default(embeddings=args.embeddings),
        cast_to_bf16=args.cast_bf16,
        max_shard_bytes=args.max_shard_size,
        threads=args.threads,
        overwrite=args.overwrite,
        progress=sys.stderr.isatty(),
    )
    compressed = report.compressed
    print(f"wrote {report.output}: {len(report.tensors)} tensors, {len(compressed)} compressed")
    if compressed:
        bf16 = sum(t.bf16_bytes for t in compressed)
        print(
            f"compressed tensors: {human_bytes(bf16)} bf16 -> {human_bytes(sum(t.stored_bytes for t in compressed))} "
            f"({report.huffman_ratio:.4f} of bf16; exponent-entropy bound {report.bound_ratio:.4f})"
        )
    for rule in report.unmatched_rules:
        print(f'unweight compress: note: rule "{rule.name_pattern}" matched no tensor', file=sys.stderr)
    return 0
