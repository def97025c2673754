"""Tensor parallelism on one host: the sharded compressed Llama against one GPU, and its scaling.

1. Greedy generation: the compressed model on one GPU (plain `CompressedLinear` layers) against
   the tensor-parallel one at each degree up to --tp, same bundle, same prompts.
2. `unweight bench` at degree 1 and at --tp, compressed and XLA bf16 side by side in each, with
   the all-reduce time of a step measured on its own (`allreduce_ms`).
3. Scaling: the speed-up of degree --tp over degree 1, for compressed and for bf16.

    python benchmarks/tensor_parallel.py --out DIR      # DIR/tensor_parallel-<device>.{json,md,png}
    python benchmarks/tensor_parallel.py --size tiny --batch 1,4 --context 64   # a CPU smoke run
                                                      # (XLA_FLAGS=--xla_force_host_platform_device_count=2)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # both models and the cache share each GPU

import jax
import jax.numpy as jnp
import numpy as np

from unweight_jax.bench.footprint import write_bundle
from unweight_jax.bundle import BundleReader
from unweight_jax.bench.models import SIZE_NAMES, SIZES, random_model
from unweight_jax.bench.run import Options, run_bench
from unweight_jax.loading import load_bundle_model
from unweight_jax.models.config import LlamaConfig
from unweight_jax.models.generate import generate
from unweight_jax.sharding import tp_mesh
from run_info import device_tag, run_info

BATCHES = "1,16,256"
CONTEXTS = "1024"
PROMPTS = 4
NEW_TOKENS = 32


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="8b")
    parser.add_argument("--tp", type=int, default=2, help="the highest degree (default 2)")
    parser.add_argument("--batch", default=BATCHES)
    parser.add_argument("--context", default=CONTEXTS)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--commit")
    args = parser.parse_args(argv)
    devices = jax.devices()
    if not 2 <= args.tp <= len(devices):
        parser.error(f"--tp {args.tp}: needs 2 to {len(devices)} devices (found {len(devices)})")
    batches = [int(b) for b in args.batch.split(",")]
    contexts = [int(c) for c in args.context.split(",")]
    tag = device_tag(devices[0].device_kind)
    report = {
        **run_info("tensor_parallel", commit=args.commit),
        "devices": len(devices),
        "model": SIZE_NAMES[args.size],
        "source": "generated: bf16 N(0, 0.02) matrices, norms 1",
        "tp": args.tp,
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="unweight-tp-") as scratch:
        bundle = Path(scratch) / "model.unw.safetensors"
        bf16 = random_model(SIZES[args.size], args.seed)
        write_bundle(bf16, bundle)
        del bf16
        print(f"[{time.perf_counter() - start:6.1f} s] bundle written", flush=True)
        report["generation"] = generation(bundle, args.tp, args.new_tokens, args.seed)
        print(f"[{time.perf_counter() - start:6.1f} s] generation: {json.dumps(report['generation']['summary'])}", flush=True)
        benches = {}
        for tp in (1, args.tp):
            opts = Options(
                size=args.size, checkpoint=None, bundle=bundle, batches=batches, contexts=contexts, steps=args.steps,
                reps=args.reps, plan=None, tp=tp, out=args.out, device_tag=f"{tag}-tp{tp}", skip_disk=True,
                mlp_stack=False, seed=args.seed, commit=report["commit"],
            )
            benches[tp] = run_bench(opts)
    report["rows"], report["not_run"] = scaling(benches[1], benches[args.tp], args.tp)
    report["footprint_per_degree"] = {str(tp): b["footprint"] for tp, b in benches.items()}
    report["seconds"] = round(time.perf_counter() - start, 1)
    stem = args.out / f"tensor_parallel-{tag}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    if report["rows"]:
        plot(report, stem.with_suffix(".png"))
    print(markdown(report))
    return 0


def generation(bundle: Path, max_tp: int, new_tokens: int, seed: int) -> dict:
    """Greedy tokens of the one-GPU compressed model and of the tensor-parallel one at each degree."""
    rng = np.random.default_rng(seed)
    config = LlamaConfig.from_hf(BundleReader(bundle).config)
    prompts = [rng.integers(0, config.vocab_size, int(n)).tolist() for n in rng.integers(4, 48, PROMPTS)]

    def tokens(mesh) -> list[list[int]]:
        model = load_bundle_model(bundle, form="palette", dtype=jnp.bfloat16, mesh=mesh)
        out = generate(model, prompts, new_tokens).tokens
        del model
        return out

    one = tokens(None)
    result = {"prompts": prompts, "new_tokens": new_tokens, "one_gpu": one, "tp": {}}
    summary = {}
    for tp in range(1, max_tp + 1):
        got = tokens(tp_mesh(tp))
        same = [a == b for a, b in zip(one, got)]
        first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(one, got)]
        agree = sum(x == y for a, b in zip(one, got) for x, y in zip(a, b)) / sum(len(a) for a in one)
        result["tp"][str(tp)] = {"tokens": got, "same_as_one_gpu": all(same), "first_difference": first_diff,
                                 "token_agreement": round(agree, 4)}
        summary[f"tp{tp}"] = {"same_as_one_gpu": all(same), "token_agreement": round(agree, 4)}
    result["summary"] = summary
    return result


def scaling(one: dict, many: dict, tp: int) -> tuple[list[dict], list[dict]]:
    """One row per (batch, context, degree), ratio = bf16 / compressed at that degree; the
    degree-tp rows carry the speed-up over degree 1 of each side and the all-reduce time."""
    base = {(r["batch"], r["context"]): r for r in one["rows"]}
    rows = []
    for r in one["rows"] + many["rows"]:
        degree = tp if r in many["rows"] else 1
        row = {k: r[k] for k in ("batch", "context", "model", "pipeline", "ours_ms", "baseline_ms", "baseline", "ratio",
                                 "tokens_per_s", "baseline_tokens_per_s", "tokens_agree")}
        row["tp"] = degree
        if degree > 1:
            row["allreduce_ms"] = r.get("allreduce_ms")
            ref = base.get((r["batch"], r["context"]))
            if ref is not None:
                row["ours_speedup_over_tp1"] = round(ref["ours_ms"] / r["ours_ms"], 3)
                row["baseline_speedup_over_tp1"] = round(ref["baseline_ms"] / r["baseline_ms"], 3)
        rows.append(row)
    not_run = [dict(n, tp=1) for n in one["not_run"]] + [dict(n, tp=tp) for n in many["not_run"]]
    return rows, not_run


def markdown(report: dict) -> str:
    lines = [
        f"# Tensor parallelism: {report['model']} on {report['devices']} x {report['device']}",
        "",
        f"`benchmarks/tensor_parallel.py`, {report['date']}, commit `{report['commit']}`, jax {report['jax_version']}, "
        f"driver {report['driver']}. Compressed: every projection and the LM head palette-resident, each device "
        "running the autotuned fused kernel on its shard; bf16: XLA's dots on the same split. Times are ms per "
        "decode step (median); all-reduce: the step's two all-reduces per layer timed on their own.",
        "",
        "## Greedy generation against one GPU",
        "",
        f"{len(report['generation']['prompts'])} prompts, {report['generation']['new_tokens']} new tokens each.",
        "",
        "| degree | same tokens as one GPU | token agreement |",
        "|---|---|---|",
    ]
    for tp, g in report["generation"]["summary"].items():
        lines.append(f"| {tp} | {g['same_as_one_gpu']} | {g['token_agreement']:.2%} |")
    lines += [
        "",
        "## Decode step",
        "",
        "| batch | context | degree | compressed ms | bf16 ms | bf16 / compressed | compressed tok/s | bf16 tok/s "
        "| all-reduce ms | compressed speed-up over degree 1 | bf16 speed-up over degree 1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(report["rows"], key=lambda r: (r["context"], r["batch"], r["tp"])):
        extra = [r.get("allreduce_ms"), r.get("ours_speedup_over_tp1"), r.get("baseline_speedup_over_tp1")]
        cells = ["-" if v is None else str(v) for v in extra]
        lines.append(
            f"| {r['batch']} | {r['context']} | {r['tp']} | {r['ours_ms']:.3f} | {r['baseline_ms']:.3f} | {r['ratio']:.2f} "
            f"| {r['tokens_per_s']:.0f} | {r['baseline_tokens_per_s']:.0f} | " + " | ".join(cells) + " |"
        )
    for n in report["not_run"]:
        lines.append(f"\nNot run: batch {n['batch']}, context {n['context']}, degree {n['tp']}: {n['reason']}")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for tp in sorted({r["tp"] for r in report["rows"]}):
        for key, label, style in (("tokens_per_s", "compressed", "o-"), ("baseline_tokens_per_s", "bf16", "s--")):
            rows = sorted((r for r in report["rows"] if r["tp"] == tp), key=lambda r: r["batch"])
            ax.plot([r["batch"] for r in rows], [r[key] for r in rows], style, color=f"C{tp - 1}", label=f"{label}, tp {tp}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (sequences)")
    ax.set_ylabel("tokens per second")
    ax.set_title(f"{report['model']}, {report['devices']} x {report['device']}")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
