"""What a decode-step call costs besides its steps: the compressed Llama against bf16.

`unweight bench` times calls of a few steps (a fori_loop inside one jit) and divides by the steps,
so whatever a call costs once (dispatch, argument handling, command-buffer updates) is spread over
them. This script times calls of several step counts for both models and fits

    call ms = per_call_ms + steps * per_step_ms

so the two parts are separated, and with --trace records one call of each model with the JAX
profiler (CUPTI) and summarizes its timeline: the costliest host events, the kernels' busy time
against their span, and the largest gaps between kernels with the kernels on either side.

    python3 benchmarks/call_overhead.py --out DIR [--size 8b] [--layers 32] [--batch 1] [--steps 2 8 32] [--args leaves|state] [--trace]

writes DIR/call_overhead-<device>.{json,md}. The model is the Llama-3.1-8B configuration (or
--size tiny) with --layers layers and generated weights; the compressed one runs its autotuned plans.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import re
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unweight_jax.bench.decode_step import (
    Case,
    Placement,
    _decode_steps,
    cache_spec,
    filled_cache,
    lower_step,
    start_tokens,
    state_leaves,
)
from unweight_jax.bench.models import SIZE_NAMES, SIZES, compress_model, random_model
from unweight_jax.bench.plans import chosen_plans
from unweight_jax.bench.run_info import device_tag, run_info

GAP_US = 2.0  # kernel-to-kernel gaps below this are launch latency inside a graph, not counted as gaps


def _steps_taking_state(graphdef, state, cache, tokens, *, context: int, steps: int):
    leaves, treedef = jax.tree.flatten(state)
    return _decode_steps(graphdef, treedef, leaves, cache, tokens, context=context, steps=steps)


# `unweight bench`'s call before it took the state as flat arrays: the nnx state tree as an argument.
steps_taking_state = jax.jit(_steps_taking_state, static_argnums=(0,), static_argnames=("context", "steps"), donate_argnums=(2,))


def compile_step(model, case: Case, steps: int, placement: Placement, args: str):
    if args == "leaves":
        return lower_step(model, case, steps, placement).compile()
    graphdef, state = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((case.batch,), jnp.int32, sharding=placement.replicated)
    return steps_taking_state.lower(graphdef, state, cache_spec(model.config, case, steps, placement), tokens,
                                    context=case.context, steps=steps).compile()


def call_args(model, args: str):
    return state_leaves(model)[2] if args == "leaves" else nnx.state(model)


def time_calls(compiled, state, cache, tokens, reps: int) -> tuple[dict, object]:
    """Median dispatch time (until the call returns) and call time (until its result is ready), ms."""
    cache, chosen = compiled(state, cache, tokens)
    jax.block_until_ready(chosen)
    dispatch, total = [], []
    for _ in range(reps):
        start = time.perf_counter()
        cache, chosen = compiled(state, cache, tokens)
        returned = time.perf_counter()
        jax.block_until_ready(chosen)
        dispatch.append(returned - start)
        total.append(time.perf_counter() - start)
    return {"dispatch_ms": statistics.median(dispatch) * 1e3, "call_ms": statistics.median(total) * 1e3}, cache


def fit(steps: list[int], call_ms: list[float]) -> tuple[float, float]:
    """Least-squares (per_call_ms, per_step_ms) of call_ms = a + b * steps."""
    b, a = np.polyfit(np.asarray(steps, float), np.asarray(call_ms, float), 1)
    return float(a), float(b)


def _short(name: str) -> str:
    return re.sub(r"\s+", " ", name)[:110]


def timeline(xplane: str) -> dict:
    """The costliest host events (by total time, per plane and line) and the GPU kernels' busy time,
    span and largest gaps, from one profiler capture."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(xplane)
    host: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    kernels: list[tuple[float, float, str]] = []
    for plane in data.planes:
        if plane.name.startswith("/device:GPU"):
            for line in plane.lines:
                if line.name.startswith("Stream"):
                    kernels += [(e.start_ns, e.start_ns + e.duration_ns, e.name) for e in line.events]
        elif plane.name.startswith("/host"):
            for line in plane.lines:
                for e in line.events:
                    entry = host[(line.name[:40], _short(e.name))]
                    entry[0] += 1
                    entry[1] += e.duration_ns / 1e3
    kernels.sort()
    busy, gaps, end = 0.0, [], None
    for start, stop, name in kernels:
        if end is not None and start - end[0] > GAP_US * 1e3:
            gaps.append(((start - end[0]) / 1e3, end[1], _short(name)))
        if end is None or stop > end[0]:
            busy += (stop - max(start, end[0] if end else start)) / 1e3
            end = (stop, _short(name))
    top_host = sorted(host.items(), key=lambda kv: -kv[1][1])[:30]
    return {
        "kernels": len(kernels),
        "span_us": round((kernels[-1][1] - kernels[0][0]) / 1e3, 1) if kernels else 0.0,
        "busy_us": round(busy, 1),
        "gaps_over_threshold": len(gaps),
        "gap_us_total": round(sum(g[0] for g in gaps), 1),
        "largest_gaps": [{"us": round(g, 1), "after": a, "before": b} for g, a, b in sorted(gaps, reverse=True)[:15]],
        "host_events": [{"line": k[0], "event": k[1], "count": v[0], "total_us": round(v[1], 1)} for k, v in top_host],
    }


def trace_call(compiled, state, cache, tokens, workdir: str) -> tuple[dict, object]:
    with jax.profiler.trace(workdir):
        cache, chosen = compiled(state, cache, tokens)
        jax.block_until_ready(chosen)
    found = sorted(glob.glob(f"{workdir}/**/*.xplane.pb", recursive=True))
    if not found:
        raise RuntimeError(f"the profiler wrote no .xplane.pb under {workdir}")
    return timeline(found[-1]), cache


def write_markdown(report: dict, path: Path) -> None:
    lines = [
        f"# Per-call and per-step cost of a decode step: {report['model']}, batch {report['batch']}, "
        f"context {report['context']}, {report['device']}",
        "",
        f"`benchmarks/call_overhead.py`, {report['date']}, commit `{report['commit']}`, jax {report['jax_version']}. "
        f"Median of {report['reps']} calls per step count; dispatch: until the call returns; call: until its result is ready. "
        f"The model's state is passed as {'its flat arrays' if report['args'] == 'leaves' else 'the nnx state tree'}.",
        "",
        "| model | steps | dispatch ms | call ms | ms per step |",
        "|---|---|---|---|---|",
    ]
    for row in report["calls"]:
        lines.append(f"| {row['model']} | {row['steps']} | {row['dispatch_ms']:.3f} | {row['call_ms']:.3f} | "
                     f"{row['call_ms'] / row['steps']:.3f} |")
    lines += ["", "Fit `call ms = per call + steps x per step`:", "", "| model | per call ms | per step ms |", "|---|---|---|"]
    for label, f in report["fit"].items():
        lines.append(f"| {label} | {f['per_call_ms']:.3f} | {f['per_step_ms']:.3f} |")
    for label, t in report.get("trace", {}).items():
        lines += ["", f"## Timeline of one call of {report['trace_steps']} steps: {label}", "",
                  f"{t['kernels']} kernels; span {t['span_us']} us, busy {t['busy_us']} us; "
                  f"{t['gaps_over_threshold']} gaps over {GAP_US} us, {t['gap_us_total']} us in all.", "",
                  "| gap us | after | before |", "|---|---|---|"]
        lines += [f"| {g['us']} | `{g['after']}` | `{g['before']}` |" for g in t["largest_gaps"]]
        lines += ["", "| host line | event | count | total us |", "|---|---|---|---|"]
        lines += [f"| {h['line']} | `{h['event']}` | {h['count']} | {h['total_us']} |" for h in t["host_events"]]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", choices=sorted(SIZES), default="8b")
    parser.add_argument("--layers", type=int, help="layers (default: the configuration's)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace", action="store_true", help="profile one call of the largest step count per model")
    parser.add_argument("--args", choices=("leaves", "state"), default="leaves",
                        help="pass the model as its flat state arrays (as unweight bench does) or as the nnx state tree")
    parser.add_argument("--commit", help="the commit measured, where the checkout has no .git")
    args = parser.parse_args()

    config = SIZES[args.size]
    config = dataclasses.replace(config, n_layers=args.layers or config.n_layers)
    bf16 = random_model(config, args.seed)
    models = {"bf16": bf16, "ours": compress_model(bf16, None)}
    case, placement = Case(args.batch, args.context), Placement()
    report = {**run_info("call_overhead", commit=args.commit), "model": f"{SIZE_NAMES[args.size]}, {config.n_layers} layers",
              "batch": args.batch, "context": args.context, "reps": args.reps, "args": args.args,
              "plans": chosen_plans(models["ours"], args.batch), "calls": [], "rows": []}
    tokens = start_tokens(config, case, args.seed + 1, placement)
    compiled_last = {}
    for steps in args.steps:
        cache = filled_cache(config, case, steps, args.seed, placement)
        for label, model in models.items():
            compiled = compile_step(model, case, steps, placement, args.args)
            timing, cache = time_calls(compiled, call_args(model, args.args), cache, tokens, args.reps)
            report["calls"].append({"model": label, "steps": steps, **{k: round(v, 4) for k, v in timing.items()}})
            print(f"{label:5s} steps {steps:3d}: dispatch {timing['dispatch_ms']:.3f} ms, call {timing['call_ms']:.3f} ms", flush=True)
            compiled_last[label] = compiled
        if steps == max(args.steps):
            last_cache = cache
        else:
            del cache
    report["fit"] = {}
    for label in models:
        rows = [r for r in report["calls"] if r["model"] == label]
        per_call, per_step = fit([r["steps"] for r in rows], [r["call_ms"] for r in rows])
        report["fit"][label] = {"per_call_ms": round(per_call, 4), "per_step_ms": round(per_step, 4)}
    base, ours = report["fit"]["bf16"], report["fit"]["ours"]
    report["rows"].append({"batch": args.batch, "context": args.context, "model": report["model"], "pipeline": "palette",
                           "ours_ms": ours["per_step_ms"], "baseline_ms": base["per_step_ms"], "baseline": "xla_bf16",
                           "ratio": round(base["per_step_ms"] / ours["per_step_ms"], 3),
                           "ours_per_call_ms": ours["per_call_ms"], "baseline_per_call_ms": base["per_call_ms"]})
    if args.trace:
        report["trace_steps"] = max(args.steps)
        report["trace"] = {}
        for label, model in models.items():
            with tempfile.TemporaryDirectory() as workdir:
                report["trace"][label], last_cache = trace_call(compiled_last[label], call_args(model, args.args), last_cache,
                                                                tokens, workdir)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"call_overhead-{device_tag(report['device'])}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, stem.with_suffix(".md"))
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
