"""Tensor parallelism on one host: the sharded compressed Llama against one GPU, and its scaling.

1. Greedy generation: the compressed model on one GPU (plain `CompressedLinear` layers) against
   the tensor-parallel one at degree --tp and, for scale, the bf16 model, same bundle and prompts.
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
from flax import nnx

from unweight_jax.bench.footprint import write_bundle
from unweight_jax.bundle import BundleReader
from unweight_jax.bench.models import SIZE_NAMES, SIZES, bundle_bf16_model, random_model
from unweight_jax.bench.run import Options, run_bench
from unweight_jax.loading import load_bundle_model
from unweight_jax.models.config import LlamaConfig
from unweight_jax.models.generate import generate
from unweight_jax.sharding import tp_mesh
from run_info import device_tag, run_info

BATCHES = "1,16,256"
CONTEXTS = "1024"
PROMPTS = 4
PROMPT_LEN = 16
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
    parser.add_argument("--bench-reports", type=Path, metavar="DIR",
                        help="take the decode-step results from DIR/bench-<device>-tp<N>.json of an earlier run "
                        "(this script's) instead of measuring them again; their commit stays in them")
    args = parser.parse_args(argv)
    devices = jax.devices()
    if not 2 <= args.tp <= len(devices):
        parser.error(f"--tp {args.tp}: needs 2 to {len(devices)} devices (found {len(devices)})")
    batches = [int(b) for b in args.batch.split(",")]
    contexts = [int(c) for c in args.context.split(",")]
    tag = device_tag(devices[0].device_kind)
    degrees = (1, args.tp)
    benches = {}
    if args.bench_reports is not None:
        for tp in degrees:
            path = args.bench_reports / f"bench-{tag}-tp{tp}.json"
            if not path.is_file():
                parser.error(f"--bench-reports: {path} is missing")
            benches[tp] = json.loads(path.read_text())
    report = {
        **run_info("tensor_parallel", commit=args.commit),
        "devices": len(devices),
        "model": SIZE_NAMES[args.size],
        "source": "generated: bf16 N(0, 0.02) matrices, norms 1",
        "tp": args.tp,
        "rows": [],
        "not_run": [],
    }
    stem = args.out / f"tensor_parallel-{tag}"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="unweight-tp-") as scratch:
        bundle = Path(scratch) / "model.unw.safetensors"
        bf16 = random_model(SIZES[args.size], args.seed)
        write_bundle(bf16, bundle)
        del bf16
        print(f"[{time.perf_counter() - start:6.1f} s] bundle written", flush=True)
        report["generation"] = generation(bundle, args.tp, args.new_tokens, args.seed)
        print(f"[{time.perf_counter() - start:6.1f} s] generation: {json.dumps(report['generation']['summary'])}", flush=True)
        write(report, stem)  # what a run cut short still leaves
        for tp in degrees:
            if tp not in benches:
                opts = Options(
                    size=args.size, checkpoint=None, bundle=bundle, batches=batches, contexts=contexts,
                    steps=args.steps, reps=args.reps, plan=None, tp=tp, out=args.out, device_tag=f"{tag}-tp{tp}",
                    skip_disk=True, mlp_stack=False, seed=args.seed, commit=report["commit"],
                )
                benches[tp] = run_bench(opts)
    report["bench_commits"] = {str(tp): b["commit"] for tp, b in benches.items()}
    report["rows"], report["not_run"] = scaling(benches[1], benches[args.tp], args.tp)
    report["footprint_per_degree"] = {str(tp): b["footprint"] for tp, b in benches.items()}
    report["seconds"] = round(time.perf_counter() - start, 1)
    write(report, stem)
    print(markdown(report))
    return 0


def write(report: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    if report["rows"]:
        plot(report, stem.with_suffix(".png"))


def generation(bundle: Path, tp: int, new_tokens: int, seed: int) -> dict:
    """The one-GPU compressed model's greedy continuations against the degree-`tp` model's and, for
    scale, the bf16 model's (XLA's dots, one GPU): free-running (each model feeds back its own
    tokens, so one near-tie flips the rest of a row) and teacher-forced (every model reads the
    one-GPU sequences; per-position argmax agreement and logit differences)."""
    reader = BundleReader(bundle)
    config = LlamaConfig.from_hf(reader.config)
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, config.vocab_size, (PROMPTS, PROMPT_LEN)).tolist()

    one = load_bundle_model(bundle, form="palette", dtype=jnp.bfloat16)
    one_tokens = generate(one, prompts, new_tokens).tokens
    sequences = np.array([p + t for p, t in zip(prompts, one_tokens)], np.int32)
    want = _logits(one, sequences)
    del one
    result = {"prompts": prompts, "new_tokens": new_tokens, "one_gpu_tokens": one_tokens, "against_one_gpu": {}}
    others = {
        f"compressed, tp {tp}": lambda: load_bundle_model(bundle, dtype=jnp.bfloat16, mesh=tp_mesh(tp)),
        "bf16 XLA, one GPU": lambda: bundle_bf16_model(reader),
    }
    for label, build in others.items():
        model = build()
        tokens = generate(model, prompts, new_tokens).tokens
        got = _logits(model, sequences)
        del model
        # Position i's logits choose token i + 1: the generated tokens are chosen at PROMPT_LEN - 1 ...
        chosen = slice(PROMPT_LEN - 1, PROMPT_LEN - 1 + new_tokens)
        agree_forced = float((got[:, chosen].argmax(-1) == want[:, chosen].argmax(-1)).mean())
        free = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(one_tokens, tokens)]
        result["against_one_gpu"][label] = {
            "tokens": tokens,
            "same_tokens": tokens == one_tokens,
            "free_running_agreement": round(_agreement(one_tokens, tokens), 4),
            "first_difference": free,
            "teacher_forced_agreement": round(agree_forced, 4),
            "max_abs_logit_difference": round(float(np.abs(got - want).max()), 4),
            "max_abs_logit": round(float(np.abs(want).max()), 4),
        }
    result["summary"] = {
        label: {k: v for k, v in r.items() if k not in ("tokens", "first_difference")}
        for label, r in result["against_one_gpu"].items()
    }
    return result


def _logits(model, sequences: np.ndarray) -> np.ndarray:
    graphdef, state = nnx.split(model)
    positions = np.broadcast_to(np.arange(sequences.shape[1], dtype=np.int32), sequences.shape)
    run = jax.jit(lambda s: nnx.merge(graphdef, s)(sequences, positions)[0])
    return np.asarray(run(state), np.float32)


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / sum(len(r) for r in a)


def scaling(one: dict, many: dict, tp: int) -> tuple[list[dict], list[dict]]:
    """One row per (batch, context, degree), ratio = bf16 / compressed at that degree; the
    degree-tp rows carry the speed-up over degree 1 of each side and the all-reduce time."""
    base = {(r["batch"], r["context"]): r for r in one["rows"]}
    rows = []
    for degree, r in [(1, r) for r in one["rows"]] + [(tp, r) for r in many["rows"]]:
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
        f"{len(report['generation']['prompts'])} prompts of {PROMPT_LEN} random tokens, "
        f"{report['generation']['new_tokens']} new tokens each, against the compressed model on one GPU. Free-running: "
        "each model feeds back its own tokens (one near-tie flips the rest of a row); teacher-forced: each reads "
        "the one-GPU sequences and its argmax is compared position by position. Random weights make near-flat "
        "logits, so the bf16 row shows how far two correct summation orders drift apart on this model.",
        "",
        "| model | same tokens | free-running agreement | teacher-forced agreement | max abs logit difference "
        "(of max abs logit) |",
        "|---|---|---|---|---|",
    ]
    for label, g in report["generation"]["summary"].items():
        lines.append(
            f"| {label} | {g['same_tokens']} | {g['free_running_agreement']:.2%} | {g['teacher_forced_agreement']:.2%} "
            f"| {g['max_abs_logit_difference']} ({g['max_abs_logit']}) |"
        )
    commits = sorted(set((report.get("bench_commits") or {}).values()))
    lines += [
        "",
        "## Decode step",
        "",
        *([f"Measured at commit {', '.join(commits)}.", ""] if commits else []),
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
