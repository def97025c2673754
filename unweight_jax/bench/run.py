"""`unweight bench` from start to finish: build both models side by side, measure their footprint,
time the decode step of every (batch, context) case that fits, run the MLP stack, and write the
report after each case (so a run cut short still leaves its results)."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax

from ..bundle import BundleReader
from ..layers import CompressedLinear
from ..loading import load_bundle_model
from ..models.config import LlamaConfig
from ..models.llama import Llama
from ..ops import gemv, registry
from ..pipelines import Plan, matmul
from ..sharding import tp_mesh
from . import dfloat11_peer, mlp_stack
from .allreduce import allreduce_ms
from .decode_step import (
    Case,
    Placement,
    agreement,
    filled_cache,
    kv_cache_bytes,
    lower_step,
    start_tokens,
    time_steps,
    workspace_bytes,
)
from .footprint import DeviceMemory, resident_bytes, summary, write_bundle
from .models import (
    DTYPE,
    SIZE_NAMES,
    SIZES,
    bundle_bf16_model,
    checkpoint_model,
    compress_model,
    linears,
    random_model,
    shard_bf16_model,
    weight_read_bytes,
)
from .plans import chosen_plans, refusal
from .report import size, write_report
from .run_info import device_tag, run_info

BASELINE = "xla_bf16"


@dataclasses.dataclass(frozen=True)
class Options:
    size: str  # a key of SIZES, for generated weights
    checkpoint: Path | None
    bundle: Path | None
    batches: list[int]
    contexts: list[int]
    steps: int
    reps: int
    plan: Plan | None  # None: the library's own choice per layer and batch
    tp: int | None
    out: Path
    device_tag: str | None  # None: from the device kind
    skip_disk: bool
    mlp_stack: bool
    seed: int
    commit: str | None
    compile_workers: int = 1  # > 1: compile every case up front on that many threads


class Progress:
    """Prints each stage with the seconds since the start."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f} s] {message}", flush=True)


def run_bench(opts: Options) -> dict:
    log = Progress()
    # DFloat11 runs in PyTorch, in its own process, before this one's JAX takes the GPU's memory.
    peer = None
    if opts.mlp_stack and opts.tp is None:
        log("DFloat11 peer (PyTorch and CuPy, in its own process)")
        peer = dfloat11_peer.run(_config(opts), opts.batches, steps=opts.steps, reps=opts.reps, seed=opts.seed)
    mesh = tp_mesh(opts.tp) if opts.tp else None
    devices = list(mesh.devices.flat) if mesh is not None else [jax.devices()[0]]
    memory = DeviceMemory(devices)
    tp = opts.tp or 1
    log(f"{len(devices)} x {devices[0].device_kind}; footprint as {memory.method}")

    with tempfile.TemporaryDirectory(prefix="unweight-bench-") as scratch:
        bf16, bf16_held, source, name = _bf16_model(opts, memory, mesh, log)
        bundle, bundle_source = opts.bundle, "given"
        if bundle is None and (not opts.skip_disk or mesh is not None):  # tensor parallelism loads from one
            log("encoding every matrix with the C++ codec into a bundle file")
            bundle, bundle_source = Path(scratch) / "model.unw.safetensors", "encoded here (C++ codec)"
            write_bundle(bf16, bundle)
        measure_disk = opts.bundle is not None or not opts.skip_disk
        bundle_bytes = BundleReader(bundle).file_bytes if measure_disk else None

        log("building the compressed model (every projection and the LM head in palette form)")
        if mesh is not None:
            build: Callable[[], Llama] = lambda: load_bundle_model(bundle, dtype=DTYPE, mesh=mesh)
        elif opts.bundle is not None:
            build = lambda: load_bundle_model(opts.bundle, form="palette", dtype=DTYPE, plan=opts.plan)
        else:
            build = lambda: compress_model(bf16, opts.plan)
        ours, ours_held = memory.held_by(build, resident_bytes)

    footprint = summary(bf16, ours, bf16_held, ours_held, bundle_bytes, bundle_source, memory)
    log(f"weights held: bf16 {size(bf16_held)}, compressed {size(ours_held)} "
        f"({footprint['weights_saving_percent']:.1f} % smaller); bundle on disk: "
        + ("skipped" if bundle_bytes is None else f"{size(bundle_bytes)} ({footprint['bundle_saving_percent']:.1f} % smaller)"))

    report = {
        **run_info("bench", commit=opts.commit, device=devices[0].device_kind),
        "model": name,
        "source": source,
        "tp": tp,
        "plan": str(opts.plan) if opts.plan else "auto",
        "timing": f"median wall time of {opts.reps} jit calls of {opts.steps} decode steps each (fori_loop), "
        f"over {opts.steps}, after a warm-up call",
        "footprint": footprint,
        "rows": [],
        "not_run": [],
    }
    stem = opts.out / f"bench-{opts.device_tag or device_tag(devices[0].device_kind)}"
    _decode_cases(opts, report, bf16, ours, memory, mesh, stem, log)

    if opts.mlp_stack:
        if mesh is not None:
            report["mlp_stack"] = {"skipped": "the MLP stack is a single-device micro-benchmark; run it without --tp"}
        else:
            log("MLP stack")
            report["mlp_stack"] = _mlp_stack(opts, name, bf16, ours) | {"dfloat11": peer}
    write_report(report, stem)
    log(f"wrote {stem}.json, .md and .png")
    return report


def _bf16_model(opts: Options, memory: DeviceMemory, mesh, log: Progress) -> tuple[Llama, int, str, str]:
    """The bf16 model (placed on the mesh when there is one), the device bytes it holds, where its
    weights come from and the model's name."""
    if opts.bundle is not None:
        _config(opts)  # refuses a bundle without a model config
        log(f"decoding {opts.bundle} into the bf16 model")
        build = lambda: bundle_bf16_model(BundleReader(opts.bundle))
        source, name = f"bundle {opts.bundle.name}", opts.bundle.name.removesuffix(".unw.safetensors")
    elif opts.checkpoint is not None:
        log(f"loading {opts.checkpoint} as bf16")
        build = lambda: checkpoint_model(opts.checkpoint)
        source, name = f"checkpoint {opts.checkpoint.name}", opts.checkpoint.name
    else:
        log(f"drawing the {opts.size} model's weights on the device, N(0, 0.02) bf16")
        build = lambda: random_model(SIZES[opts.size], opts.seed)
        source, name = "generated: bf16 N(0, 0.02) matrices, norms 1", SIZE_NAMES[opts.size]

    def placed() -> Llama:
        model = build()
        if mesh is not None:
            shard_bf16_model(model, mesh)
        return model

    model, held = memory.held_by(placed, resident_bytes)
    return model, held, source, name


def _decode_cases(
    opts: Options, report: dict, bf16: Llama, ours: Llama, memory: DeviceMemory, mesh, stem: Path, log: Progress
) -> None:
    """Measures every case that fits (the others go to `not_run`, with the reason), writing the
    report after each."""
    config = bf16.config
    placement = Placement.on_mesh(mesh, config) if mesh is not None else Placement()
    models = {"bf16": bf16, "ours": ours}
    cases = []
    for context in opts.contexts:
        for batch in opts.batches:
            case = Case(batch, context)
            reason = _cannot_run(opts, case, bf16, ours, memory, placement)
            if reason:
                kv = kv_cache_bytes(config, case, opts.steps)
                report["not_run"].append({"batch": batch, "context": context, "model": report["model"],
                                          "kv_cache_bytes_needed": kv, "reason": reason})
                log(f"batch {batch}, context {context}: not run: {reason}")
            else:
                cases.append(case)
    log("choosing each compressed layer's plan per batch (the autotuner measures what its cache lacks)")
    plans = {batch: chosen_plans(ours, batch) for batch in sorted({case.batch for case in cases})}
    log("plans chosen")
    compiled = _compile_ahead(cases, models, opts, placement, log) if opts.compile_workers > 1 else {}
    read = {label: weight_read_bytes(model) for label, model in models.items()}
    for case in cases:
        start = time.perf_counter()
        if case not in compiled:
            log(f"batch {case.batch}, context {case.context}: compiling both models")
            compiled[case] = {label: lower_step(m, case, opts.steps, placement).compile() for label, m in models.items()}
        try:
            row = _measure_case(opts, case, models, compiled.pop(case), read, memory, placement, mesh, report["model"])
            row["plans"] = plans[case.batch]
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            reason = f"ran out of device memory ({str(e).splitlines()[0][:200]})"
            report["not_run"].append({"batch": case.batch, "context": case.context, "model": report["model"],
                                      "kv_cache_bytes_needed": kv_cache_bytes(config, case, opts.steps), "reason": reason})
            log(f"batch {case.batch}, context {case.context}: {reason}")
            continue
        row["seconds"] = round(time.perf_counter() - start, 1)
        report["rows"].append(row)
        log(f"batch {case.batch}, context {case.context}: bf16 {row['baseline_ms']:.3f} ms, compressed "
            f"{row['ours_ms']:.3f} ms ({row['ratio']:.2f}x), tokens agree {row['tokens_agree']:.0%}")
        write_report(report, stem)


def _cannot_run(opts: Options, case: Case, bf16: Llama, ours: Llama, memory: DeviceMemory, placement: Placement) -> str | None:
    """Why a case is not run (its KV cache does not fit beside both models, or a forced plan does
    not take its batch), or None."""
    config = bf16.config
    tp = opts.tp or 1
    kv_split = tp if placement.kv is not None and placement.kv.spec[3] is not None else 1
    largest = max(int(layer.weight[...].nbytes) for _, layer in linears(bf16)) // tp
    kv = kv_cache_bytes(config, case, opts.steps)
    need = kv // kv_split + workspace_bytes(config, case, opts.steps, largest)
    free = memory.free_per_device()
    if need > free:
        return (f"does not fit: the KV cache needs {size(kv)} (with the step's temporaries {size(need)} per "
                f"device); {size(free)} free per device beside both models")
    return refusal(opts.plan, ours, case.batch)


def _compile_ahead(cases: list[Case], models: dict[str, Llama], opts: Options, placement: Placement, log: Progress) -> dict:
    """Every case's executables, lowered here one by one and compiled by a pool of threads (XLA
    compiles without the GIL), before anything is timed."""
    log(f"compiling {len(cases)} cases x {len(models)} models with {opts.compile_workers} threads")
    lowered = {(case, label): lower_step(m, case, opts.steps, placement) for case in cases for label, m in models.items()}
    with ThreadPoolExecutor(opts.compile_workers) as pool:
        executables = dict(zip(lowered, pool.map(lambda low: low.compile(), lowered.values())))
    log("compiled")
    return {case: {label: executables[case, label] for label in models} for case in cases}


def _measure_case(
    opts: Options, case: Case, models: dict[str, Llama], compiled: dict, read: dict[str, int], memory: DeviceMemory,
    placement: Placement, mesh, model_name: str,
) -> dict:
    """Both models' step on one shared cache, the bf16 one first."""
    config = models["bf16"].config
    cache, kv_held = memory.held_by(lambda: filled_cache(config, case, opts.steps, opts.seed, placement), resident_bytes)
    tokens = start_tokens(config, case, opts.seed + 1, placement)
    timing = {}
    for label, model in models.items():
        timing[label], cache = time_steps(compiled[label], model, cache, tokens, steps=opts.steps, reps=opts.reps)
    del cache
    ours_ms, base_ms = timing["ours"].ms, timing["bf16"].ms
    row = {
        "batch": case.batch,
        "context": case.context,
        "model": model_name,
        "pipeline": "palette",
        "ours_ms": round(ours_ms, 4),
        "baseline_ms": round(base_ms, 4),
        "baseline": BASELINE,
        "ratio": round(base_ms / ours_ms, 3),
        "tokens_per_s": round(case.batch / (ours_ms * 1e-3), 1),
        "baseline_tokens_per_s": round(case.batch / (base_ms * 1e-3), 1),
        "weight_bytes_per_step": read["ours"],
        "baseline_weight_bytes_per_step": read["bf16"],
        "kv_cache_bytes": kv_held,
        "tokens_agree": round(agreement(timing["bf16"].tokens, timing["ours"].tokens), 4),
    }
    if mesh is not None:
        row["allreduce_ms"] = round(allreduce_ms(mesh, config, case.batch, steps=opts.steps, reps=opts.reps), 4)
    return row


def _mlp_stack(opts: Options, name: str, bf16: Llama, ours: Llama) -> dict:
    """The MLP stack micro-benchmark on the two models' own MLP weights, with the bench's plan."""
    config: LlamaConfig = bf16.config
    layers = list(zip(bf16.layers, ours.layers))
    if not all(isinstance(o.mlp.gate_proj, CompressedLinear) for _, o in layers):
        return {"skipped": "the compressed model's MLP layers are not all palette-resident"}
    forms = {
        "bf16": [{k: getattr(b.mlp, f"{k}_proj").weight[...] for k in ("gate", "up", "down")} for b, _ in layers],
        "palette": [{k: getattr(o.mlp, f"{k}_proj").weight.get_value() for k in ("gate", "up", "down")} for _, o in layers],
    }
    shape = mlp_stack.StackShape(f"{name}-mlp-stack", config.n_layers, config.dim, config.hidden_dim)
    label = f"plan:{opts.plan or 'auto'}"
    candidates = {label: ("palette", lambda x, w: matmul(x, w, plan=opts.plan))}
    on_gpu = jax.default_backend() == "gpu" and bool(registry.CUDA_TARGETS)
    result: dict = {"shape": shape.describe()}

    def keep(rows: list[dict], info: dict) -> None:
        result.update(info, rows=rows)

    mlp_stack.measure(
        shape, forms, opts.batches, lambda batch: candidates, keep,
        check_twin=on_gpu and gemv.supports(config.hidden_dim, config.dim, 3),
        copy_bytes=mlp_stack.COPY_BYTES if on_gpu else 64 << 20, steps=opts.steps, reps=opts.reps,
    )
    return result


def _config(opts: Options) -> LlamaConfig:
    """The model's configuration, read without loading any weight."""
    if opts.bundle is not None:
        config = BundleReader(opts.bundle).config
        if config is None:
            raise ValueError(f"{opts.bundle}: the bundle holds no model config (unweight.config)")
        return LlamaConfig.from_hf(config)
    if opts.checkpoint is not None:
        return LlamaConfig.from_hf(opts.checkpoint)
    return SIZES[opts.size]

