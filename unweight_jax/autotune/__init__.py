"""The autotuner: the pipeline and kernel variant of each compressed matmul, chosen by measuring.

`pipelines.matmul` without a plan asks `choose(weight, batch, x_dtype)` at trace time, when the
batch is static: a forced plan, else the cached choice for this machine and case, else (tuning
"on") the candidates are timed on the device there and then and the fastest is cached, so
`jax.jit` of a model tunes each distinct (shape, form, batch bucket) once, ever. docs/AUTOTUNE.md
describes the key, the candidates, the measurement, the cache and the controls.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..format import as_matrix_shape
from ..weights import CompressedWeight
from .cache import CACHE_ENV, open_cache, resolve
from .candidates import FORM_PIPELINES, OWN_PIPELINE, label, static_plan
from .control import MODE_ENV, MODES, VARIANT_ENV, forced, mode, set_mode
from .key import Case, batch_bucket, form_of, key_text, this_machine
from .tuner import candidates_for, choose, choose_case, entry_plan, forget, plan_of, tune_case

__all__ = [
    "CACHE_ENV",
    "MODES",
    "MODE_ENV",
    "VARIANT_ENV",
    "TuneRow",
    "batch_bucket",
    "cache_path",
    "cached_plan",
    "planned",
    "choose",
    "choose_case",
    "forced",
    "forget",
    "mode",
    "set_mode",
    "tune",
]

Weights = CompressedWeight | Mapping[str, CompressedWeight] | Iterable[CompressedWeight] | str | os.PathLike[str]


@dataclass(frozen=True)
class TuneRow:
    """One (matrix, batch) cell of a tuning table."""

    matrix: str  # "rows x cols"
    form: str
    batch: int
    plan: str  # the chosen plan, as `candidates.label` writes it
    plan_ms: float
    decode_ms: float  # the form's own pipeline as decode + XLA's dot
    candidates: int  # plans timed
    tensors: tuple[str, ...]  # the tensors of this shape and form

    @property
    def speedup(self) -> float:
        return self.decode_ms / self.plan_ms


def tune(
    weights_or_bundle: Weights,
    batches: Sequence[int],
    progress: bool = True,
    *,
    cache: str | os.PathLike[str] | None = None,
    x_dtype: object = "bfloat16",
    form: str | None = None,
    retune: bool = False,
) -> list[TuneRow]:
    """Tune every distinct (shape, form) of `weights_or_bundle` at every batch of `batches`, ahead
    of time, into the cache; cells already cached are read, not measured, unless `retune`.

    `weights_or_bundle` is a compressed weight, a mapping or iterable of them, or the path of a
    bundle, whose projections (unweight_jax.policy.PROJECTIONS) are tuned in the resident `form`
    the model would load them in (default: unweight_jax.loading.default_form())."""
    cases = _distinct_cases(weights_or_bundle, form)
    store = open_cache(cache)
    cells = [(case_key, names, batch) for case_key, names in cases.items() for batch in batches]
    rows = []
    for (n_rows, n_cols, case_form, chunk_steps), names, batch in tqdm(
        cells, desc="tuning", unit="cell", disable=not progress
    ):
        case = Case(n_rows, n_cols, case_form, _dtype_name(x_dtype), batch_bucket(batch), chunk_steps)
        plans = candidates_for(FORM_PIPELINES[case_form], case)
        entry = tune_case(store, case, plans, retune=retune)
        times = entry["times_ms"]
        chosen = label(plan_of(entry))
        rows.append(
            TuneRow(
                case.matrix, case_form, case.batch, chosen, times[chosen], times[OWN_PIPELINE[case_form]],
                len(times), tuple(names),
            )
        )
    return rows


def cache_path(cache: str | os.PathLike[str] | None = None) -> Path:
    """The cache file used for `cache` (None: $UNWEIGHT_AUTOTUNE_CACHE, else the default)."""
    return resolve(cache)


def cached_plan(
    shape: tuple[int, ...], form: str, batch: int, x_dtype: object = "bfloat16", *, chunk_steps: int = 0,
    cache: str | os.PathLike[str] | None = None,
) -> str | None:
    """The label of the cached choice for a case on this machine, or None: looks, never measures."""
    rows, cols = as_matrix_shape(tuple(shape))
    chunk_steps = chunk_steps if form in ("huffman", "transcode") else 0
    case = Case(rows, cols, form, _dtype_name(x_dtype), batch_bucket(batch), chunk_steps)
    plan = entry_plan(open_cache(cache).get(key_text(this_machine(), case)))
    return None if plan is None else label(plan)


def planned(
    bundle: str | os.PathLike[str], batches: Sequence[int], *, form: str | None = None, x_dtype: object = "bfloat16",
    cache: str | os.PathLike[str] | None = None,
) -> list[tuple[str, tuple[int, int], str, dict[int, str]]]:
    """(tensor, shape, form, {batch: plan}) for each projection of a bundle: the cached plan, or
    "untuned (static: <plan>)" where nothing is cached. Looks only; never measures."""
    out = []
    for name, (rows, cols, case_form, chunk_steps) in _bundle_cases(bundle, form):
        plans = {}
        for batch in batches:
            cached = cached_plan((rows, cols), case_form, batch, x_dtype, chunk_steps=chunk_steps, cache=cache)
            if cached is None:
                static = static_plan(OWN_PIPELINE[case_form], rows, cols, batch, x_dtype)
                cached = f"untuned (static: {label(static)})"
            plans[batch] = cached
        out.append((name, (rows, cols), case_form, plans))
    return out


CaseKey = tuple[int, int, str, int]  # rows, cols, form, chunk_steps


def _distinct_cases(weights: Weights, form: str | None) -> dict[CaseKey, list[str]]:
    """(rows, cols, form, chunk_steps) -> tensor names, in first-seen order."""
    cases: dict[CaseKey, list[str]] = {}
    if isinstance(weights, (str, os.PathLike)):
        for name, key in _bundle_cases(weights, form):
            cases.setdefault(key, []).append(name)
        return cases
    if isinstance(weights, CompressedWeight):
        weights = [weights]
    items = weights.items() if isinstance(weights, Mapping) else ((f"#{i}", w) for i, w in enumerate(weights))
    for name, w in items:
        case = Case.of(w, 1, "bfloat16")
        cases.setdefault((case.rows, case.cols, form_of(w), case.chunk_steps), []).append(name)
    return cases


def _bundle_cases(path: str | os.PathLike[str], form: str | None) -> list[tuple[str, CaseKey]]:
    from ..bundle import BundleReader
    from ..loading import default_form
    from ..policy import PROJECTIONS

    form = form or default_form()
    if form not in FORM_PIPELINES:
        raise ValueError(f"unknown resident form {form!r}; expected one of {tuple(FORM_PIPELINES)}")
    reader = BundleReader(path)
    found = []
    for name in reader.names:
        info = reader.info(name)
        if info.encoding == "huffman" and len(info.shape) == 2 and re.fullmatch(PROJECTIONS, name):
            chunk_steps = info.chunk_steps if form in ("huffman", "transcode") else 0
            found.append((name, (info.shape[0], info.shape[1], form, chunk_steps)))
    if not found:
        raise ValueError(f"{path}: no compressed projection weight to tune (names matching {PROJECTIONS})")
    return found


def _dtype_name(x_dtype: object) -> str:
    return np.dtype(x_dtype).name
