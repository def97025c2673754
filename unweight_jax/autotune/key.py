"""The tuning key: everything a measured choice depends on, as one stable string.

A choice holds for one machine (device, driver, the jax and unweight_jax builds that produced
the kernels) and one case (matrix shape, resident form, activation dtype, batch bucket). The key
is plain text so that it is the same in every process and readable in the cache file.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import jax
import jaxlib
import numpy as np

from ..format import as_matrix_shape
from ..weights import CompressedWeight, ExponentWeight, HuffmanWeight, PaletteWeight, TranscodeWeight

# Batches are tuned per power of two: 1, 2, 4, ..., and everything above BUCKET_CAP shares its
# bucket (the kernels' behaviour no longer changes with the batch there).
BUCKET_CAP = 1 << 16

_FORM_OF = {
    PaletteWeight: "palette",
    TranscodeWeight: "transcode",
    HuffmanWeight: "huffman",
    ExponentWeight: "exponent",
}
_COMPILED_MODULES = ("unweight_jax._codec", "unweight_jax._cuda")
_NVIDIA_DRIVER_VERSION = Path("/proc/driver/nvidia/version")


def batch_bucket(batch: int) -> int:
    """The power of two at or above `batch`, at most BUCKET_CAP: the batch a choice is tuned at."""
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    return min(1 << (int(batch) - 1).bit_length(), BUCKET_CAP)


def form_of(w: CompressedWeight) -> str:
    """The resident form of a compressed weight (unweight_jax.format.FORMS)."""
    try:
        return _FORM_OF[type(w)]
    except KeyError:
        raise TypeError(f"not a compressed weight: {type(w).__name__}") from None


@dataclass(frozen=True)
class Case:
    """What is being multiplied: a matrix [rows, cols] in a resident form, by activations of
    `x_dtype` with `batch` rows (a bucket). `chunk_steps` is the Huffman chunk size for the forms
    that decode a Huffman stream (it shapes the decode), 0 for the others."""

    rows: int
    cols: int
    form: str
    x_dtype: str
    batch: int
    chunk_steps: int = 0

    @classmethod
    def of(cls, w: CompressedWeight, batch: int, x_dtype: object) -> Case:
        rows, cols = as_matrix_shape(w.shape)
        huffman = w.huffman if isinstance(w, TranscodeWeight) else w
        chunk_steps = huffman.chunk_steps if isinstance(huffman, HuffmanWeight) else 0
        return cls(rows, cols, form_of(w), np.dtype(x_dtype).name, batch_bucket(batch), chunk_steps)

    @property
    def matrix(self) -> str:
        return f"{self.rows}x{self.cols}"

    @property
    def text(self) -> str:
        chunk = f";chunk={self.chunk_steps}" if self.chunk_steps else ""
        return f"{self.matrix};{self.form}{chunk};x={self.x_dtype};batch={self.batch}"


@dataclass(frozen=True)
class Machine:
    """The device and the software that compiled and runs the kernels."""

    device_kind: str
    platform: str
    driver: str  # NVIDIA kernel driver version, "-" where there is none
    runtime: str  # the backend's platform version (on CUDA it names the CUDA runtime)
    jax: str
    jaxlib: str
    unweight_jax: str
    build: str  # digest of the compiled extension modules: a rebuilt library is another machine

    @property
    def text(self) -> str:
        return (
            f"{self.device_kind};{self.platform};driver={self.driver};runtime={self.runtime};jax={self.jax};"
            f"jaxlib={self.jaxlib};unweight_jax={self.unweight_jax};build={self.build}"
        )


def key_text(machine: Machine, case: Case) -> str:
    """The cache key of `case` on `machine`."""
    return f"{machine.text}|{case.text}"


@functools.cache
def this_machine() -> Machine:
    """The Machine of jax's default device, computed once per process."""
    device = jax.devices()[0]
    return Machine(
        device_kind=device.device_kind,
        platform=device.platform,
        driver=_nvidia_driver(),
        runtime=str(getattr(device.client, "platform_version", "-")).replace("\n", " "),
        jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        unweight_jax=_version(),
        build=build_id(),
    )


@functools.cache
def build_id() -> str:
    """The first 16 hex digits of a BLAKE2b digest over the compiled extension modules' files."""
    digest = hashlib.blake2b(digest_size=8)
    for module in _COMPILED_MODULES:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            continue  # _cuda is absent from a build without nvcc
        digest.update(module.encode())
        digest.update(Path(spec.origin).read_bytes())
    return digest.hexdigest()


def _version() -> str:
    try:
        return importlib.metadata.version("unweight-jax")
    except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path, never installed
        return "source"


def _nvidia_driver() -> str:
    """The NVIDIA kernel module's version from /proc (no subprocess), "-" without one."""
    try:
        first = _NVIDIA_DRIVER_VERSION.read_text().splitlines()[0]
    except (OSError, IndexError):
        return "-"
    # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.95.05  Thu Sep 11 ..."
    words = first.split()
    return next((w for w in words if w[:1].isdigit() and "." in w), first.strip())
