"""The Llama-3.1-8B MLP stack, one decode or prefill step at a time: ours against XLA bf16.

32 layers of gate 14336x4096, up 14336x4096 and down 4096x14336, bf16 weights drawn N(0, 0.02)
on the device (11.3 GB; 2.55 bits of exponent entropy, close to trained weights' 2.6) and
transcoded there to the palette form (FORMAT.md section 3). A step runs every layer as
`x = clip(silu(x @ gate.T) * (x @ up.T), -4, 4) @ down.T`, each weight a separate array, the
layers unrolled in one jit; the clip (fused into the same elementwise kernel) keeps a chained
stack of random layers finite. The baseline (`xla_bf16_unrolled`) does this with XLA's dot on the
bf16 weights; each candidate of ours does the same elementwise work with another matmul:

- `gemv:<variant>` (batch <= 16): the GEMV kernels on the palette form (unweight_jax.ops.gemv);
- `gemm:<variant>`: the tensor-core kernels on the palette form (unweight_jax.ops.gemm), where
  that module is built and supports the case;
- `full`: the palette form decoded to bf16 (unweight_jax.ops.decode), then XLA's dot;
- reported beside them, never as ours: `gemv_exponent:<variant>` (exponent + sign/mantissa
  bytes, 16 bits a weight: the matmul of the `exponent` pipeline) and `gemv_bf16:<variant>` (the
  twin on plain bf16: the kernel's own speed on uncompressed weights).

Timing: each measured call runs STEPS steps in a `fori_loop` inside one jit; a step's time is the
median wall time of REPS calls (after a compiling warm-up) divided by STEPS. The stack is 230
times the 50 MB L2, so every weight comes from HBM. The device-to-device copy bandwidth is
measured in the same process (a uint32 xor over 4 GiB, counting bytes read and written).

    python benchmarks/mlp_stack.py --out DIR [--batches 1,4,16]   # DIR/mlp_stack-h100.{json,md,png}
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from unweight_jax.format import GROUP
from unweight_jax.ops import decode, gemv
from unweight_jax.weights import PaletteWeight, escape_index
from run_info import run_info

try:  # the tensor-core family, where it is built
    from unweight_jax.ops import gemm
except ImportError:
    gemm = None

LAYERS = 32
HIDDEN, INTER = 4096, 14336
SHAPES = {"gate": (INTER, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER)}
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
STEPS = 4
REPS = 5
CLIP = 4.0
BASELINE = "xla_bf16_unrolled"
SHAPE_NAME = "llama3.1-8b-mlp-stack"
COPY_BYTES = 4 << 30
PALETTE_READ = ("palette", "idx", "sm", "esc_mask", "esc_prefix", "esc_exp")  # what the fused kernels read

Layer = dict[str, object]  # "gate" / "up" / "down" -> that weight in one form
Matmul = Callable[[jax.Array, object], jax.Array]


# ------------------------------------------------------------------------------------ weights


@functools.partial(jax.jit, static_argnums=(1,))
def _normal_bf16(key: jax.Array, shape: tuple[int, int]) -> jax.Array:
    return (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(jnp.bfloat16)


@jax.jit
def _palette_arrays(w: jax.Array) -> tuple[jax.Array, ...]:
    """FORMAT.md section 3 on the device, as unweight_jax.reference.to_palette: the palette,
    the indices (0 in escape groups), sign+mantissa bytes, the escape flag of each group and the
    exponent bytes. C must be a multiple of 64."""
    rows, cols = w.shape
    bits = lax.bitcast_convert_type(w, jnp.uint16)
    e = ((bits >> 7) & 0xFF).astype(jnp.uint8)
    sm = (((bits >> 8) & 0x80) | (bits & 0x7F)).astype(jnp.uint8)
    counts = jnp.bincount(e.reshape(-1), length=256)
    ranked = jnp.argsort(-counts, stable=True)[:16]  # most frequent first, ties: smaller exponent
    chosen = jnp.sort(jnp.where(counts[ranked] > 0, ranked, 256))  # ascending, unused slots last
    slot_of = jnp.full(257, -1, jnp.int32).at[chosen].set(jnp.arange(16, dtype=jnp.int32))[:256]
    palette = jnp.where(chosen < 256, chosen, 0).astype(jnp.uint8)
    nib = slot_of[e]
    escape = (nib < 0).reshape(rows, cols // GROUP, GROUP).any(-1)
    nib = jnp.where(jnp.repeat(escape, GROUP, axis=1), 0, nib)
    idx = (nib[:, 0::2] | (nib[:, 1::2] << 4)).astype(jnp.uint8)
    return palette, idx, sm, escape, e


def palette_and_exponent(w: jax.Array) -> tuple[PaletteWeight, tuple[jax.Array, jax.Array]]:
    """The palette form of a bf16 [R, C] weight and its (exponent, sign+mantissa) bytes."""
    rows, cols = w.shape
    palette, idx, sm, escape, e = _palette_arrays(w)
    esc_groups = np.flatnonzero(np.asarray(escape)).astype(np.uint32)
    mask, prefix = escape_index(esc_groups, rows, cols)
    esc_exp = e.reshape(-1, GROUP)[jnp.asarray(esc_groups, dtype=jnp.int32)]
    weight = PaletteWeight(
        palette=palette,
        idx=idx,
        sm=sm,
        esc_groups=jnp.asarray(esc_groups),
        esc_mask=jnp.asarray(mask),
        esc_prefix=jnp.asarray(prefix),
        esc_exp=esc_exp,
        shape=(rows, cols),
    )
    return weight, (e, sm)


def make_stack(seed: int) -> tuple[list[Layer], list[Layer], list[Layer]]:
    """The bf16, palette and exponent forms of every layer, all on the device."""
    key = jax.random.key(seed)
    bf16, palette, exponent = [], [], []
    for i in range(LAYERS):
        layer = {n: _normal_bf16(jax.random.fold_in(key, 3 * i + j), s) for j, (n, s) in enumerate(SHAPES.items())}
        forms = {n: palette_and_exponent(w) for n, w in layer.items()}
        bf16.append(layer)
        palette.append({n: f[0] for n, f in forms.items()})
        exponent.append({n: f[1] for n, f in forms.items()})
    return bf16, palette, exponent


def nbytes(layers: list[Layer], fields: tuple[str, ...] | None = None) -> int:
    """Bytes of the weights (only `fields` of each, for a pytree form)."""
    total = 0
    for layer in layers:
        for w in layer.values():
            leaves = [getattr(w, f) for f in fields] if fields else jax.tree.leaves(w)
            total += sum(int(a.nbytes) for a in leaves)
    return total


# ------------------------------------------------------------------------------------ the step


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """XLA's dot, fp32 accumulation, rounded to bf16 (as unweight_jax.pipelines.dense)."""
    return lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(jnp.bfloat16)


def stack_step(matmul: Matmul, x: jax.Array, layers: list[Layer]) -> jax.Array:
    for layer in layers:
        h = jnp.clip(jax.nn.silu(matmul(x, layer["gate"])) * matmul(x, layer["up"]), -CLIP, CLIP)
        x = matmul(h, layer["down"])
    return x


def step_ms(matmul: Matmul, x: jax.Array, layers: list[Layer]) -> float:
    """Median time of one step of the stack, in ms."""
    run = jax.jit(lambda x, layers: lax.fori_loop(0, STEPS, lambda _, h: stack_step(matmul, h, layers), x))
    return wall_ms(run, x, layers) / STEPS


def wall_ms(run: Callable, *args: object) -> float:
    """Median wall time of run(*args) in ms, after a compiling warm-up call."""
    jax.block_until_ready(run(*args))
    times = []
    for _ in range(REPS):
        start = time.perf_counter()
        jax.block_until_ready(run(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def matrix_ms(matmul: Matmul, x: jax.Array, weights: list[object]) -> float:
    """Device time of one matmul by one of `weights` (all of one shape), in ms: the slope between
    jit calls running it on 8 of them and on all, which cancels dispatch and synchronisation."""
    run = jax.jit(lambda x, ws: [matmul(x, w) for w in ws])
    return (wall_ms(run, x, weights) - wall_ms(run, x, weights[:8])) / (len(weights) - 8)


def copy_tb_s() -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), in TB/s."""
    words = jnp.arange(COPY_BYTES // 4, dtype=jnp.uint32)
    return 2 * COPY_BYTES / (wall_ms(jax.jit(lambda a, k: a ^ k), words, jnp.uint32(0x5A5A5A5A)) * 1e-3) / 1e12


# ------------------------------------------------------------------------------------ candidates


def candidates(batch: int, pattern: str) -> dict[str, tuple[str, Matmul]]:
    """name -> (form the matmul reads: "palette", "exponent" or "bf16", matmul), for the names
    `pattern` matches (re.search)."""
    out: dict[str, tuple[str, Matmul]] = {}

    def fits(family, variant: str) -> bool:
        return all(family.supports(r, c, batch, variant) for r, c in SHAPES.values())

    for v in gemv.VARIANTS:
        if fits(gemv, v):
            out[f"gemv:{v}"] = ("palette", lambda x, w, v=v: gemv.gemv_palette(x, w, variant=v))
            out[f"gemv_exponent:{v}"] = ("exponent", lambda x, w, v=v: gemv.gemv_exponent(x, *w, variant=v))
            out[f"gemv_bf16:{v}"] = ("bf16", lambda x, w, v=v: gemv.gemv_bf16(x, w, variant=v))
    if gemm is not None:
        for v in gemm.VARIANTS:
            if fits(gemm, v):
                out[f"gemm:{v}"] = ("palette", lambda x, w, v=v: gemm.gemm_palette(x, w, variant=v))
    out["full"] = (
        "palette",
        lambda x, w: dense(x, decode.palette_to_bf16(w.palette, w.idx, w.sm, w.esc_groups, w.esc_exp)),
    )
    return {name: c for name, c in out.items() if re.search(pattern, name)}


def is_ours(name: str) -> bool:
    """Candidates that read the compressed palette form: the ones a row's `ours` is chosen from."""
    return name.split(":")[0] in ("gemv", "gemm", "full")


def exact_vs_twin(palette: list[Layer], bf16: list[Layer]) -> bool:
    """The fused palette GEMV equals its bf16 twin bit for bit on the first layer's gate: a check
    of the device transcode above as much as of the kernel."""
    x = jax.random.normal(jax.random.key(1), (3, HIDDEN), jnp.float32).astype(jnp.bfloat16)
    fused = gemv.gemv_palette(x, palette[0]["gate"])
    twin = gemv.gemv_bf16(x, bf16[0]["gate"])
    as_bits = functools.partial(lax.bitcast_convert_type, new_dtype=jnp.uint16)
    return bool(jnp.array_equal(as_bits(fused), as_bits(twin)))


# ------------------------------------------------------------------------------------ report


def per_matrix(batch: int, pattern: str, forms: dict[str, list[Layer]]) -> list[dict]:
    """One gate and one down matmul alone, for XLA bf16 and the candidates `pattern` matches:
    where the stack's time goes."""
    out = []
    ours = candidates(batch, pattern)
    if not ours:
        return out
    chosen = {"xla_bf16": ("bf16", dense), **ours}
    for kind in ("gate", "down"):
        rows, cols = SHAPES[kind]
        x = jax.random.normal(jax.random.key(batch), (batch, cols), jnp.float32).astype(jnp.bfloat16)
        for name, (form, matmul) in chosen.items():
            weights = [layer[kind] for layer in forms[form]]
            ms = matrix_ms(matmul, x, weights)
            read = nbytes([{kind: w} for w in weights], PALETTE_READ if form == "palette" else None) / len(weights)
            out.append({"batch": batch, "matrix": f"{kind} {rows}x{cols}", "candidate": name, "ms": round(ms, 4),
                        "tb_s": round(read / (ms * 1e-3) / 1e12, 3)})
            print(f"batch {batch} {kind} {name}: {ms * 1e3:.1f} us, {out[-1]['tb_s']:.2f} TB/s", flush=True)
    return out


def measure(
    batches: list[int], pattern: str, matrix_pattern: str, seed: int, report: Callable[[list[dict], dict], None]
) -> None:
    """Measures every batch, handing the rows so far to `report` after each."""
    copy = copy_tb_s()
    print(f"device-to-device copy: {copy:.3f} TB/s", flush=True)
    bf16, palette, exponent = make_stack(seed)
    forms = {"bf16": bf16, "palette": palette, "exponent": exponent}
    form_bytes = {"bf16": nbytes(bf16), "palette": nbytes(palette, PALETTE_READ), "exponent": nbytes(exponent)}
    info = {"exact_vs_twin": exact_vs_twin(palette, bf16), "form_bytes": form_bytes, "copy_tb_s": round(copy, 3)}
    print(f"weights: {form_bytes}; fused palette GEMV == bf16 twin: {info['exact_vs_twin']}", flush=True)
    if matrix_pattern:
        info["per_matrix"] = []

    rows = []
    for batch in batches:
        x = jax.random.normal(jax.random.key(batch), (batch, HIDDEN), jnp.float32).astype(jnp.bfloat16)
        baseline = step_ms(dense, x, bf16)
        times = {}
        for name, (form, matmul) in candidates(batch, pattern).items():
            times[name] = round(step_ms(matmul, x, forms[form]), 4)
            print(f"batch {batch} {name}: {times[name]:.3f} ms (XLA bf16 {baseline:.3f} ms)", flush=True)
        if matrix_pattern:
            info["per_matrix"] += per_matrix(batch, matrix_pattern, forms)
        ours = {n: t for n, t in times.items() if is_ours(n)}
        if not ours:
            continue
        best = min(ours, key=ours.get)
        read = form_bytes["palette"]
        rows.append(
            {
                "batch": batch,
                "shape": SHAPE_NAME,
                "pipeline": "full" if best == "full" else "palette",
                "variant": best,
                "ours_ms": ours[best],
                "baseline_ms": round(baseline, 4),
                "baseline": BASELINE,
                "ratio": round(baseline / ours[best], 3),
                "bytes_per_step": read,
                "achieved_tb_s": round(read / (ours[best] * 1e-3) / 1e12, 3),
                "baseline_tb_s": round(form_bytes["bf16"] / (baseline * 1e-3) / 1e12, 3),
                "copy_tb_s": round(copy, 3),
                "candidates": times,
            }
        )
        rows.sort(key=lambda r: r["batch"])
        report(rows, info)


def markdown(report: dict) -> str:
    lines = [
        f"# {report['benchmark']}: {report['device']}, driver {report['driver']}, jax {report['jax_version']}",
        "",
        f"{SHAPE_NAME}: {LAYERS} x (gate {INTER}x{HIDDEN}, up, down {HIDDEN}x{INTER}), bf16 N(0, 0.02); "
        f"weights read per step: bf16 {report['form_bytes']['bf16'] / 1e9:.2f} GB, "
        f"palette {report['form_bytes']['palette'] / 1e9:.2f} GB. Copy bandwidth {report['copy_tb_s']} TB/s. "
        f"Fused palette GEMV == bf16 twin: {report['exact_vs_twin']}. {report['timing']}",
        "",
        "| batch | ours | ours ms | XLA bf16 ms | speed-up | ours TB/s | XLA TB/s | candidates (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        cands = ", ".join(f"{n} {t:.3f}" for n, t in r["candidates"].items())
        lines.append(
            f"| {r['batch']} | {r['variant']} | {r['ours_ms']:.3f} | {r['baseline_ms']:.3f} | {r['ratio']:.2f}x | "
            f"{r['achieved_tb_s']:.2f} | {r['baseline_tb_s']:.2f} | {cands} |"
        )
    if report.get("per_matrix"):
        lines += [
            "",
            "One matrix alone: the slope between jit calls on 8 and on 32 distinct weights, a difference of two "
            "wall times, so indicative only (a rate above the copy bandwidth is marked as noise):",
            "",
            "| batch | matrix | candidate | us | TB/s of its form |",
            "|---|---|---|---|---|",
        ]
        for m in report["per_matrix"]:
            noise = " (noise)" if not 0 < m["tb_s"] <= report["copy_tb_s"] else ""
            lines.append(
                f"| {m['batch']} | {m['matrix']} | {m['candidate']} | {m['ms'] * 1e3:.1f} | {m['tb_s']:.2f}{noise} |"
            )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    batches = [r["batch"] for r in rows]
    ax.plot(batches, [r["ratio"] for r in rows], "o-", label="ours (best candidate)")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--", label="XLA bf16")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (tokens per step)")
    ax.set_ylabel("speed-up over XLA bf16")
    ax.set_title(title)
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="directory for the results")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    parser.add_argument("--commit", default=None, help="commit measured (default: git rev-parse HEAD)")
    parser.add_argument("--device-tag", default="h100", help="file name suffix: mlp_stack-<tag>.json")
    parser.add_argument("--candidates", default="", help="regex: measure only the candidates it matches")
    parser.add_argument(
        "--per-matrix", default="", help="regex: also time one gate and one down alone for these candidates and XLA"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    batches = [int(b) for b in args.batches.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"mlp_stack-{args.device_tag}"

    def write(rows: list[dict], info: dict) -> None:
        report = {
            **run_info("mlp_stack", commit=args.commit),
            "timing": f"median wall time of {REPS} jit calls of {STEPS} steps each (fori_loop), over {STEPS}",
            **info,
            "rows": rows,
        }
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        table = markdown(report)
        stem.with_suffix(".md").write_text(table)
        plot(rows, stem.with_suffix(".png"), f"{SHAPE_NAME}, {report['device']}")
        print(table, flush=True)

    measure(batches, args.candidates, args.per_matrix, args.seed, write)


if __name__ == "__main__":
    main()
