"""`unweight verify BUNDLE [--against SRC]`: check every CRC and stream, and optionally every bit."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from ..bundle import BundleReader
from ..compress import open_source, to_bf16
from ..format import FormatError
from . import CommandError

EXIT_FAILED = 1  # the bundle was read and something in it is wrong


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "verify",
        help="check a bundle's integrity, and compare it with its source",
        description="Check every CRC and the structure of every tensor, decode every compressed tensor (its "
        "stream must end exactly at its last word) and, with --against, compare every tensor bit for bit with "
        "the source checkpoint (cast to bf16 first if the bundle was made with --cast-bf16). "
        "Exit status: 0 all good, 1 the bundle is corrupt or differs from the source, 2 usage or input error.",
    )
    parser.add_argument("bundle", metavar="BUNDLE", help="a .unw.safetensors file, or the index of a sharded bundle")
    parser.add_argument("--against", metavar="SRC", help="the checkpoint the bundle was made from")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        reader = BundleReader(args.bundle)
    except FormatError as e:
        raise CommandError(str(e), EXIT_FAILED) from None
    failures: list[str] = []
    checked = "every CRC and stream"
    seen: set[str] = set()
    if args.against is not None:
        checked += f", bit for bit against {args.against}"
        cast = bool((reader.source or {}).get("cast_to_bf16"))
        for name, array in open_source(args.against).tensors():  # one tensor in memory at a time
            seen.add(name)
            if name not in reader:
                failures.append(f"{reader.path}: tensor {name!r} of {args.against} is missing from the bundle")
                continue
            decoded = _decode(reader, name, failures)
            if decoded is None:
                continue
            problem = _difference(to_bf16(array) if cast else array, decoded)
            if problem:
                failures.append(f"{reader.path}: tensor {name!r} {problem} (source {args.against})")
    for name in reader.names:
        if name not in seen:
            _decode(reader, name, failures)
            if args.against is not None:
                failures.append(f"{reader.path}: tensor {name!r} is not in the source {args.against}")
    for failure in failures:
        print(f"unweight verify: error: {failure}", file=sys.stderr)
    if failures:
        print(f"{reader.path}: FAILED: {len(failures)} problem(s) in {len(reader)} tensors", file=sys.stderr)
        return EXIT_FAILED
    print(f"{reader.path}: OK: {len(reader)} tensors ({checked})")
    return 0


def _decode(reader: BundleReader, name: str, failures: list[str]) -> np.ndarray | None:
    """The tensor's values after every check, or None (and a failure noted)."""
    try:
        return reader.decode(name)
    except FormatError as e:
        failures.append(str(e))
        return None


def _difference(expected: np.ndarray, got: np.ndarray) -> str | None:
    if expected.dtype != got.dtype or expected.shape != got.shape:
        return f"is {got.dtype} {list(got.shape)}, the source has {expected.dtype} {list(expected.shape)}"
    differs = np.any(_element_bytes(expected) != _element_bytes(got), axis=1)
    count = int(differs.sum())
    if count == 0:
        return None
    first = np.unravel_index(int(np.argmax(differs)), expected.shape)
    return f"differs from the source in {count} of {expected.size} elements (first at index {tuple(map(int, first))})"


def _element_bytes(array: np.ndarray) -> np.ndarray:
    """[n, itemsize] bytes: equality bit for bit, whatever the dtype (NaN payloads, -0 included)."""
    return np.ascontiguousarray(array).view(np.uint8).reshape(-1, array.dtype.itemsize)
