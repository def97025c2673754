"""Which plan each compressed layer of a model runs at a batch, and whether a forced plan can."""

from __future__ import annotations

from ..layers import CompressedLinear
from ..models.llama import Llama
from ..ops import gemm, gemv
from ..pipelines import Plan, default_plan, fused_kernels
from ..sharding import ShardedCompressedLinear, shard_plan, shard_shape
from .models import DTYPE, linears


def refusal(plan: Plan | None, model: Llama, batch: int) -> str | None:
    """Why a forced plan cannot run every compressed layer at `batch`, or None."""
    if plan is None or plan.kernel == "xla":
        return None
    family = {"gemv": gemv, "gemm": gemm}[plan.kernel]
    for path, layer in linears(model):
        if isinstance(layer, CompressedLinear):
            rows, cols = layer.weight.get_value().shape
            if plan.kernel not in fused_kernels(plan.pipeline, rows, cols, batch) or not family.supports(
                rows, cols, batch, plan.variant
            ):
                return f"plan {plan} does not take batch {batch} for {path} ({rows}x{cols}) on this device"
    return None


def chosen_plans(model: Llama, batch: int) -> dict[str, str]:
    """The plan each distinct compressed shape runs at `batch` (for a tensor-parallel layer, the
    shape of each device's shard, named "shard RxC")."""
    plans = {}
    for _, layer in linears(model):
        if isinstance(layer, CompressedLinear):
            w = layer.weight.get_value()
            plans.setdefault("x".join(map(str, w.shape)), str(layer.plan or default_plan(w, batch, DTYPE)))
        elif isinstance(layer, ShardedCompressedLinear):
            w = layer.weight.get_value()
            plans.setdefault("shard " + "x".join(map(str, shard_shape(w))), str(shard_plan(w, batch, DTYPE)))
    return plans
