"""`unweight inspect BUNDLE`: what each tensor costs, against bf16, the entropy bound and the palette form."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass

from .. import codec
from ..bundle import BundleError, BundleReader, TensorInfo, TensorValue
from ..compress import TensorReport, entropy_bound_bytes
from ..format import GROUP, FormatError, HuffmanParts, as_matrix_shape
from ._units import human_bytes
from . import CommandError
from .tune import parse_batches


@dataclass(frozen=True)
class TensorStats(TensorReport):
    """A tensor's report, plus for a compressed tensor its palette form, built on the fly."""

    palette_bytes: int | None = None  # every array of the palette form (idx, sm, escapes, palette)
    escape_groups: int | None = None
    groups: int | None = None  # 64-element groups of the tensor


@dataclass(frozen=True)
class BundleSummary:
    tensors: int
    compressed: int
    bf16_bytes: int  # all tensors at 2 bytes per element
    stored_bytes: int  # all tensors as stored
    huffman_bf16_bytes: int  # the compressed tensors at 2 bytes per element
    huffman_bytes: int
    bound_bytes: float  # exponent-entropy bound of the compressed tensors
    palette_bytes: int
    escape_groups: int
    groups: int
    file_bytes: int

    @property
    def huffman_ratio(self) -> float:
        return self.huffman_bytes / self.huffman_bf16_bytes if self.huffman_bf16_bytes else 1.0

    @property
    def bound_ratio(self) -> float:
        return self.bound_bytes / self.huffman_bf16_bytes if self.huffman_bf16_bytes else 1.0

    @property
    def gap_to_bound_pct(self) -> float:
        return 100 * (self.huffman_bytes / self.bound_bytes - 1) if self.bound_bytes else 0.0

    @property
    def palette_ratio(self) -> float:
        return self.palette_bytes / self.huffman_bf16_bytes if self.huffman_bf16_bytes else 1.0

    @property
    def escape_group_rate(self) -> float:
        return self.escape_groups / self.groups if self.groups else 0.0


def tensor_stats(info: TensorInfo, value: TensorValue) -> TensorStats:
    """Measure one tensor as read from a bundle (a compressed one is decoded)."""
    array = codec.decompress(value) if isinstance(value, HuffmanParts) else value
    report = TensorReport(
        info.name,
        info.shape,
        info.encoding,
        info.reason or "",
        2 * info.size,
        info.stored_bytes,
        entropy_bound_bytes(array),
    )
    if not isinstance(value, HuffmanParts):
        return TensorStats(**vars(report))
    palette = codec.huffman_to_palette(value)
    rows, cols = as_matrix_shape(info.shape)
    return TensorStats(
        **vars(report),
        palette_bytes=palette.nbytes,
        escape_groups=len(palette.esc_groups),
        groups=rows * -(-cols // GROUP),
    )


def bundle_stats(reader: BundleReader) -> list[TensorStats]:
    stats = []
    for name in reader.names:
        info, value = reader.info(name), reader.read(name)
        try:
            stats.append(tensor_stats(info, value))
        except FormatError as e:  # a stream that does not decode: say which tensor
            raise BundleError(f"{info.file}: tensor {name!r}: {e}") from None
    return stats


def summarize(stats: Sequence[TensorStats], file_bytes: int) -> BundleSummary:
    compressed = [t for t in stats if t.encoding == "huffman"]
    return BundleSummary(
        tensors=len(stats),
        compressed=len(compressed),
        bf16_bytes=sum(t.bf16_bytes for t in stats),
        stored_bytes=sum(t.stored_bytes for t in stats),
        huffman_bf16_bytes=sum(t.bf16_bytes for t in compressed),
        huffman_bytes=sum(t.stored_bytes for t in compressed),
        bound_bytes=sum(t.entropy_bound_bytes or 0.0 for t in compressed),
        palette_bytes=sum(t.palette_bytes or 0 for t in compressed),
        escape_groups=sum(t.escape_groups or 0 for t in compressed),
        groups=sum(t.groups or 0 for t in compressed),
        file_bytes=file_bytes,
    )


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "inspect",
        help="show what each tensor of a bundle costs",
        description="Per tensor: shape, encoding and why, bf16 and stored bytes, the ratio, the exponent-entropy "
        "bound and the gap to it, and the size of the palette (inference) form computed on the fly.",
    )
    parser.add_argument("bundle", metavar="BUNDLE", help="a .unw.safetensors file, or the index of a sharded bundle")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--plan", action="store_true", help="instead, the plan each projection runs at each --batch (autotune cache)"
    )
    parser.add_argument("--batch", default="1,16,256,2048", help="with --plan: comma-separated batch sizes")
    parser.add_argument("--cache", help="with --plan: the autotune cache file (default: as `unweight tune`)")
    parser.add_argument("--form", help="with --plan: the resident form (default: the one loading picks here)")
    parser.add_argument(
        "--layer-plan",
        action="store_true",
        help="instead, which layers are hard (Huffman-resident) and easy (palette) to fit --max-weight-memory",
    )
    parser.add_argument("--max-weight-memory", metavar="SIZE", help="with --layer-plan: the budget, e.g. 6.5GB or 7GiB")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.layer_plan:
        print(layer_plan_text(args.bundle, args.max_weight_memory))
        return 0
    if args.plan:
        print(plan_text(args.bundle, parse_batches(args.batch), args.cache, args.form))
        return 0
    reader = BundleReader(args.bundle)
    print(json.dumps(report_json(reader), indent=2) if args.json else report_text(reader))
    return 0


def plan_text(bundle: str, batches: Sequence[int], cache: str | None, form: str | None = None) -> str:
    """Per projection, the plan that runs at each batch: cached, or the static one if untuned."""
    from ..autotune import planned

    try:
        listing = planned(bundle, batches, form=form, cache=cache)
    except ValueError as e:  # no projection to plan for
        raise CommandError(str(e)) from None
    rows = [("tensor", "shape", "form", *(f"batch {b}" for b in batches))]
    for name, (r, c), form, plans in listing:
        rows.append((name, f"{r}x{c}", form, *(plans[b] for b in batches)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def layer_plan_text(bundle: str, max_weight_memory: str | None) -> str:
    """Per projection, its form and bytes under the budget's layer plan; then the total against bf16."""
    from ..layer_plan import bundle_sizes, parse_size, plan_layers, plan_table

    if max_weight_memory is None:
        raise CommandError("--layer-plan needs --max-weight-memory SIZE (e.g. 6.5GB)")
    try:
        return plan_table(plan_layers(bundle_sizes(bundle), parse_size(max_weight_memory, "--max-weight-memory")))
    except ValueError as e:
        raise CommandError(str(e)) from None


def report_text(reader: BundleReader) -> str:
    """The per-tensor table and the totals, as `unweight inspect` prints them."""
    stats = bundle_stats(reader)
    return _table(stats) + "\n" + _totals(summarize(stats, reader.file_bytes), len(reader.files))


def report_json(reader: BundleReader) -> dict[str, object]:
    """What `unweight inspect --json` prints: every tensor's figures and the totals."""
    stats = bundle_stats(reader)
    summary = summarize(stats, reader.file_bytes)
    derived = ("huffman_ratio", "bound_ratio", "gap_to_bound_pct", "palette_ratio", "escape_group_rate")
    return {
        "bundle": str(reader.path),
        "files": [str(f) for f in reader.files],
        "tensors": [dataclasses.asdict(t) for t in stats],
        "totals": dataclasses.asdict(summary) | {key: getattr(summary, key) for key in derived},
    }


def _table(stats: Sequence[TensorStats]) -> str:
    header = ("tensor", "shape", "encoding", "bf16", "stored", "ratio", "bound", "gap %", "palette", "esc %", "why")
    rows = [header]
    for t in stats:
        bound = t.entropy_bound_bytes / t.bf16_bytes if t.entropy_bound_bytes and t.bf16_bytes else None
        compressed = t.encoding == "huffman"
        rows.append((
            t.name,
            "x".join(map(str, t.shape)) or "scalar",
            t.encoding,
            human_bytes(t.bf16_bytes),
            human_bytes(t.stored_bytes),
            f"{t.ratio:.4f}",
            f"{bound:.4f}" if bound is not None else "-",
            f"{100 * (t.stored_bytes / t.entropy_bound_bytes - 1):.2f}" if compressed and bound is not None else "-",
            f"{t.palette_bytes / t.bf16_bytes:.4f}" if t.palette_bytes is not None and t.bf16_bytes else "-",
            f"{100 * t.escape_groups / t.groups:.2f}" if t.groups else "-",
            t.reason,
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    left = {0, 1, 2}
    return "\n".join(
        "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + "  " + r[-1]
        for r in rows
    )


def _totals(s: BundleSummary, files: int) -> str:
    lines = [f"tensors: {s.tensors}, compressed: {s.compressed}"]
    if s.compressed:
        lines += [
            f"huffman: {human_bytes(s.huffman_bf16_bytes)} bf16 -> {human_bytes(s.huffman_bytes)}, "
            f"ratio {s.huffman_ratio:.4f}; "
            f"entropy bound {s.bound_ratio:.4f} (gap {s.gap_to_bound_pct:.2f} %)",
            f"palette: {human_bytes(s.palette_bytes)}, ratio {s.palette_ratio:.4f}; "
            f"escape groups {100 * s.escape_group_rate:.2f} % of {s.groups}",
        ]
    lines.append(f"all tensors: {human_bytes(s.bf16_bytes)} as bf16, {human_bytes(s.stored_bytes)} stored; "
                 f"on disk {human_bytes(s.file_bytes)} in {files} file(s)")
    return "\n".join(lines)
