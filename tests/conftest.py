"""Shared test configuration: GPU tests skip cleanly where there is no CUDA GPU or CUDA build."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests run the static plans unless they turn the autotuner on themselves: no measurement, and no
# write to the user's autotune cache, behind a test's back (subprocesses inherit this too).
os.environ["UNWEIGHT_AUTOTUNE"] = "off"


@functools.cache
def cuda_available() -> bool:
    """True when a CUDA GPU is visible to jax and the CUDA kernels were built."""
    try:
        import unweight_jax._cuda  # noqa: F401
    except ImportError:
        return False
    try:
        return len(jax.devices("gpu")) > 0
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and the CUDA build of unweight_jax")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def full_precision_matmuls(request: pytest.FixtureRequest):
    """Tests not marked gpu compare fp32 results with outside references (transformers, the
    llama2c numpy reference) or with each other, at tolerances the CPU meets; on a GPU, XLA's
    default precision rounds fp32 matmul inputs to TF32 (a relative error near 1e-3), so those
    tests run their matmuls in full fp32 there too. The gpu tests keep XLA's default."""
    if "gpu" in request.keywords:
        yield
        return
    with jax.default_matmul_precision("highest"):
        yield
