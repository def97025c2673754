"""Choosing a plan for a case: forced, static, cached, or measured in two passes and cached."""

from __future__ import annotations

import os
import statistics
import threading
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import jax

from ..pipelines import Plan
from ..weights import CompressedWeight
from .cache import Entry, PlanCache, forget_open, now_text, open_cache
from .candidates import FORM_PIPELINES, OWN_PIPELINE, REFINE_WITHIN, label, prune, runnable, split_passes, static_plan
from .control import current_force, mode
from .key import Case, key_text, this_machine
from .measure import Bench, budget_for

# (cache file, key) -> plan: after the first trace of a case, choosing it is one dict lookup.
_chosen: dict[tuple[Path, str], Plan] = {}
_measuring = threading.Lock()  # one measurement at a time: concurrent ones would time each other


def choose(
    w: CompressedWeight, batch: int, x_dtype: object, *, cache: str | os.PathLike[str] | None = None
) -> Plan:
    """The plan for `x[batch, C] @ w.T` with activations of `x_dtype`: forced, else (mode "off")
    static, else cached, else (mode "on", more than one candidate) measured now and cached."""
    return choose_case(Case.of(w, batch, x_dtype), batch, cache=cache)


def choose_case(case: Case, batch: int, *, cache: str | os.PathLike[str] | None = None) -> Plan:
    """`choose` for a case given without its weight (a weight's shard inside `shard_map`, say);
    `batch` is the real batch, `case.batch` its bucket."""
    rows, cols, x_dtype = case.rows, case.cols, case.x_dtype
    allowed = FORM_PIPELINES[case.form]
    force = current_force()
    if force.plan is not None:
        return force.plan
    own = OWN_PIPELINE[case.form]
    if force:
        pipeline = force.pipeline if force.pipeline in allowed else own
        return static_plan(pipeline, rows, cols, batch, x_dtype, variant=force.variant)
    tuning = mode()
    if tuning == "off":
        return static_plan(own, rows, cols, batch, x_dtype)

    store = open_cache(cache)
    key = key_text(this_machine(), case)
    plan = _chosen.get((store.path, key))
    if plan is not None and (batch <= case.batch or plan in runnable(allowed, rows, cols, batch, x_dtype)):
        return plan
    plans = candidates_for(allowed, case)
    if batch > case.batch:  # beyond the last bucket: keep what also runs the real batch
        plans = [p for p in plans if p in runnable(allowed, rows, cols, batch, x_dtype)]
    if len(plans) == 1:
        return plans[0]
    entry = _usable(store.get(key), plans)
    if entry is None and tuning == "on":
        store.refresh()  # another process may have tuned it meanwhile
        entry = _usable(store.get(key), plans) or measure_into(store, key, case, plans)
    if entry is None:  # cache-only, and nothing cached
        return static_plan(own, rows, cols, batch, x_dtype)
    plan = plan_of(entry)
    _chosen[(store.path, key)] = plan
    return plan


def forget() -> None:
    """Forget the choices and cache contents this process holds in memory (the cache file stays),
    as a new process would start: for a process that outlives an `unweight tune` run elsewhere."""
    _chosen.clear()
    forget_open()


def candidates_for(pipelines_allowed: Sequence[str], case: Case) -> list[Plan]:
    """The pruned candidates of a case."""
    return prune(runnable(pipelines_allowed, case.rows, case.cols, case.batch, case.x_dtype), case.batch)


def tune_case(store: PlanCache, case: Case, plans: Sequence[Plan], *, retune: bool = False) -> Entry:
    """The cache entry of `case`, measured (even for a single candidate) unless cached."""
    key = key_text(this_machine(), case)
    entry = None if retune else _usable(store.get(key), plans)
    return entry or measure_into(store, key, case, plans)


def measure_into(store: PlanCache, key: str, case: Case, plans: Sequence[Plan]) -> Entry:
    """Measure `plans` on `case`, store the entry under `key`, return it."""
    choice, times = measure(case, plans)
    entry = {
        "plan": asdict(choice),
        "label": label(choice),
        "times_ms": {label(p): round(t, 5) for p, t in sorted(times.items(), key=lambda item: item[1])},
        "date": now_text(),
        "case": asdict(case),
    }
    store.put(key, entry)
    return entry


def measure(case: Case, plans: Sequence[Plan]) -> tuple[Plan, dict[Plan, float]]:
    """(fastest plan, ms of every plan timed). First pass: `split_passes`' first set. Second: the
    held-back variants of each family whose best is within REFINE_WITHIN of the best. Then the
    plans within REFINE_WITHIN of the best are timed again, interleaved, and the fastest wins."""
    with _measuring, jax.ensure_compile_time_eval():
        bench = Bench(case, budget_for(jax.devices()[0].platform))
        first, held = split_passes(plans, case.batch)
        bench.prepare(first)
        times = {p: bench.time_ms(p) for p in first}
        near_families = {(p.pipeline, p.kernel) for p in _within(times)}
        second = [p for p in held if (p.pipeline, p.kernel) in near_families]
        bench.prepare(second)
        times |= {p: bench.time_ms(p) for p in second}
        finalists = _within(times)
        if len(finalists) > 1:
            rounds = [[bench.call_ms(p) for p in finalists] for _ in range(bench.budget.final_calls)]
            times |= {p: statistics.median(r[i] for r in rounds) for i, p in enumerate(finalists)}
        return min(finalists, key=times.__getitem__), times


def plan_of(entry: Entry) -> Plan:
    p = entry["plan"]
    return Plan(str(p["pipeline"]), str(p["kernel"]), int(p["variant"]))


def _within(times: dict[Plan, float]) -> list[Plan]:
    best = min(times.values())
    return [p for p, t in times.items() if t <= best * (1 + REFINE_WITHIN)]


def entry_plan(entry: Entry | None) -> Plan | None:
    """The plan an entry names, or None for no entry or one this version cannot read."""
    try:
        return None if entry is None else plan_of(entry)
    except (KeyError, TypeError, ValueError):
        return None


def _usable(entry: Entry | None, plans: Sequence[Plan]) -> Entry | None:
    """The entry if it names one of `plans` (an unreadable entry, or one whose plan is no longer a
    candidate, is as good as none)."""
    return entry if entry_plan(entry) in plans else None
