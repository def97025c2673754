"""Registers the XLA FFI targets of the ops: the CPU handlers of `unweight_jax._codec` always,
the CUDA handlers of `unweight_jax._cuda` when the extension was built with CUDA.

Each op keeps one target name on every platform; XLA picks the handler of the platform it
compiles for, so an op module calls `jax.ffi.ffi_call(name, ...)` and nothing else.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping
from typing import Any

import jax

from .. import _codec


def _register(handlers: Mapping[str, Any], platform: str) -> frozenset[str]:
    for name, capsule in handlers.items():
        jax.ffi.register_ffi_target(name, capsule, platform=platform)
    return frozenset(handlers)


CPU_TARGETS: frozenset[str] = _register(_codec.registrations(), "cpu")

try:
    from .. import _cuda
except ImportError:  # built without nvcc: the CPU handlers serve every op
    CUDA_TARGETS: frozenset[str] = frozenset()
else:
    # Registering does not start a backend (jax queues it for the CUDA platform), so a machine
    # without a GPU imports this module unchanged; the handlers run only on a CUDA device.
    CUDA_TARGETS = _register(_cuda.registrations(), "CUDA")


@functools.cache
def _hopper_gpus() -> bool:
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return False
    # Kernels built for sm_90a run on compute capability 9.0 exactly.
    return bool(gpus) and all(getattr(d, "compute_capability", None) == "9.0" for d in gpus)


def hopper_available(targets: Collection[str]) -> bool:
    """Whether the CUDA handlers `targets` are registered and every GPU is a Hopper (sm_90a) one."""
    return set(targets) <= CUDA_TARGETS and _hopper_gpus()
