"""A Llama MLP stack, one decode or prefill step at a time: compressed matmuls against XLA bf16.

`layers` x (gate [inter, hidden], up [inter, hidden], down [hidden, inter]); a step runs every layer
as `x = clip(silu(x @ gate.T) * (x @ up.T), -4, 4) @ down.T`, each weight a separate array, the
layers unrolled in one jit; the clip (fused into the same elementwise kernel) keeps a chained stack
of random layers finite. The baseline (`xla_bf16_unrolled`) does this with XLA's dot on the bf16
weights; each candidate does the same elementwise work with another matmul. A step's time is the
median wall time of `reps` jit calls of `steps` steps each (`fori_loop`), divided by `steps`.

`benchmarks/mlp_stack.py` runs it over every kernel variant at the Llama-3.1-8B shapes; `unweight
bench` runs it on its models' own MLP weights with the plan the library picks.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from ..ops import decode, gemv
from .synthetic import normal_bf16
from .timing import wall_ms
from .transcode import palette_and_exponent

try:  # the tensor-core family, where it is built
    from ..ops import gemm
except ImportError:
    gemm = None

STEPS = 4
REPS = 5
CLIP = 4.0
BASELINE = "xla_bf16_unrolled"
COPY_BYTES = 4 << 30
PALETTE_READ = ("palette", "idx", "sm", "esc_mask", "esc_prefix", "esc_exp")  # what the fused kernels read

Layer = dict[str, object]  # "gate" / "up" / "down" -> that weight in one form
Matmul = Callable[[jax.Array, object], jax.Array]
Candidates = dict[str, tuple[str, Matmul]]  # name -> (form the matmul reads, matmul)


@dataclasses.dataclass(frozen=True)
class StackShape:
    name: str
    layers: int
    hidden: int
    inter: int

    @property
    def matrices(self) -> dict[str, tuple[int, int]]:
        return {"gate": (self.inter, self.hidden), "up": (self.inter, self.hidden), "down": (self.hidden, self.inter)}

    def describe(self) -> str:
        return (f"{self.name}: {self.layers} x (gate {self.inter}x{self.hidden}, up, "
                f"down {self.hidden}x{self.inter})")


LLAMA_8B_STACK = StackShape("llama3.1-8b-mlp-stack", 32, 4096, 14336)


# ------------------------------------------------------------------------------------ weights


def make_stack(shape: StackShape, seed: int) -> dict[str, list[Layer]]:
    """The bf16, palette and exponent forms of every layer, drawn and transcoded on the device."""
    key = jax.random.key(seed)
    forms: dict[str, list[Layer]] = {"bf16": [], "palette": [], "exponent": []}
    for i in range(shape.layers):
        layer = {n: normal_bf16(jax.random.fold_in(key, 3 * i + j), s) for j, (n, s) in enumerate(shape.matrices.items())}
        derived = {n: palette_and_exponent(w) for n, w in layer.items()}
        forms["bf16"].append(layer)
        forms["palette"].append({n: f[0] for n, f in derived.items()})
        forms["exponent"].append({n: f[1] for n, f in derived.items()})
    return forms


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


def step_ms(matmul: Matmul, x: jax.Array, layers: list[Layer], *, steps: int, reps: int) -> float:
    """Median time of one step of the stack, in ms."""
    run = jax.jit(lambda x, layers: lax.fori_loop(0, steps, lambda _, h: stack_step(matmul, h, layers), x))
    return wall_ms(run, x, layers, reps=reps) / steps


def matrix_ms(matmul: Matmul, x: jax.Array, weights: list[object], *, reps: int) -> float:
    """Device time of one matmul by one of `weights` (all of one shape), in ms: the slope between
    jit calls running it on 8 of them and on all, which cancels dispatch and synchronisation."""
    run = jax.jit(lambda x, ws: [matmul(x, w) for w in ws])
    slope = wall_ms(run, x, weights, reps=reps) - wall_ms(run, x, weights[:8], reps=reps)
    return slope / (len(weights) - 8)


def copy_tb_s(copy_bytes: int, *, reps: int) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), in TB/s."""
    words = jnp.arange(copy_bytes // 4, dtype=jnp.uint32)
    ms = wall_ms(jax.jit(lambda a, k: a ^ k), words, jnp.uint32(0x5A5A5A5A), reps=reps)
    return 2 * copy_bytes / (ms * 1e-3) / 1e12


# ------------------------------------------------------------------------------------ candidates


def candidates(shape: StackShape, batch: int, pattern: str) -> Candidates:
    """Every kernel variant that takes the stack's shapes at `batch`, for the names `pattern`
    matches (re.search):

    - `gemv:<variant>` (batch <= 16): the GEMV kernels on the palette form;
    - `gemm:<variant>`: the tensor-core kernels on the palette form, where built and supported;
    - `full`: the palette form decoded to bf16, then XLA's dot;
    - reported beside them, never as ours: `gemv_exponent:<variant>` (exponent + sign/mantissa
      bytes, 16 bits a weight) and `gemv_bf16:<variant>` (the twin on plain bf16).
    """
    out: Candidates = {}

    def fits(family, variant: str) -> bool:
        return all(family.supports(r, c, batch, variant) for r, c in shape.matrices.values())

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
    return name.split(":")[0] in ("gemv", "gemm", "full", "plan")


def exact_vs_twin(forms: dict[str, list[Layer]], hidden: int) -> bool:
    """The fused palette GEMV equals its bf16 twin bit for bit on the first layer's gate: a check
    of the device transcode as much as of the kernel."""
    x = jax.random.normal(jax.random.key(1), (3, hidden), jnp.float32).astype(jnp.bfloat16)
    fused = gemv.gemv_palette(x, forms["palette"][0]["gate"])
    twin = gemv.gemv_bf16(x, forms["bf16"][0]["gate"])
    as_bits = functools.partial(lax.bitcast_convert_type, new_dtype=jnp.uint16)
    return bool(jnp.array_equal(as_bits(fused), as_bits(twin)))


# ------------------------------------------------------------------------------------ measuring


def per_matrix(shape: StackShape, batch: int, chosen: Candidates, forms: dict[str, list[Layer]], *, reps: int) -> list[dict]:
    """One gate and one down matmul alone, for XLA bf16 and the `chosen` candidates: where the
    stack's time goes."""
    out = []
    for kind in ("gate", "down"):
        rows, cols = shape.matrices[kind]
        x = jax.random.normal(jax.random.key(batch), (batch, cols), jnp.float32).astype(jnp.bfloat16)
        for name, (form, matmul) in {"xla_bf16": ("bf16", dense), **chosen}.items():
            weights = [layer[kind] for layer in forms[form]]
            ms = matrix_ms(matmul, x, weights, reps=reps)
            read = nbytes([{kind: w} for w in weights], PALETTE_READ if form == "palette" else None) / len(weights)
            out.append({"batch": batch, "matrix": f"{kind} {rows}x{cols}", "candidate": name, "ms": round(ms, 4),
                        "tb_s": round(read / (ms * 1e-3) / 1e12, 3)})
            print(f"batch {batch} {kind} {name}: {ms * 1e3:.1f} us, {out[-1]['tb_s']:.2f} TB/s", flush=True)
    return out


def measure(
    shape: StackShape,
    forms: dict[str, list[Layer]],
    batches: list[int],
    candidates_for: Callable[[int], Candidates],
    report: Callable[[list[dict], dict], None],
    *,
    matrix_candidates_for: Callable[[int], Candidates] | None = None,
    check_twin: bool = True,
    copy_bytes: int = COPY_BYTES,
    steps: int = STEPS,
    reps: int = REPS,
) -> None:
    """Measures every batch over the weights `forms` ("bf16", "palette" and, where a candidate
    reads it, "exponent"), handing the rows so far to `report` after each."""
    copy = copy_tb_s(copy_bytes, reps=reps)
    print(f"device-to-device copy: {copy:.3f} TB/s", flush=True)
    form_bytes = {
        form: nbytes(layers, PALETTE_READ if form == "palette" else None) for form, layers in forms.items()
    }
    info: dict = {}
    if check_twin:
        info["exact_vs_twin"] = exact_vs_twin(forms, shape.hidden)
    info |= {"form_bytes": form_bytes, "copy_tb_s": round(copy, 3)}
    print(f"weights: {form_bytes}; fused palette GEMV == bf16 twin: {info.get('exact_vs_twin', 'not checked')}",
          flush=True)
    if matrix_candidates_for is not None:
        info["per_matrix"] = []

    rows = []
    for batch in batches:
        x = jax.random.normal(jax.random.key(batch), (batch, shape.hidden), jnp.float32).astype(jnp.bfloat16)
        baseline = step_ms(dense, x, forms["bf16"], steps=steps, reps=reps)
        times = {}
        for name, (form, matmul) in candidates_for(batch).items():
            times[name] = round(step_ms(matmul, x, forms[form], steps=steps, reps=reps), 4)
            print(f"batch {batch} {name}: {times[name]:.3f} ms (XLA bf16 {baseline:.3f} ms)", flush=True)
        if matrix_candidates_for is not None and (chosen := matrix_candidates_for(batch)):
            info["per_matrix"] += per_matrix(shape, batch, chosen, forms, reps=reps)
        ours = {n: t for n, t in times.items() if is_ours(n)}
        if not ours:
            continue
        best = min(ours, key=ours.get)
        read = form_bytes["palette"]
        rows.append(
            {
                "batch": batch,
                "shape": shape.name,
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


# ------------------------------------------------------------------------------------ report


def markdown(report: dict, shape: StackShape) -> str:
    lines = [
        f"# {report['benchmark']}: {report['device']}, driver {report['driver']}, jax {report['jax_version']}",
        "",
        f"{shape.describe()}, bf16 N(0, 0.02); "
        f"weights read per step: bf16 {report['form_bytes']['bf16'] / 1e9:.2f} GB, "
        f"palette {report['form_bytes']['palette'] / 1e9:.2f} GB. Copy bandwidth {report['copy_tb_s']} TB/s. "
        f"Fused palette GEMV == bf16 twin: {report.get('exact_vs_twin', 'not checked')}. {report['timing']}",
        "",
        *table(report["rows"]),
    ]
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


def table(rows: list[dict]) -> list[str]:
    """The markdown table of the stack's rows."""
    lines = [
        "| batch | ours | ours ms | XLA bf16 ms | speed-up | ours TB/s | XLA TB/s | candidates (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cands = ", ".join(f"{n} {t:.3f}" for n, t in r["candidates"].items())
        lines.append(
            f"| {r['batch']} | {r['variant']} | {r['ours_ms']:.3f} | {r['baseline_ms']:.3f} | {r['ratio']:.2f}x | "
            f"{r['achieved_tb_s']:.2f} | {r['baseline_tb_s']:.2f} | {cands} |"
        )
    return lines
