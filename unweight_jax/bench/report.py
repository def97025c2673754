"""The bench report as files: `<stem>.json` (DESIGN.md section 6 schema), `<stem>.md` and `<stem>.png`."""

from __future__ import annotations

import json
from pathlib import Path

from . import mlp_stack
from .plots import plot_bench


def write_report(report: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    if report["rows"]:
        plot_bench(report, stem.with_suffix(".png"))


def size(n: float) -> str:
    """Bytes in decimal units, for people."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _footprint_lines(f: dict) -> list[str]:
    met = {True: "target met", False: "target MISSED"}
    lines = [
        f"Weights held on the device ({f['method']}): bf16 {size(f['bf16_weights_bytes'])}, compressed "
        f"{size(f['compressed_weights_bytes'])}: {f['weights_saving_percent']:.1f} % smaller "
        f"({met[f['weights_target_met']]}: at least {f['weights_target_percent']:.0f} %)."
    ]
    if f["bundle_bytes"] is None:
        lines.append("Bundle on disk: not measured (--skip-disk).")
    else:
        lines.append(
            f"Bundle on disk ({f['bundle_source']}): {size(f['bundle_bytes'])} against {size(f['bf16_checkpoint_bytes'])} "
            f"of bf16 weights: {f['bundle_saving_percent']:.1f} % smaller "
            f"({met[f['bundle_target_met']]}: at least {f['bundle_target_percent']:.0f} %)."
        )
    return lines


def markdown(report: dict) -> str:
    tp = f", tensor-parallel over {report['tp']} devices" if report["tp"] > 1 else ""
    lines = [
        f"# {report['benchmark']}: {report['device']}, driver {report['driver']}, jax {report['jax_version']}",
        "",
        f"{report['model']} ({report['source']}){tp}; compressed: every projection and the LM head in palette "
        f"form, plan {report['plan']}; baseline: the same weights in bf16 under XLA. One decode step: one new token "
        f"per sequence, attention over the KV cache filled to the context, MLP, LM head, greedy token. "
        f"{report['timing']}. {report['date']}, commit {report['commit']}.",
        "",
        *_footprint_lines(report["footprint"]),
        "",
    ]
    tp_column = report["tp"] > 1
    header = ["batch", "context", "bf16 ms", "ours ms", "bf16 tok/s", "ours tok/s", "speed-up",
              "weights read bf16", "weights read ours", "KV cache", "tokens agree"]
    if tp_column:
        header.append("all-reduce ms (alone)")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cases = [(r["context"], r["batch"], r) for r in report["rows"]] + [
        (r["context"], r["batch"], r) for r in report["not_run"]
    ]
    for _, _, r in sorted(cases, key=lambda c: (c[0], c[1])):
        if "reason" in r:
            cells = [r["batch"], r["context"], f"not run: {r['reason']}"] + [""] * (len(header) - 3)
        else:
            cells = [
                r["batch"], r["context"], f"{r['baseline_ms']:.3f}", f"{r['ours_ms']:.3f}",
                f"{r['baseline_tokens_per_s']:.0f}", f"{r['tokens_per_s']:.0f}", f"{r['ratio']:.2f}x",
                size(r["baseline_weight_bytes_per_step"]), size(r["weight_bytes_per_step"]), size(r["kv_cache_bytes"]),
                f"{r['tokens_agree']:.0%}",
            ]
            if tp_column:
                cells.append(f"{r['allreduce_ms']:.3f}")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    stack = report.get("mlp_stack")
    if stack:
        lines += ["", "## MLP stack alone", ""]
        if "skipped" in stack:
            lines.append(f"Not run: {stack['skipped']}.")
        else:
            lines += [
                f"{stack['shape']}, the models' own MLP weights; weights read per step: bf16 "
                f"{size(stack['form_bytes']['bf16'])}, palette {size(stack['form_bytes']['palette'])}. "
                f"Copy bandwidth {stack['copy_tb_s']} TB/s.",
                "",
                *mlp_stack.table(stack.get("rows", [])),
                "",
                *_dfloat11_lines(stack.get("dfloat11"), stack.get("rows", [])),
            ]
    return "\n".join(lines) + "\n"


def _dfloat11_lines(peer: dict | None, stack_rows: list[dict]) -> list[str]:
    """The DFloat11 peer beside the stack's rows of the same batch, or why it did not run."""
    if not peer:
        return []
    if "rows" not in peer:
        return [f"DFloat11 peer: not run: {peer.get('unavailable') or peer.get('failed')}."]
    ours = {r["batch"]: r for r in stack_rows}
    lines = [
        f"DFloat11 peer ({peer['package']}): its Huffman decode kernel per layer into one bf16 buffer, then "
        f"PyTorch's matmuls, on its own N(0, 0.02) weights of the same shapes, in its own process; "
        f"{size(peer['dfloat11_bytes'])} against {size(peer['bf16_bytes'])} of bf16; decoded bit for bit: "
        f"{peer['exact']}. {peer['timing']}.",
        "",
        "| batch | DFloat11 ms | PyTorch bf16 ms | XLA bf16 ms | ours ms | ours vs DFloat11 |",
        "|---|---|---|---|---|---|",
    ]
    for r in peer["rows"]:
        mine = ours.get(r["batch"])
        xla, us = (f"{mine['baseline_ms']:.3f}", f"{mine['ours_ms']:.3f}") if mine else ("", "")
        versus = f"{r['dfloat11_ms'] / mine['ours_ms']:.2f}x" if mine else ""
        lines.append(f"| {r['batch']} | {r['dfloat11_ms']:.3f} | {r['torch_bf16_ms']:.3f} | {xla} | {us} | {versus} |")
    return lines
