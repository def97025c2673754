"""Wall-clock timing of jitted calls (DESIGN.md section 6): a compiling warm-up, then the median of
several calls, each running many steps, so that dispatch (~130 us a call) stays out of the figure."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def wall_ms(run: Callable, *args: object, reps: int) -> float:
    """Median wall time of run(*args) in ms over `reps` calls, after a compiling warm-up call."""
    jax.block_until_ready(run(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(run(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3
