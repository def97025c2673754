"""Speed of the C++ codec on the CPU: compress and decompress of Llama-3.1-8B-shaped matrices and
of the real weights of stories260K, with one thread and with every thread.

    python benchmarks/codec_speed.py [--reps 5]

The matrices are bf16 drawn from N(0, 0.02) (2.55 bits of exponent entropy; trained weights have
about 2.6). stories260K's fp32 values (llama2.c format: 7 int32 of header, then the arrays) are
flattened into one tensor and cast to bf16. Each figure is the median of `--reps` timed calls of
the public API (`unweight_jax.codec.compress` / `decompress`, output allocation included) after
one warm-up call. Two rates per call:

- `*_mb_s`: bf16 megabytes (10^6) per second of wall-clock time: what a caller waits;
- `*_mb_s_per_core`: bf16 megabytes per second of CPU time summed over the process's threads
  (`time.process_time`): the work one core does, not slowed by other processes sharing the
  machine. With one thread on an idle machine the two agree.

Writes benchmarks/results/codec_speed-cpu.json and codec_speed-cpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np

from unweight_jax import codec
from run_info import run_info

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
STORIES = REPO / "unweight_jax" / "data" / "stories260K.bin"
LLAMA_8B_SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096)]  # up/gate, down, q/o projections
LLAMA2C_HEADER_BYTES = 7 * 4


def gaussian(shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(ml_dtypes.bfloat16)


def stories_weights(path: Path) -> np.ndarray:
    values = np.frombuffer(path.read_bytes()[LLAMA2C_HEADER_BYTES:], dtype=np.float32)
    return values.astype(ml_dtypes.bfloat16)


def timed(fn: Callable[[], object], reps: int) -> tuple[float, float, object]:
    """Median wall and CPU seconds of `reps` calls after a warm-up call, and the last result."""
    result = fn()
    walls, cpus = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), result


def measure(name: str, x: np.ndarray, threads: int, reps: int) -> dict:
    mb = x.nbytes / 1e6
    c_wall, c_cpu, parts = timed(lambda: codec.compress(x, threads=threads), reps)
    d_wall, d_cpu, y = timed(lambda: codec.decompress(parts, threads=threads), reps)
    if not np.array_equal(y.view(np.uint16), x.view(np.uint16)):
        raise AssertionError(f"{name}: decompress did not return the input")
    return {
        "shape": name,
        "threads": threads,
        "compress_mb_s": round(mb / c_wall, 1),
        "decompress_mb_s": round(mb / d_wall, 1),
        "compress_mb_s_per_core": round(mb / c_cpu, 1),
        "decompress_mb_s_per_core": round(mb / d_cpu, 1),
        "ratio": round(parts.nbytes / x.nbytes, 5),
    }


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def markdown(report: dict) -> str:
    lines = [
        f"# codec speed, {report['device']}",
        "",
        f"jax {report['jax_version']}, commit {report['commit']}, {report['date']}. "
        "MB = 10^6 bytes of bf16. Per core: per second of CPU time summed over threads; "
        "total: per second of wall-clock time. Median of "
        f"{report['reps']} calls; load average {report['load_average']} before the run.",
        "",
        "| tensor | threads | compress MB/s per core | decompress MB/s per core "
        "| compress MB/s total | decompress MB/s total | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['shape']} | {r['threads']} | {r['compress_mb_s_per_core']:.0f} | {r['decompress_mb_s_per_core']:.0f} "
            f"| {r['compress_mb_s']:.0f} | {r['decompress_mb_s']:.0f} | {r['ratio']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="timed calls per case (median reported)")
    parser.add_argument("--stories", type=Path, default=STORIES, help="llama2.c checkpoint (skipped if missing)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0))
    cases = [(f"{r}x{c}", lambda r=r, c=c, i=i: gaussian((r, c), seed=i)) for i, (r, c) in enumerate(LLAMA_8B_SHAPES)]
    if args.stories.exists():
        stories = stories_weights(args.stories)
        cases.append((f"stories260K, flat [{stories.size}]", lambda: stories))
    else:
        print(f"{args.stories} not found: stories260K skipped")

    load = "/".join(f"{v:.2f}" for v in os.getloadavg())
    rows = []
    for name, make in cases:
        x = make()
        for threads in sorted({1, cores}):
            rows.append(measure(name, x, threads, args.reps))
            print(rows[-1], flush=True)

    report = {
        **run_info("codec_speed", device=f"{cpu_model()} ({cores} cores)"),
        "reps": args.reps,
        "load_average": load,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "codec_speed-cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (args.out / "codec_speed-cpu.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
