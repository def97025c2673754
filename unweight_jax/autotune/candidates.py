"""The plans that can run a case, the pruning that keeps a sweep quick, and the static choice.

A case's candidates are the decode + XLA-dot plan of every pipeline its resident form allows
(on the CPU these are all there is), and, with bf16 activations on a GPU, every variant of every
fused kernel family that takes the shape and batch (`pipelines.fused_kernels`, each family's
`supports`). `PRUNE_RULES` then drop variants that cannot win at a batch, and `split_passes`
orders what is left for the tuner's two passes. All of it is data below, not code paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from .. import pipelines
from ..ops import gemm, gemv
from ..pipelines import Plan

FAMILIES: dict[str, ModuleType] = {"gemv": gemv, "gemm": gemm}  # each has VARIANTS and supports()

# `pipelines.pipelines_for` and each form's own pipeline, by form name: for cases known only by
# name (a bundle's tensors, a cache key). tests/test_autotune.py checks them against pipelines.
FORM_PIPELINES: dict[str, tuple[str, ...]] = {
    "palette": ("palette",),
    "transcode": ("full", "exponent", "transcode"),
    "huffman": ("full", "exponent"),
    "exponent": ("exponent",),
}
OWN_PIPELINE: dict[str, str] = {
    "palette": "palette",
    "transcode": "transcode",
    "huffman": "full",
    "exponent": "exponent",
}


@dataclass(frozen=True)
class PruneRule:
    """Variants of `family` whose table entry has every attribute value in `match` (all of the
    family's variants for an empty `match`) are not tried below `min_batch`."""

    family: str
    match: dict[str, object]
    min_batch: int


# A tensor-core tile of N batch rows is more than 3/4 idle below N/4 rows; the GEMV family (up to
# its own limit, batch <= gemv.MAX_BATCH, from gemv.supports) or a narrower tile covers those.
PRUNE_RULES: tuple[PruneRule, ...] = tuple(PruneRule("gemm", {"tile_n": n}, n // 4) for n in (64, 128, 256))

# First pass: the decode + dot plans and at most this many variants of each family, the static
# choice first. Second pass: the other variants of every family whose best first-pass time is
# within REFINE_WITHIN of the best; then every plan within REFINE_WITHIN of the best is timed
# again with more calls, and the fastest of those wins.
FIRST_PASS_PER_FAMILY = 2
REFINE_WITHIN = 0.10

# The static choice (tuning off, or nothing cached in cache-only mode): per family, (largest
# batch, variant) in order of preference, the first that covers the batch and runs the case here;
# the GEMV up to its largest batch, the GEMM above. On Hopper the streaming GEMV was the fastest at
# batches 1 to 16 on the 8B MLP stack (benchmarks/results/mlp_stack-h100-tma.json); elsewhere the
# variants the tuner chose most often for those shapes (autotune-h100.json).
STATIC_VARIANTS: dict[str, tuple[tuple[int, str], ...]] = {
    "gemv": ((gemv.MAX_BATCH, "stream_w8"), (1, "rows2"), (gemv.MAX_BATCH, "mma_acc4")),
    "gemm": ((64, "n64_s8"), (128, "n128_s6"), (2**31, "n256_s4")),
}


def static_names(family: str, batch: int) -> list[str]:
    """The family's static variants that cover `batch`, in order of preference."""
    return [name for limit, name in STATIC_VARIANTS[family] if batch <= limit]


def variant_name(plan: Plan) -> str:
    """The name of a fused plan's variant in its family's table."""
    return next(name for name, v in FAMILIES[plan.kernel].VARIANTS.items() if v.id == plan.variant)


def label(plan: Plan) -> str:
    """A plan as people read it: "palette" (decode + XLA's dot) or "palette/gemv:mma_acc4"."""
    return plan.pipeline if plan.kernel == "xla" else f"{plan.pipeline}/{plan.kernel}:{variant_name(plan)}"


def runnable(pipelines_allowed: Sequence[str], rows: int, cols: int, batch: int, x_dtype: object) -> list[Plan]:
    """Every plan that runs this case here, unpruned: decode + dot plans first, in pipeline order."""
    plans = [Plan(p) for p in pipelines_allowed]
    if np.dtype(x_dtype) != np.dtype("bfloat16"):
        return plans  # the fused kernels take bf16 activations only
    for pipeline in pipelines_allowed:
        for family in pipelines.fused_kernels(pipeline, rows, cols, batch):
            module = FAMILIES[family]
            plans += [
                Plan(pipeline, family, v.id)
                for name, v in module.VARIANTS.items()
                if module.supports(rows, cols, batch, name)
            ]
    return plans


def prune(plans: Sequence[Plan], batch: int) -> list[Plan]:
    """`plans` less those a PRUNE_RULE excludes at `batch`."""

    def excluded(plan: Plan) -> bool:
        if plan.kernel == "xla":
            return False
        variant = FAMILIES[plan.kernel].VARIANTS[variant_name(plan)]
        return any(
            rule.family == plan.kernel
            and batch < rule.min_batch
            and all(getattr(variant, field) == value for field, value in rule.match.items())
            for rule in PRUNE_RULES
        )

    return [p for p in plans if not excluded(p)]


def split_passes(plans: Sequence[Plan], batch: int) -> tuple[list[Plan], list[Plan]]:
    """(first pass, held back): decode + dot plans and each (pipeline, family)'s first
    FIRST_PASS_PER_FAMILY variants, the static choice ahead of the family's table order."""
    first, held = [], []
    taken: dict[tuple[str, str], int] = {}
    for plan in sorted(plans, key=lambda p: 0 if p.kernel == "xla" else _static_rank(p, batch)):
        group = (plan.pipeline, plan.kernel)
        if plan.kernel == "xla" or taken.get(group, 0) < FIRST_PASS_PER_FAMILY:
            taken[group] = taken.get(group, 0) + 1
            first.append(plan)
        else:
            held.append(plan)
    return first, held


def static_plan(
    pipeline: str, rows: int, cols: int, batch: int, x_dtype: object, *, variant: tuple[str, str] | None = None
) -> Plan:
    """The deterministic choice for `pipeline`: the GEMV up to its largest batch, the tensor-core
    GEMM above, each with its STATIC_VARIANTS variant (or `variant`, a (family, name) pair, where
    that family runs the case), else decode + XLA's dot."""
    plans = runnable((pipeline,), rows, cols, batch, x_dtype)
    if variant is not None:
        family, name = variant
        pick = Plan(pipeline, family, FAMILIES[family].VARIANTS[name].id)
        if pick in plans:
            return pick
    for family in STATIC_VARIANTS:
        for name in static_names(family, batch):
            pick = Plan(pipeline, family, FAMILIES[family].VARIANTS[name].id)
            if pick in plans:
                return pick
    return Plan(pipeline)


def _static_rank(plan: Plan, batch: int) -> int:
    """The place of the plan's variant among the family's static variants at `batch`, then (after
    them) in the family's table."""
    name, static = variant_name(plan), static_names(plan.kernel, batch)
    if name in static:
        return static.index(name)
    return len(static) + list(FAMILIES[plan.kernel].VARIANTS).index(name)
