"""`unweight tune BUNDLE --batch 1,2,4,...`: tune every distinct projection shape of a bundle ahead
of time, into the autotune cache, and report what was chosen and what it gains."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import CommandError

if TYPE_CHECKING:  # the command imports jax and the tuner only when it runs
    from ..autotune import TuneRow

DEFAULT_BATCHES = ",".join(str(1 << k) for k in range(12))  # 1 .. 2048


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "tune",
        help="choose, by measuring, the pipeline and kernel of every matrix and batch",
        description="Times every candidate plan of each distinct (shape, resident form) of the bundle's projections "
        "at each batch, on this machine's device, and stores the fastest in the autotune cache (docs/AUTOTUNE.md). "
        "Cells already cached are read, not measured, unless --retune.",
    )
    parser.add_argument("bundle", metavar="BUNDLE", help="a .unw.safetensors file, or the index of a sharded bundle")
    parser.add_argument("--batch", default=DEFAULT_BATCHES, help=f"comma-separated batches (default {DEFAULT_BATCHES})")
    parser.add_argument("--cache", type=Path, help="the cache file (default: $UNWEIGHT_AUTOTUNE_CACHE, else ~/.cache)")
    parser.add_argument("--out", type=Path, help="also write tune.md, tune.json and tune.png (a heat map) here")
    parser.add_argument("--form", help="resident form to tune (default: the one loading picks on this backend)")
    parser.add_argument("--dtype", default="bfloat16", help="activation dtype (default bfloat16)")
    parser.add_argument("--retune", action="store_true", help="measure again cells that are cached")
    parser.set_defaults(run=run)


def parse_batches(text: str) -> list[int]:
    """"1,2,4" -> [1, 2, 4]; each a positive integer."""
    try:
        batches = [int(b) for b in text.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise CommandError(f"--batch {text!r}: expected comma-separated positive integers, e.g. 1,2,4")
    return batches


def run(args: argparse.Namespace) -> int:
    from .. import autotune
    from ..autotune.key import this_machine

    batches = parse_batches(args.batch)
    try:
        rows = autotune.tune(
            args.bundle, batches, cache=args.cache, x_dtype=args.dtype, form=args.form, retune=args.retune
        )
    except (ValueError, TypeError) as e:
        raise CommandError(str(e)) from None
    table = markdown(rows)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        machine = this_machine()
        report = {
            "device": machine.device_kind,
            "machine": dataclasses.asdict(machine),
            "cache": str(autotune.cache_path(args.cache)),
            "rows": [dataclasses.asdict(r) | {"speedup": round(r.speedup, 4)} for r in rows],
        }
        (args.out / "tune.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "tune.md").write_text(f"# unweight tune: {machine.device_kind}\n\n{table}")
        heat_map(rows, args.out / "tune.png", f"{Path(args.bundle).name} on {machine.device_kind}")
    return 0


def markdown(rows: Sequence[TuneRow]) -> str:
    lines = [
        "| matrix | form | batch | chosen plan | ms | decode + XLA dot ms | speed-up | tensors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.matrix} | {r.form} | {r.batch} | {r.plan} | {r.plan_ms:.4f} | {r.decode_ms:.4f} | "
            f"{r.speedup:.2f}x | {len(r.tensors)} |"
        )
    return "\n".join(lines) + "\n"


def heat_map(rows: Sequence[TuneRow], path: Path, title: str) -> None:
    """Rows = matrices, columns = batches, colour = speed-up over decode + XLA dot, text = the plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    matrices = list(dict.fromkeys(f"{r.matrix} {r.form}" for r in rows))
    batches = sorted({r.batch for r in rows})
    speedup = np.full((len(matrices), len(batches)), np.nan)
    fig, ax = plt.subplots(figsize=(1.3 * len(batches) + 2.5, 0.8 * len(matrices) + 1.5))
    for r in rows:
        i, j = matrices.index(f"{r.matrix} {r.form}"), batches.index(r.batch)
        speedup[i, j] = r.speedup
        plan = r.plan.split("/", 1)[-1]  # the kernel says more than the pipeline, which the row names
        ax.text(j, i, f"{plan}\n{r.speedup:.2f}x", ha="center", va="center", fontsize=7)
    # Red below 1 (slower than decoding to bf16), green above.
    norm = TwoSlopeNorm(vmin=min(0.5, np.nanmin(speedup)), vcenter=1.0, vmax=max(2.0, np.nanmax(speedup)))
    image = ax.imshow(speedup, cmap="RdYlGn", norm=norm)
    ax.set_xticks(range(len(batches)), [str(b) for b in batches])
    ax.set_yticks(range(len(matrices)), matrices)
    ax.set_xlabel("batch")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="speed-up over decode + XLA dot")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
