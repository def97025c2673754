"""PNG plots of benchmark results (matplotlib, imported only when a plot is drawn)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _speedup_axes(ax: Any, series: dict[str, list[dict]], title: str) -> None:
    """Speed-up over XLA bf16 (each row's `ratio`) against batch, one line per series."""
    for label, rows in series.items():
        ax.plot([r["batch"] for r in rows], [r["ratio"] for r in rows], "o-", label=label)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--", label="XLA bf16")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (tokens per step)")
    ax.set_ylabel("speed-up over XLA bf16")
    ax.set_title(title)
    ax.legend()
    ax.grid(True, alpha=0.3)


def plot_speedup(series: dict[str, list[dict]], path: Path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    _speedup_axes(ax, series, title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bench(report: dict, path: Path) -> None:
    """Left: speed-up against batch, one line per context (and the MLP stack alone). Right: device
    memory held by the weights plus the KV cache of each measured case, compressed against bf16."""
    plt = _pyplot()
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(13, 4.5))
    rows = report["rows"]
    contexts = sorted({r["context"] for r in rows})
    series = {f"whole model, context {c}": [r for r in rows if r["context"] == c] for c in contexts}
    stack = report.get("mlp_stack", {})
    if stack.get("rows"):
        series["MLP stack alone"] = stack["rows"]
        xla = {r["batch"]: r["baseline_ms"] for r in stack["rows"]}
        peer = [r for r in (stack.get("dfloat11") or {}).get("rows", []) if r["batch"] in xla]
        if peer:
            series["DFloat11, MLP stack"] = [{"batch": r["batch"], "ratio": xla[r["batch"]] / r["dfloat11_ms"]} for r in peer]
    _speedup_axes(speed, series, f"{report['model']}, {report['device']}")

    footprint = report["footprint"]
    gb = 1e9
    for i, c in enumerate(contexts):
        case = [r for r in rows if r["context"] == c]
        batches = [r["batch"] for r in case]
        for model, key, style in (("bf16", "bf16_weights_bytes", "s--"), ("compressed", "compressed_weights_bytes", "o-")):
            held = [(footprint[key] + r["kv_cache_bytes"]) / gb for r in case]
            memory.plot(batches, held, style, color=f"C{i}", label=f"{model}, context {c}")
    if footprint.get("device_limit_bytes"):
        memory.axhline(footprint["device_limit_bytes"] / gb, color="red", lw=0.8, ls=":", label="device memory")
    memory.set_xscale("log", base=2)
    memory.set_xlabel("batch (sequences)")
    memory.set_ylabel(f"GB held: weights + KV cache ({footprint['method']})")
    memory.set_title("device memory, compressed against bf16")
    memory.legend(fontsize=8)
    memory.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
