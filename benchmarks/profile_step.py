"""Where a whole decode step's time goes, kernel by kernel: the compressed Llama against bf16.

The MLP alone is faster compressed at batch 1 while the whole step is slower (bench-h100), so the
loss lies in the attention projections, the LM head or the work between kernels. This script
measures, for each model, the step's wall time (a fori_loop of steps inside one jit, as `unweight
bench` does) and, under Nsight Compute, the duration of every kernel of one step: the sum of the
kernels against the wall time shows what launches and gaps cost, and the kernels grouped by family
show which work is slower.

    python3 benchmarks/profile_step.py --out DIR [--layers 4] [--batch 1]   # on a GPU machine with ncu

writes DIR/profile_step-<device>.{json,md}. It runs itself three times: once for the wall times,
then once per model under `ncu --profile-from-start off`, where the same compiled program of
--steps steps runs once between cuProfilerStart and cuProfilerStop (kernel times are per step).
The three processes share a JAX compilation cache and the autotune cache, so that XLA's slow
autotuning of the bf16 model happens once. The model is the Llama-3.1-8B configuration with
--layers layers (each layer does the full model's work; the LM head is the full one).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

MODELS = ("bf16", "ours")
UNITS = {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0, "second": 1e3, "s": 1e3}
# Kernel families, first match wins; the rest are XLA's own fusions and copies.
FAMILIES = [
    ("ours: palette GEMV", r"gemv_(mma|fma|rows|stream)"),
    ("ours: palette GEMM", r"gemm_sm90|sum_splits"),
    ("ours: decoders", r"huffman_decode|palette_(any|even)_cols|escape_groups"),
    ("cuBLAS / cuBLASLt GEMM", r"nvjet|sm90_xmma|gemm|gemv|cutlass|cublas"),
    ("XLA reductions (norms, softmax, argmax)", r"reduce|reduction"),
    ("XLA fusions (elementwise, RoPE, attention glue)", r"fusion|loop_"),
    ("copies and memsets", r"copy|memset|memcpy|transpose"),
]


def family(kernel: str) -> str:
    for name, pattern in FAMILIES:
        if re.search(pattern, kernel, re.IGNORECASE):
            return name
    return "other"


def kernel_ms(csv_text: str) -> list[tuple[str, float]]:
    """(kernel name, ms) for every kernel launch in an `ncu --csv --metrics gpu__time_duration.sum` log."""
    start = csv_text.find('"ID"')
    if start < 0:
        raise ValueError("no ncu CSV table in the log (did the step run between cuProfilerStart and Stop?)")
    rows = []
    for row in csv.DictReader(io.StringIO(csv_text[start:])):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit = row["Metric Unit"]
        if unit not in UNITS:
            raise ValueError(f"unexpected unit {unit!r} for gpu__time_duration.sum")
        rows.append((row["Kernel Name"], float(row["Metric Value"].replace(",", "")) * UNITS[unit]))
    return rows


def summarize(launches: list[tuple[str, float]], steps: int) -> dict:
    """Per step: launches and ms in all, by family and for the 15 costliest kernels."""
    by_family: dict[str, list[float]] = defaultdict(list)
    by_kernel: dict[str, list[float]] = defaultdict(list)
    for name, ms in launches:
        by_family[family(name)].append(ms)
        by_kernel[name[:120]].append(ms)
    top = sorted(by_kernel.items(), key=lambda kv: -sum(kv[1]))[:15]
    per_step = lambda v: {"launches": round(len(v) / steps, 2), "ms": round(sum(v) / steps, 4)}
    return {
        "kernels": round(len(launches) / steps, 2),
        "kernel_ms": round(sum(ms for _, ms in launches) / steps, 4),
        "families": {f: per_step(v) for f, v in sorted(by_family.items())},
        "top_kernels": [{"kernel": k, **per_step(v)} for k, v in top],
    }


# ----------------------------------------------------------------------------- child processes


def build(model: str, layers: int, batch: int, context: int, steps: int):
    """The model, its compiled `steps`-step call and a filled cache."""
    import jax

    from unweight_jax.bench.decode_step import Case, Placement, filled_cache, lower_step, start_tokens
    from unweight_jax.bench.models import SIZES, compress_model, random_model

    config = dataclasses.replace(SIZES["8b"], n_layers=layers)
    bf16 = random_model(config, seed=0)
    net = bf16 if model == "bf16" else compress_model(bf16, None)
    if net is not bf16:
        del bf16
    case = Case(batch, context)
    compiled = lower_step(net, case, steps, Placement()).compile()
    cache = filled_cache(config, case, steps, 0, Placement())
    tokens = start_tokens(config, case, 1, Placement())
    jax.block_until_ready(cache)
    return net, compiled, cache, tokens


def child_wall(args: argparse.Namespace) -> dict:
    from unweight_jax.bench.decode_step import time_steps

    out = {}
    for model in MODELS:
        net, compiled, cache, tokens = build(model, args.layers, args.batch, args.context, args.steps)
        timing, _ = time_steps(compiled, net, cache, tokens, steps=args.steps, reps=args.reps)
        out[model] = round(timing.ms, 4)
        del net, compiled, cache
    return out


def child_profile(args: argparse.Namespace) -> None:
    import ctypes

    import jax

    from unweight_jax.bench.decode_step import state_leaves

    net, compiled, cache, tokens = build(args.model, args.layers, args.batch, args.context, args.steps)
    _, _, leaves = state_leaves(net)
    cache, chosen = compiled(leaves, cache, tokens)  # warm-up: the first call's own work is not a step's
    jax.block_until_ready(chosen)
    libcuda = ctypes.CDLL("libcuda.so.1")
    libcuda.cuProfilerStart()
    cache, chosen = compiled(leaves, cache, tokens)
    jax.block_until_ready(chosen)
    libcuda.cuProfilerStop()


# ----------------------------------------------------------------------------- driver


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per timed call (wall time)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--commit")
    parser.add_argument("--child", choices=("wall", "profile"), help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "wall":
        print(json.dumps(child_wall(args)))
        return 0
    if args.child == "profile":
        child_profile(args)
        return 0

    ncu = shutil.which("ncu")
    if ncu is None:
        parser.error("needs Nsight Compute's ncu on PATH (a GPU machine)")
    from run_info import device_tag, run_info

    shape = ["--layers", str(args.layers), "--batch", str(args.batch), "--context", str(args.context)]
    me = [sys.executable, __file__, *shape, "--steps", str(args.steps)]
    shared = Path(tempfile.mkdtemp(prefix="profile_step-"))
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(shared / "jax"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "UNWEIGHT_AUTOTUNE_CACHE": str(shared / "autotune.json"),
    }
    wall = json.loads(subprocess.run(
        [*me, "--child", "wall", "--reps", str(args.reps)],
        check=True, stdout=subprocess.PIPE, text=True, env=env,  # the children's stderr is the log
    ).stdout.strip().splitlines()[-1])
    report = {
        **run_info("profile_step", commit=args.commit),
        "model": f"llama3.1-8b configuration, {args.layers} layers",
        "batch": args.batch,
        "context": args.context,
        "method": f"wall: median of fori_loop calls of {args.steps} steps as unweight bench; kernels: ncu gpu__time_duration.sum over one such call, per step",
        "rows": [],
    }
    profiles = {}
    for model in MODELS:
        done = subprocess.run(
            [ncu, "--profile-from-start", "off", "--clock-control", "none", "--metrics", "gpu__time_duration.sum",
             "--csv", *me, "--child", "profile", "--model", model],
            check=True, stdout=subprocess.PIPE, text=True, env=env,
        )
        profiles[model] = summarize(kernel_ms(done.stdout), args.steps)
        profiles[model]["wall_ms"] = wall[model]
    report["profiles"] = profiles
    report["rows"] = [{
        "batch": args.batch, "model": report["model"], "pipeline": "palette (autotuned)",
        "ours_ms": wall["ours"], "baseline_ms": wall["bf16"], "baseline": "xla_bf16",
        "ratio": round(wall["bf16"] / wall["ours"], 3),
        "ours_kernel_ms": profiles["ours"]["kernel_ms"], "baseline_kernel_ms": profiles["bf16"]["kernel_ms"],
    }]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"profile_step-{device_tag(report['device'])}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    p = report["profiles"]
    lines = [
        f"# One decode step, kernel by kernel: {report['model']}, batch {report['batch']}, "
        f"context {report['context']}, {report['device']}",
        "",
        f"`benchmarks/profile_step.py`, {report['date']}, commit `{report['commit']}`, jax {report['jax_version']}. "
        f"{report['method']}.",
        "",
        "| | bf16 (XLA) | compressed |",
        "|---|---|---|",
        f"| step, wall ms | {p['bf16']['wall_ms']:.3f} | {p['ours']['wall_ms']:.3f} |",
        f"| kernels, sum of ms | {p['bf16']['kernel_ms']:.3f} | {p['ours']['kernel_ms']:.3f} |",
        f"| kernel launches | {p['bf16']['kernels']} | {p['ours']['kernels']} |",
        f"| wall - kernels (launch gaps, host) | {p['bf16']['wall_ms'] - p['bf16']['kernel_ms']:.3f} "
        f"| {p['ours']['wall_ms'] - p['ours']['kernel_ms']:.3f} |",
    ]
    families = sorted(set(p["bf16"]["families"]) | set(p["ours"]["families"]))
    for f in families:
        cells = [p[m]["families"].get(f) for m in MODELS]
        lines.append(f"| {f} | " + " | ".join("-" if c is None else f"{c['ms']:.3f} ({c['launches']})" for c in cells) + " |")
    for model in MODELS:
        lines += ["", f"Top kernels, {model}:", "", "| kernel | launches | ms |", "|---|---|---|"]
        lines += [f"| `{k['kernel']}` | {k['launches']} | {k['ms']:.3f} |" for k in p[model]["top_kernels"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
