"""Work placed on a second GPU stream inside a jitted program (issue 12, docs/LAYER_PLAN.md).

`on_stream(fn)` marks one call of `fn` with XLA's stream annotation (`gpu_stream:N`, through
`jax.experimental.compute_on`): XLA's GPU compiler runs it as an async start/done pair on stream N
and owns the synchronisation and the lifetime of its outputs. Other backends ignore the
annotation and run `fn` in line. The XLA of jaxlib 0.11.2 refuses to compile it on the GPU
(`No ExecutionStreamId found for call-start`; docs/LAYER_PLAN.md), so nothing in the library
uses it yet: benchmarks/side_stream.py and tests/test_streams.py watch for that to change.
jax changed `compute_on` from a context manager to a function wrapper (0.10: `compute_on2`,
0.11: `compute_on`); both are accepted.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
from jax.experimental import compute_on as _compute_on_module


def _wrapper_form() -> Callable[..., Any]:
    wrap = getattr(_compute_on_module, "compute_on2", None)
    if wrap is not None:
        return wrap
    wrap = _compute_on_module.compute_on
    if "out_memory_spaces" not in inspect.signature(wrap).parameters:
        raise RuntimeError(
            f"jax {jax.__version__}: jax.experimental.compute_on has no function form (compute_on2 or "
            "compute_on(f, compute_type=..., out_memory_spaces=...)); side-stream decoding needs jax >= 0.10"
        )
    return wrap


def on_stream(fn: Callable[..., Any], stream: int = 1) -> Callable[..., Any]:
    """`fn` (traced once per call site) run on XLA's GPU stream `stream`; its outputs stay in
    device memory. `stream` must be at least 1 (0 is XLA's own compute stream)."""
    if stream < 1:
        raise ValueError(f"stream must be at least 1 (0 is XLA's compute stream), got {stream}")
    return _wrapper_form()(
        jax.jit(fn), compute_type=f"gpu_stream:{stream}", out_memory_spaces=jax.memory.Space.Device
    )
