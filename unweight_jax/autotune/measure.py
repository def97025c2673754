"""Timing plans end to end on the device, on synthetic operands of the case's shape and form.

The weight is drawn N(0, 0.02) in bf16 (2.55 bits of exponent entropy, close to trained weights'
2.6, so the palette escapes and the Huffman stream look like a real layer's) and encoded with the
codec on the host, once per shape. Each plan is compiled into one jitted program that runs it
`reps` times in a `lax.fori_loop`, rotating over copies of the weight whose total size exceeds
twice the L2, so that every repetition reads its weight from HBM as a model's layers do. Each
repetition feeds one element of its output back into the next one's activations, and the weight
passes an optimization barrier with the activations, so XLA can neither drop a repetition nor
hoist a decode out of the loop. The repetition count is a run-time argument: one compilation per
plan serves the calibration and the timed calls, and the plans of a pass compile in parallel.

Everything here runs on concrete arrays under `jax.ensure_compile_time_eval()`, so it may be
called while an enclosing function is being traced (the tuner runs inside `jax.jit` tracing).
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

from .. import codec, pipelines
from ..format import DEFAULT_CHUNK_STEPS, HuffmanParts
from ..pipelines import Plan
from ..weights import CompressedWeight, from_huffman
from .key import Case

WEIGHT_STD = 0.02
# jax reports no cache sizes; 64 MiB is above the L2 of an H100 or H200 (50 MB).
ASSUMED_L2_BYTES = 64 << 20
_NUDGE = 2.0**-24  # scales the element fed back: it changes nothing, but the dependency is real


@dataclass(frozen=True)
class Budget:
    """How long measuring may take on one platform."""

    target_call_s: float  # a timed call runs enough repetitions to last about this long
    calls: int  # timed calls per plan whose median is its time
    final_calls: int  # timed calls per finalist, interleaved between finalists
    max_copies: int  # weight copies rotated through (each adds to the compiled program)
    max_reps: int  # repetitions per call, at most


# On the CPU caches are not the point and compile time is: one copy, short calls.
BUDGETS = {
    "gpu": Budget(target_call_s=0.01, calls=3, final_calls=7, max_copies=64, max_reps=1 << 14),
    "cpu": Budget(target_call_s=0.005, calls=3, final_calls=5, max_copies=1, max_reps=256),
}


def budget_for(platform: str) -> Budget:
    return BUDGETS["cpu" if platform == "cpu" else "gpu"]


@functools.lru_cache(maxsize=4)
def synthetic_parts(rows: int, cols: int, chunk_steps: int) -> HuffmanParts:
    """The Huffman parts of a seeded N(0, 0.02) bf16 [rows, cols] weight (cached: gate and up share one)."""
    rng = np.random.default_rng([rows, cols])
    w = (rng.standard_normal((rows, cols), dtype=np.float32) * WEIGHT_STD).astype(ml_dtypes.bfloat16)
    return codec.compress(w, chunk_steps=chunk_steps)


@functools.lru_cache(maxsize=2)
def synthetic_weight(rows: int, cols: int, form: str, chunk_steps: int) -> CompressedWeight:
    """`synthetic_parts` in resident `form`, on the device (cached: the batches of a shape share it)."""
    with jax.ensure_compile_time_eval():
        return from_huffman(synthetic_parts(rows, cols, chunk_steps), form)


class Bench:
    """One case on the device: the activations and weight copies, made once, and a compiled,
    calibrated program per plan."""

    def __init__(self, case: Case, budget: Budget) -> None:
        self.case = case
        self.budget = budget
        with jax.ensure_compile_time_eval():
            weight = synthetic_weight(case.rows, case.cols, case.form, case.chunk_steps or DEFAULT_CHUNK_STEPS)
            weight_bytes = sum(int(leaf.nbytes) for leaf in jax.tree.leaves(weight))
            copies = min(budget.max_copies, max(1, math.ceil(2 * ASSUMED_L2_BYTES / weight_bytes) + 1))
            self.weights: list[CompressedWeight] = [weight]
            self.weights += [jax.tree.map(jnp.copy, weight) for _ in range(copies - 1)]
            rng = np.random.default_rng(case.batch)
            self.x = jnp.asarray(rng.standard_normal((case.batch, case.cols), dtype=np.float32), dtype=case.x_dtype)
        self._programs: dict[Plan, tuple[Callable, int]] = {}

    def prepare(self, plans: Sequence[Plan]) -> None:
        """Compile the programs of `plans` not compiled yet, in parallel threads (XLA compiles
        without the GIL, and compiling is most of a sweep's time), then calibrate each."""
        todo = [p for p in dict.fromkeys(plans) if p not in self._programs]
        if not todo:
            return
        with ThreadPoolExecutor(max_workers=min(len(todo), os.cpu_count() or 1)) as pool:
            compiled = list(pool.map(self._compile, todo))
        for plan, run in zip(todo, compiled):
            self._programs[plan] = (run, self._calibrate(run))

    def call_ms(self, plan: Plan) -> float:
        """One timed call of `plan`'s program: ms per repetition."""
        self.prepare([plan])
        run, reps = self._programs[plan]
        return _wall_s(run, reps, self.x, self.weights) * 1e3 / (reps * len(self.weights))

    def time_ms(self, plan: Plan, calls: int | None = None) -> float:
        """Median of `calls` (default: the budget's) timed calls: ms per repetition."""
        return statistics.median(self.call_ms(plan) for _ in range(calls or self.budget.calls))

    def _compile(self, plan: Plan) -> Callable:
        # A worker thread is outside any trace: it lowers with the concrete operands as they are.
        return _looped(plan).lower(np.int32(1), self.x, self.weights).compile()

    def _calibrate(self, run: Callable) -> int:
        """Repetitions for a call of about the budget's target time."""
        _wall_s(run, 1, self.x, self.weights)  # warms up
        # Twice: the first estimate includes the dispatch, which a single repetition may dwarf.
        reps = 1
        for _ in range(2):
            took = _wall_s(run, reps, self.x, self.weights)
            reps = max(1, min(self.budget.max_reps, round(reps * self.budget.target_call_s / took)))
        return reps


def _looped(plan: Plan) -> Callable:
    """jit(run(reps, x, weights)): `reps` rounds, each multiplying by every weight in turn."""

    def run(reps: jax.Array, x: jax.Array, weights: list[CompressedWeight]) -> jax.Array:
        def step(_: jax.Array, x: jax.Array) -> jax.Array:
            for w in weights:
                x, w = lax.optimization_barrier((x, w))  # the weight's uses now depend on this step
                y = pipelines.matmul(x, w, plan=plan)
                x = lax.dynamic_update_slice(x, x[:1, :1] + (y[:1, :1] * _NUDGE).astype(x.dtype), (0, 0))
            return x

        return lax.fori_loop(0, reps, step, x)

    return jax.jit(run)


def _wall_s(run: Callable, reps: int, *args: object) -> float:
    with jax.ensure_compile_time_eval():
        start = time.perf_counter()
        jax.block_until_ready(run(np.int32(reps), *args))
        return time.perf_counter() - start
