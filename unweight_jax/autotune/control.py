"""What the user can tell the tuner: a mode, and plans, pipelines or variants to force.

| setting | API | environment |
|---|---|---|
| mode: "on", "cache-only" or "off" | `set_mode(mode)` | `UNWEIGHT_AUTOTUNE` |
| a plan for every matmul | `forced(plan=Plan(...))` | - |
| a pipeline, where the weight's form allows it | `forced(pipeline="exponent")` | `UNWEIGHT_PIPELINE` |
| a kernel variant, where its family runs the case | `forced(variant="gemv:mma_acc4")` | `UNWEIGHT_VARIANT` |

Modes: "on" measures what the cache lacks; "cache-only" uses cached choices, else the static one,
and never measures; "off" uses the static choice and no cache. `set_mode` overrides the
environment for the process (`set_mode(None)` hands it back); `forced` overrides it for the
block, in the current thread or task. Anything forced bypasses tuning: the static rules fill in
what the force leaves open.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from dataclasses import dataclass

from ..pipelines import PIPELINE_ENV, PIPELINES, Plan
from .candidates import FAMILIES

MODES = ("on", "cache-only", "off")
MODE_ENV = "UNWEIGHT_AUTOTUNE"
VARIANT_ENV = "UNWEIGHT_VARIANT"

_mode_override: str | None = None


@dataclass(frozen=True)
class Force:
    plan: Plan | None = None
    pipeline: str | None = None
    variant: tuple[str, str] | None = None  # (family, variant name)

    def __bool__(self) -> bool:
        return any((self.plan, self.pipeline, self.variant))


_forced: contextvars.ContextVar[Force | None] = contextvars.ContextVar("unweight_jax_autotune_force", default=None)


def set_mode(mode: str | None) -> None:
    """Set the tuning mode for this process ("on", "cache-only", "off"); None: back to $UNWEIGHT_AUTOTUNE."""
    global _mode_override
    _mode_override = None if mode is None else _check_mode(mode, "set_mode")


def mode() -> str:
    """The tuning mode in force: set_mode's, else $UNWEIGHT_AUTOTUNE's, else "on"."""
    if _mode_override is not None:
        return _mode_override
    return _check_mode(os.environ.get(MODE_ENV) or "on", MODE_ENV)


@contextlib.contextmanager
def forced(plan: Plan | None = None, *, pipeline: str | None = None, variant: str | None = None) -> Iterator[None]:
    """Within the block, matmuls without a plan of their own run `plan`, or `pipeline` (where the
    weight's form allows it) and/or the kernel `variant` ("family:name", where that family runs
    the case), instead of a tuned choice."""
    force = Force(
        plan, _check_pipeline(pipeline, "forced(pipeline=...)"), _parse_variant(variant, "forced(variant=...)")
    )
    if not force:
        raise ValueError("forced() needs a plan, a pipeline or a variant")
    token = _forced.set(force)
    try:
        yield
    finally:
        _forced.reset(token)


def current_force() -> Force:
    """The force in effect: the innermost `forced` block's, else the environment's."""
    force = _forced.get()
    if force is not None:
        return force
    return Force(
        pipeline=_check_pipeline(os.environ.get(PIPELINE_ENV) or None, PIPELINE_ENV),
        variant=_parse_variant(os.environ.get(VARIANT_ENV) or None, VARIANT_ENV),
    )


def _check_mode(mode: str, source: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{source}={mode!r} is not one of {MODES}")
    return mode


def _check_pipeline(pipeline: str | None, source: str) -> str | None:
    if pipeline is not None and pipeline not in PIPELINES:
        raise ValueError(f"{source}={pipeline!r} is not one of {PIPELINES}")
    return pipeline


def _parse_variant(text: str | None, source: str) -> tuple[str, str] | None:
    """"gemv:mma_acc4" -> ("gemv", "mma_acc4"), checked against the families' tables."""
    if text is None:
        return None
    family, _, name = text.partition(":")
    if family not in FAMILIES or name not in FAMILIES[family].VARIANTS:
        known = ", ".join(f"{f}:{n}" for f, m in FAMILIES.items() for n in m.VARIANTS)
        raise ValueError(f"{source}={text!r} is not a kernel variant; known: {known}")
    return family, name
