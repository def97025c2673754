"""What a model costs in memory and on disk, measured: device memory actually held (the allocator's
`bytes_in_use` before and after building it), and the size of a real bundle file written with the
C++ codec. Where the backend keeps no memory statistics (the CPU), the held bytes fall back to the
bytes of the model's arrays, and say so."""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import jax
import numpy as np
from flax import nnx

from .. import codec
from ..bundle import KEY_CONFIG, BundleWriter
from ..compress import hf_config
from ..models.llama import Llama
from ..models.loading import hf_name

DEVICE_BYTES = "device bytes_in_use"
ARRAY_BYTES = "array bytes"
BUNDLE_TARGET_SAVING = 30.0  # issue 8: percent smaller than bf16 on disk
WEIGHTS_TARGET_SAVING = 20.0  # issue 8: percent less device memory held by the weights

T = TypeVar("T")


class DeviceMemory:
    """The allocator statistics of some devices, added up; None where a backend keeps none."""

    def __init__(self, devices: Sequence[jax.Device]):
        self.devices = list(devices)

    def _stat(self, key: str) -> int | None:
        stats = [d.memory_stats() for d in self.devices]
        if any(s is None or key not in s for s in stats):
            return None
        return sum(int(s[key]) for s in stats)

    @property
    def method(self) -> str:
        return ARRAY_BYTES if self.in_use() is None else DEVICE_BYTES

    def in_use(self) -> int | None:
        return self._stat("bytes_in_use")

    def limit(self) -> int | None:
        return self._stat("bytes_limit")

    def free_per_device(self) -> int:
        """The smallest room left on any of the devices; on a backend without statistics, the
        host's available memory (where a CPU "device" allocates)."""
        stats = [d.memory_stats() for d in self.devices]
        if all(s is not None and "bytes_limit" in s for s in stats):
            return min(int(s["bytes_limit"]) - int(s["bytes_in_use"]) for s in stats)
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

    def held_by(self, build: Callable[[], T], array_bytes: Callable[[T], int]) -> tuple[T, int]:
        """build() and the device bytes its result holds: the growth of `bytes_in_use` once its
        temporaries are gone, or `array_bytes(result)` where there are no statistics."""
        gc.collect()
        before = self.in_use()
        result = build()
        jax.block_until_ready(jax.tree.leaves(nnx.state(result) if isinstance(result, nnx.Module) else result))
        gc.collect()
        after = self.in_use()
        return result, array_bytes(result) if before is None or after is None else after - before


def resident_bytes(tree: object) -> int:
    """Bytes of every array in `tree` as the devices hold them: each device's shard counted once
    per device, so a replicated array counts once per device that holds it."""
    leaves = jax.tree.leaves(nnx.state(tree) if isinstance(tree, nnx.Module) else tree)
    return sum(int(s.data.nbytes) for a in leaves if isinstance(a, jax.Array) for s in a.addressable_shards)


def write_bundle(model: Llama, path: Path, *, threads: int | None = None) -> int:
    """Writes the bf16 model as a bundle (every matrix Huffman-coded by the C++ codec, norms raw,
    the config in the metadata so that the bundle loads as a model); returns the file's bytes."""
    metadata = {KEY_CONFIG: json.dumps(hf_config(model.config))}
    with BundleWriter(path, metadata=metadata, overwrite=True) as writer:
        for key, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            value = np.asarray(param[...])
            writer.add(hf_name(key), codec.compress(value, threads=threads) if value.ndim == 2 else value)
    return writer.path.stat().st_size


def summary(
    bf16: Llama, ours: Llama, bf16_held: int, ours_held: int, bundle_bytes: int | None, bundle_source: str,
    memory: DeviceMemory,
) -> dict:
    """The footprint object of a bench report: device memory held by each model's weights, and the
    bundle's bytes on disk against the bf16 weights', each beside the target of issue 8."""
    saving = 100 * (1 - ours_held / bf16_held)
    bf16_bytes = sum(int(a.nbytes) for a in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    footprint = {
        "method": memory.method,
        "bf16_weights_bytes": bf16_held,
        "compressed_weights_bytes": ours_held,
        "weights_ratio": round(ours_held / bf16_held, 4),
        "weights_saving_percent": round(saving, 2),
        "weights_target_percent": WEIGHTS_TARGET_SAVING,
        "weights_target_met": saving >= WEIGHTS_TARGET_SAVING,
        "bf16_array_bytes": resident_bytes(bf16),
        "compressed_array_bytes": resident_bytes(ours),
        "bf16_checkpoint_bytes": bf16_bytes,
        "device_limit_bytes": memory.limit(),
        "bundle_bytes": bundle_bytes,
    }
    if bundle_bytes is not None:
        bundle_saving = 100 * (1 - bundle_bytes / bf16_bytes)
        footprint |= {
            "bundle_source": bundle_source,
            "bundle_ratio": round(bundle_bytes / bf16_bytes, 4),
            "bundle_saving_percent": round(bundle_saving, 2),
            "bundle_target_percent": BUNDLE_TARGET_SAVING,
            "bundle_target_met": bundle_saving >= BUNDLE_TARGET_SAVING,
        }
    return footprint
