"""Hard down projections decoded on a second CUDA stream (issue 12): does XLA overlap them?

An MLP stack of Llama-3.1-8B shapes with gate and up palette-resident ("easy") and down
Huffman-resident ("hard", transcode form), run three ways in one process:

- `easy`: every matrix palette-resident, the plan the hard/easy split is measured against;
- `inline`: down decodes its 4-bit indices inside its own matmul, on XLA's stream (today's path);
- `side`: each layer first asks for its down projection's indices from a decode placed on
  `gpu_stream:1` (`unweight_jax.streams.on_stream`: XLA turns it into an async start/done pair
  on a second stream), then runs gate and up, then down from the decoded indices.

For each: the step time (a fori_loop of steps in one jit, median of calls), the compiled
program's temporary bytes (decoded index buffers alive at once), and whether the compiled HLO
holds the async pair. Writes side_stream-<device>.{json,md}.

    python3 benchmarks/side_stream.py --out DIR                       # on the GPU machine
    python3 benchmarks/side_stream.py --shape 512x256 --layers 2       # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

from unweight_jax.autotune.measure import synthetic_parts
from unweight_jax.bench.timing import wall_ms
from unweight_jax.format import DEFAULT_CHUNK_STEPS
from unweight_jax.pipelines import matmul, transcode, transcode_indices
from unweight_jax.streams import on_stream
from unweight_jax.weights import from_huffman
from run_info import device_tag, run_info

MODES = ("easy", "inline", "side")
SIDE_STREAM = 1  # gpu_stream:1


def stack(hidden: int, dim: int, layers: int) -> dict[str, list]:
    """Per mode, the layers' (gate, up, down) weights; the layers share one synthetic matrix per
    shape but each holds its own device copy, so every layer reads its weights from memory."""
    gate = synthetic_parts(hidden, dim, DEFAULT_CHUNK_STEPS)
    down = synthetic_parts(dim, hidden, DEFAULT_CHUNK_STEPS)
    copy = lambda tree: jax.tree.map(lambda a: jnp.array(a, copy=True), tree)
    easy_gate, easy_down, hard_down = from_huffman(gate, "palette"), from_huffman(down, "palette"), from_huffman(down, "transcode")
    weights = {}
    for mode in MODES:
        d = easy_down if mode == "easy" else hard_down
        weights[mode] = [(copy(easy_gate), copy(easy_gate), copy(d)) for _ in range(layers)]
    return weights


def step(mode: str, x: jax.Array, layers: list) -> jax.Array:
    h = x
    for gate, up, down in layers:
        if mode == "side":
            down = transcode(down, on_stream(transcode_indices, SIDE_STREAM)(down))
        a = jax.nn.silu(matmul(h, gate).astype(jnp.float32)) * matmul(h, up).astype(jnp.float32)
        y = matmul(a.astype(h.dtype), down).astype(jnp.float32)
        h = (y * lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + 1e-6)).astype(h.dtype)  # stays finite
    return h


def program(mode: str, steps: int):
    def run(x, layers):
        return lax.fori_loop(0, steps, lambda _, h: step(mode, h, layers), x)

    return jax.jit(run)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="14336x4096", help="gate/up [hidden x dim]; down is its transpose")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--commit")
    args = parser.parse_args()
    hidden, dim = (int(v) for v in args.shape.split("x"))
    weights = stack(hidden, dim, args.layers)
    report = {
        **run_info("side_stream", commit=args.commit),
        "shape": f"{args.layers} x (gate {hidden}x{dim}, up, down {dim}x{hidden})",
        "timing": f"median of {args.reps} jit calls of {args.steps} steps (fori_loop), per step",
        "rows": [],
    }
    for batch in (int(b) for b in args.batches.split(",")):
        x = jax.random.normal(jax.random.key(batch), (batch, dim), jnp.float32).astype(jnp.bfloat16)
        row = {"batch": batch, "shape": report["shape"], "pipeline": f"transcode down on gpu_stream:{SIDE_STREAM}",
               "baseline": "all palette (easy)"}
        for mode in MODES:
            run = program(mode, args.steps)
            try:
                compiled = run.lower(x, weights[mode]).compile()
            except jax.errors.JaxRuntimeError as err:  # XLA may refuse the stream annotation (jaxlib 0.11.2 does)
                row[f"{mode}_error"] = str(err).splitlines()[0][:300]
                print(f"batch {batch}, {mode}: XLA does not compile it: {row[f'{mode}_error']}", flush=True)
                continue
            text = compiled.as_text()
            row[f"{mode}_ms"] = round(wall_ms(compiled, x, weights[mode], reps=args.reps) / args.steps, 4)
            row[f"{mode}_temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
            row[f"{mode}_async_ops"] = text.count("async-start") + text.count("call-start")
        row["baseline_ms"] = row["easy_ms"]
        row["inline_ratio"] = round(row["easy_ms"] / row["inline_ms"], 3)
        # null where XLA refused the side stream: the schema's fields stay, with no time to give
        row["ours_ms"] = row.get("side_ms")
        row["ratio"] = round(row["easy_ms"] / row["side_ms"], 3) if "side_ms" in row else None
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"side_stream-{device_tag(report['device'])}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [
        f"# Hard down projections on a second stream: {report['shape']}, {report['device']}",
        "",
        f"`benchmarks/side_stream.py`, {report['date']}, commit `{report['commit']}`, jax {report['jax_version']}. "
        f"{report['timing']}; ratio = all-palette time / this time.",
        "",
        "| batch | all palette ms | hard inline ms (ratio) | hard on side stream ms (ratio) | async pairs (side) "
        "| temp MB: palette / inline / side |",
        "|---|---|---|---|---|---|",
    ]
    errors = []
    for r in report["rows"]:
        temps = " / ".join(f"{r[f'{m}_temp_bytes'] / 1e6:.1f}" if f"{m}_temp_bytes" in r else "-" for m in MODES)
        side = f"{r['side_ms']:.3f} ({r['ratio']:.2f})" if "side_ms" in r else "XLA refused to compile it (below)"
        lines.append(
            f"| {r['batch']} | {r['easy_ms']:.3f} | {r['inline_ms']:.3f} ({r['inline_ratio']:.2f}) "
            f"| {side} | {r.get('side_async_ops', '-')} | {temps} |"
        )
        errors += [f"- batch {r['batch']}, {m}: `{r[f'{m}_error']}`" for m in MODES if f"{m}_error" in r]
    return "\n".join(lines + ([""] + errors if errors else [])) + "\n"


if __name__ == "__main__":
    sys.exit(main())
