"""The bundle: compressed and raw tensors in safetensors files (docs/FORMAT.md section 4).

Writing streams: `BundleWriter.add` appends one tensor's bytes to staging files and forgets the
tensor, so a model of any size is written holding one tensor at a time. safetensors puts the
header (which lists every tensor) before the data, so each file's data is staged in anonymous
temporary files, one per element size, and copied behind the header when the file is complete;
ordering the data by element size keeps every array aligned to its element in the file, as the
safetensors library does. Complete files are renamed into place at the end, the index last.

Reading (`BundleReader`) parses every header at open, memory-maps the files, and checks each
tensor when it is read: its CRCs, then the Huffman table and chunk index. Every failure is a
`BundleError` naming the file and the tensor. Each file's `__metadata__` carries a CRC of its other
entries (`unweight.metadata_crc32`), verified at open after the structural checks.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import secrets
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import ml_dtypes
import numpy as np

from . import codec
from .format import FORMAT_VERSION, MAX_CODE_LEN, FormatError, HuffmanParts, num_chunks

BUNDLE_SUFFIX = ".unw.safetensors"
INDEX_SUFFIX = BUNDLE_SUFFIX + ".index.json"
FORMAT_NAME = "unweight"

# __metadata__ keys this module writes itself. "unweight.reasons" (an optional key a version-1
# reader may ignore) maps each tensor of the file to why it was, or was not, compressed.
KEY_FORMAT, KEY_VERSION, KEY_TENSORS, KEY_REASONS = "format", "format_version", "unweight.tensors", "unweight.reasons"
KEY_CONFIG, KEY_SOURCE = "unweight.config", "unweight.source"
# The CRC-32 of every other __metadata__ entry (FORMAT.md section 4, "Metadata checksum"); bundles
# written before it existed lack it and load unchecked.
KEY_METADATA_CRC = "unweight.metadata_crc32"
_RESERVED_KEYS = frozenset({KEY_FORMAT, KEY_VERSION, KEY_TENSORS, KEY_REASONS, KEY_METADATA_CRC})

HUFFMAN_PARTS = ("sm", "words", "chunks", "table")

# The safetensors dtype codes, and the numpy dtypes they hold.
_SAFETENSORS_DTYPES = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "F32": np.dtype(np.float32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_SAFETENSORS_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}
_DTYPES_BY_NAME = {dtype.name: dtype for dtype in _SAFETENSORS_DTYPES.values()}
_MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit
_CRC_HEX = re.compile(r"[0-9a-f]{8}")
# What json.loads raises on bad input: ValueError (JSONDecodeError, UnicodeDecodeError, an integer of
# over 4300 digits) and RecursionError (arrays or objects nested too deep).
_JSON_ERRORS = (ValueError, RecursionError)

TensorValue = HuffmanParts | np.ndarray


class BundleError(FormatError):
    """A bundle that cannot be trusted: the message names the file and, where known, the tensor."""


# ---------------------------------------------------------------- safetensors container


@dataclass(frozen=True)
class StoredArray:
    """One array of a safetensors file: dtype code, shape and absolute byte range in the file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    metadata: dict[str, str]
    arrays: dict[str, StoredArray]  # in file order


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse and check a safetensors header: sizes, dtypes, shapes, and contiguous data that fills the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length_bytes = f.read(8)
        if len(length_bytes) < 8:
            raise BundleError(f"{path}: truncated: {size} bytes, too short for a safetensors header")
        header_len = int.from_bytes(length_bytes, "little")
        if header_len > size - 8:
            raise BundleError(f"{path}: truncated: the header claims {header_len} bytes, the file holds {size - 8}")
        if header_len > _MAX_HEADER_BYTES:
            raise BundleError(f"{path}: corrupt: a header of {header_len} bytes exceeds the 100 MiB limit")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except _JSON_ERRORS as e:
        raise BundleError(f"{path}: corrupt: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise BundleError(f"{path}: corrupt: the header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BundleError(f"{path}: corrupt: __metadata__ is not a string-to-string map")

    data_start = 8 + header_len
    arrays = {}
    for name, spec in header.items():
        arrays[name] = _parse_array_spec(path, name, spec, data_start)
    expected = data_start
    for name, array in sorted(arrays.items(), key=lambda item: (item[1].begin, item[1].end)):
        if array.begin != expected:
            raise BundleError(f"{path}: corrupt: array {name!r} starts at data byte {array.begin - data_start}, "
                              f"expected {expected - data_start} (arrays must be contiguous)")
        expected = array.end
    if expected != size:
        state = "truncated" if expected > size else "corrupt"
        raise BundleError(f"{path}: {state}: the header describes {expected - data_start} bytes of data, "
                          f"the file holds {size - data_start}")
    return SafetensorsHeader(metadata, dict(sorted(arrays.items(), key=lambda item: item[1].begin)))


def _parse_array_spec(path: Path, name: str, spec: object, data_start: int) -> StoredArray:
    def fail(problem: str) -> BundleError:
        return BundleError(f"{path}: corrupt: array {name!r}: {problem}")

    if not isinstance(spec, dict):
        raise fail("its header entry is not an object")
    code, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(code, str) or code not in _SAFETENSORS_DTYPES:  # a list or dict is unhashable
        raise fail(f"unknown dtype {code!r}")
    if not _is_int_list(shape) or any(d < 0 for d in shape):
        raise fail(f"bad shape {shape!r}")
    if not _is_int_list(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise fail(f"bad data_offsets {offsets!r}")
    nbytes = int(np.prod(shape, dtype=object)) * _SAFETENSORS_DTYPES[code].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise fail(f"data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, {code} {shape} needs {nbytes}")
    return StoredArray(code, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _is_int_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


class _FileWriter:
    """One safetensors file being written: data staged by element size, the header written last."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._stages: dict[int, IO[bytes]] = {}  # element size -> anonymous temporary file
        self._arrays: dict[str, tuple[str, tuple[int, ...], int, int, int]] = {}  # code, shape, size, begin, end
        self.nbytes = 0

    def add(self, name: str, array: np.ndarray) -> str:
        """Stage one array; returns the CRC-32 of its bytes as 8 hex digits."""
        code = _SAFETENSORS_CODES.get(array.dtype)
        if code is None:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} cannot be stored in safetensors")
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        itemsize = array.dtype.itemsize
        if itemsize not in self._stages:
            self._stages[itemsize] = tempfile.TemporaryFile(dir=self._directory)
        stage = self._stages[itemsize]
        begin = stage.tell()
        stage.write(data)
        self._arrays[name] = (code, tuple(array.shape), itemsize, begin, begin + data.size)
        self.nbytes += data.size
        return f"{zlib.crc32(data):08x}"

    def finish(self, metadata: Mapping[str, str], final: Path) -> Path:
        """Write the complete file to a temporary name beside `final`; returns that name."""
        sizes = sorted(self._stages, reverse=True)  # largest elements first: every array stays aligned
        stage_start, offset = {}, 0
        for itemsize in sizes:
            stage_start[itemsize] = offset
            offset += self._stages[itemsize].tell()
        header: dict[str, object] = {"__metadata__": dict(metadata)}
        for name, (code, shape, itemsize, begin, end) in self._arrays.items():
            base = stage_start[itemsize]
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [base + begin, base + end]}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
        fd, tmp = _create_temporary(final)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(len(encoded).to_bytes(8, "little"))
                out.write(encoded)
                out.flush()
                for itemsize in sizes:
                    _append(self._stages[itemsize], out)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            tmp.unlink()
            raise
        finally:
            self.discard()
        return tmp

    def discard(self) -> None:
        for stage in self._stages.values():
            stage.close()
        self._stages.clear()


def _create_temporary(final: Path) -> tuple[int, Path]:
    """A new hidden file beside `final`, with the permissions a plain file gets (unlike mkstemp's 0600)."""
    while True:
        path = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue


def _append(stage: IO[bytes], out: IO[bytes]) -> None:
    """Copy all of `stage` to the end of `out` (both flushed): in the kernel where it can, else through a buffer."""
    stage.flush()
    size = stage.tell()
    start = os.lseek(out.fileno(), 0, os.SEEK_CUR)
    stage.seek(0)
    try:
        copied = 0
        while copied < size:
            step = os.copy_file_range(stage.fileno(), out.fileno(), size - copied)
            if step == 0:
                raise OSError("copy_file_range made no progress")
            copied += step
    except (AttributeError, OSError):  # no copy_file_range (not Linux), or not between these files
        stage.seek(0)
        out.seek(start)
        out.truncate()
        shutil.copyfileobj(stage, out, 1 << 20)
        out.flush()
    out.seek(0, os.SEEK_END)


# ---------------------------------------------------------------- the metadata checksum


def metadata_crc32(metadata: Mapping[str, str]) -> str:
    """The CRC-32 (8 hex digits) of every `__metadata__` entry but the checksum's own (FORMAT.md
    section 4, "Metadata checksum"): entries sorted by key, each as its key and value, each string
    a little-endian u64 byte length then its UTF-8 bytes."""
    serialized = bytearray()
    entries = sorted((_utf8(k), _utf8(v)) for k, v in metadata.items() if k != KEY_METADATA_CRC)
    for key, value in entries:
        for string in (key, value):
            serialized += len(string).to_bytes(8, "little") + string
    return f"{zlib.crc32(serialized):08x}"


def _utf8(text: str) -> bytes:
    # A JSON \u escape can decode to a lone surrogate, which strict UTF-8 cannot encode.
    return text.encode("utf-8", "surrogatepass")


def _check_metadata_crc(file: Path, metadata: Mapping[str, str]) -> None:
    """Refuse a file whose metadata checksum is present and does not match; one without it predates it."""
    stored = metadata.get(KEY_METADATA_CRC)
    if stored is None:
        return
    if not _CRC_HEX.fullmatch(stored):
        raise BundleError(f"{file}: corrupt: __metadata__ {KEY_METADATA_CRC!r} must be 8 lower-case hex digits, "
                          f"found {stored!r}")
    computed = metadata_crc32(metadata)
    if computed != stored:
        covered = ", ".join(sorted(k for k in metadata if k != KEY_METADATA_CRC))
        raise BundleError(f"{file}: corrupt: __metadata__ fails its CRC {KEY_METADATA_CRC!r} (stored {stored}, "
                          f"computed {computed}) over the entries {covered}: the metadata changed after writing")


# ---------------------------------------------------------------- tensor metadata


@dataclass(frozen=True)
class TensorInfo:
    """What the bundle's metadata says about one tensor (FORMAT.md section 4)."""

    name: str
    encoding: str  # "huffman" | "raw"
    dtype: np.dtype
    shape: tuple[int, ...]
    crc32: dict[str, str]  # part suffix ("" for raw) -> 8 hex digits
    file: Path
    stored_bytes: int
    chunk_steps: int | None = None  # huffman only
    max_len: int | None = None  # huffman only
    reason: str | None = None  # why the writer did or did not compress it, when it said

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def stored_names(self) -> dict[str, str]:
        """part suffix -> name of the array in the safetensors file."""
        return _stored_names(self.name, self.encoding)


def _stored_names(name: str, encoding: str) -> dict[str, str]:
    if encoding == "raw":
        return {"": name}
    return {part: f"{name}.{part}" for part in HUFFMAN_PARTS}


def _stored_arrays(value: TensorValue) -> dict[str, np.ndarray]:
    """part suffix -> array, for one tensor about to be written."""
    if isinstance(value, HuffmanParts):
        return {part: getattr(value, part) for part in HUFFMAN_PARTS}
    return {"": value}


def _metadata_entry(value: TensorValue, crcs: dict[str, str]) -> dict[str, object]:
    if isinstance(value, HuffmanParts):
        return {
            "encoding": "huffman",
            "dtype": "bfloat16",
            "shape": list(value.shape),
            "crc32": crcs,
            "chunk_steps": value.chunk_steps,
            "max_len": value.max_len,
        }
    return {"encoding": "raw", "dtype": value.dtype.name, "shape": list(value.shape), "crc32": crcs}


def _parse_entry(
    path: Path, name: str, spec: object, arrays: Mapping[str, StoredArray], reason: str | None
) -> TensorInfo:
    """Check one `unweight.tensors` entry against the arrays the file holds."""

    def fail(problem: str) -> BundleError:
        return BundleError(f"{path}: tensor {name!r}: {problem}")

    if not isinstance(spec, dict):
        raise fail("its metadata entry is not an object")
    encoding, dtype_name, shape, crcs = spec.get("encoding"), spec.get("dtype"), spec.get("shape"), spec.get("crc32")
    if encoding not in ("huffman", "raw"):
        raise fail(f"unknown encoding {encoding!r}")
    if not isinstance(dtype_name, str) or dtype_name not in _DTYPES_BY_NAME:  # a list or dict is unhashable
        raise fail(f"unknown dtype {dtype_name!r}")
    if not _is_int_list(shape) or any(d < 0 for d in shape):
        raise fail(f"bad shape {shape!r} in the metadata")
    shape = tuple(shape)
    dtype = _DTYPES_BY_NAME[dtype_name]
    chunk_steps = max_len = None
    if encoding == "huffman":
        chunk_steps, max_len = spec.get("chunk_steps"), spec.get("max_len")
        if dtype_name != "bfloat16":
            raise fail(f"a huffman tensor must be bfloat16, the metadata says {dtype_name}")
        if not _is_int_list([chunk_steps]) or chunk_steps < 1:
            raise fail(f"bad chunk_steps {chunk_steps!r}")
        if not _is_int_list([max_len]) or not 0 <= max_len <= MAX_CODE_LEN:
            raise fail(f"bad max_len {max_len!r}")
    stored_names = _stored_names(name, encoding)
    if not isinstance(crcs, dict) or set(crcs) != set(stored_names):
        raise fail(f"crc32 must list exactly the parts {sorted(stored_names)}, found {crcs!r}")
    if not all(isinstance(v, str) and _CRC_HEX.fullmatch(v) for v in crcs.values()):
        raise fail(f"crc32 values must be 8 lower-case hex digits, found {crcs!r}")

    n = int(np.prod(shape, dtype=object))
    expected = {  # part -> (dtype code, shape with None for any length)
        "": (_SAFETENSORS_CODES[dtype], shape),
        "sm": ("U8", shape),
        "words": ("U16", (None,)),
        "chunks": ("U32", (num_chunks(n, chunk_steps or 1),)),
        "table": ("U8", (None, 2)),
    }
    for part, stored in stored_names.items():
        array = arrays.get(stored)
        if array is None:
            raise fail(f"part {stored!r} is missing from the file")
        code, want = expected[part]
        fits = len(array.shape) == len(want) and all(w is None or w == d for w, d in zip(want, array.shape))
        if array.dtype != code or not fits:
            wanted = "[" + ", ".join("*" if w is None else str(w) for w in want) + "]"
            raise fail(f"part {stored!r} is {array.dtype} {list(array.shape)}, the metadata implies {code} {wanted}")
    stored_bytes = sum(arrays[stored].end - arrays[stored].begin for stored in stored_names.values())
    return TensorInfo(name, encoding, dtype, shape, dict(crcs), path, stored_bytes, chunk_steps, max_len, reason)


# ---------------------------------------------------------------- writing


def bundle_path(path: str | os.PathLike[str]) -> Path:
    """Check that `path` names a bundle file (`*.unw.safetensors`)."""
    path = Path(path)
    if not path.name.endswith(BUNDLE_SUFFIX) or path.name == BUNDLE_SUFFIX:
        raise ValueError(f"bundle path {str(path)!r} must end with {BUNDLE_SUFFIX!r}, e.g. model{BUNDLE_SUFFIX}")
    return path


def index_path(path: Path) -> Path:
    return path.with_name(path.name[: -len(BUNDLE_SUFFIX)] + INDEX_SUFFIX)


def shard_path(path: Path, k: int, count: int) -> Path:
    stem = path.name[: -len(BUNDLE_SUFFIX)]
    return path.with_name(f"{stem}-{k:05d}-of-{count:05d}{BUNDLE_SUFFIX}")


def existing_bundle_files(path: Path) -> list[Path]:
    """The files that make up a bundle already at `path`: the file, or the index and its shards."""
    files = [p for p in (path, index_path(path)) if p.exists()]
    if index_path(path).is_file():
        try:
            weight_map = json.loads(index_path(path).read_text()).get("weight_map", {})
            files += sorted({path.with_name(Path(f).name) for f in weight_map.values() if isinstance(f, str)})
        except (OSError, AttributeError, *_JSON_ERRORS):
            pass  # an unreadable index: its shards cannot be found, the index itself is still listed
    return [p for p in dict.fromkeys(files) if p.exists()]


class BundleWriter:
    """Streams tensors into a bundle; `close()` renames the complete files into place.

    With `max_shard_bytes`, a new shard starts when the next tensor's parts would take the current
    one past that many data bytes (a tensor larger than that gets a shard of its own); a bundle that
    fits in one shard is a single file. Use it as a context manager: leaving the block by an
    exception discards everything written.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        metadata: Mapping[str, str] | None = None,
        max_shard_bytes: int | None = None,
        overwrite: bool = False,
    ) -> None:
        self.path = bundle_path(path)
        if not self.path.parent.is_dir():
            raise FileNotFoundError(errno.ENOENT, "output directory does not exist", str(self.path.parent))
        metadata = dict(metadata or {})
        for key, value in metadata.items():
            if key in _RESERVED_KEYS or not isinstance(key, str) or not isinstance(value, str):
                raise ValueError(f"metadata key {key!r}: keys must be strings other than {sorted(_RESERVED_KEYS)}, "
                                 "values strings")
        if max_shard_bytes is not None and max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self._previous = existing_bundle_files(self.path)
        if self._previous and not overwrite:
            raise FileExistsError(
                errno.EEXIST, "bundle exists (pass overwrite=True, or --overwrite)", str(self._previous[0])
            )
        self._metadata = {KEY_FORMAT: FORMAT_NAME, KEY_VERSION: str(FORMAT_VERSION), **metadata}
        self._max_shard_bytes = max_shard_bytes
        self._finished: list[Path] = []  # complete shard files under temporary names
        self._stored_names: dict[str, int] = {}  # stored array name -> its file's position in _finished
        self._file: _FileWriter | None = None
        self._tensors: dict[str, dict[str, object]] = {}
        self._reasons: dict[str, str] = {}
        self._names: set[str] = set()
        self._data_bytes = 0  # data bytes of the finished files: the index's total_size
        self._closed = False

    def add(self, name: str, value: TensorValue, *, reason: str | None = None) -> int:
        """Write one tensor (all its parts in one shard); returns the bytes it takes."""
        if self._closed:
            raise ValueError(f"bundle {self.path} is already closed")
        if not isinstance(value, (HuffmanParts, np.ndarray)):
            raise TypeError(f"tensor {name!r}: expected HuffmanParts or a numpy array, got {type(value).__name__}")
        if isinstance(value, HuffmanParts):
            try:
                codec.validate(value)
            except FormatError as e:
                raise FormatError(f"tensor {name!r}: {e}") from None
        arrays = _stored_arrays(value)
        stored = _stored_names(name, "huffman" if isinstance(value, HuffmanParts) else "raw")
        clash = [s for s in stored.values() if s in self._stored_names] + ([name] if name in self._names else [])
        if clash:
            raise ValueError(f"tensor {name!r}: the name {clash[0]!r} is already in the bundle")
        nbytes = sum(a.nbytes for a in arrays.values())
        if self._file is not None and self._max_shard_bytes is not None and (
            self._file.nbytes + nbytes > self._max_shard_bytes
        ):
            self._finish_file()
        if self._file is None:
            self._file = _FileWriter(self.path.parent)
        crcs = {part: self._file.add(stored[part], a) for part, a in arrays.items()}
        self._tensors[name] = _metadata_entry(value, crcs)
        if reason is not None:
            self._reasons[name] = reason
        self._names.add(name)
        self._stored_names.update({s: len(self._finished) for s in stored.values()})
        return nbytes

    def close(self) -> Path:
        """Rename the files into place; returns the path to open: the file, or the index of shards."""
        if self._closed:
            raise ValueError(f"bundle {self.path} is already closed")
        if self._file is not None or not self._finished:  # the open file, or an empty bundle's only file
            self._finish_file()
        self._closed = True
        count = len(self._finished)
        if count == 1:
            written = [self.path]
        else:
            written = [shard_path(self.path, k + 1, count) for k in range(count)]
        for tmp, final in zip(self._finished, written):
            os.replace(tmp, final)
        if count > 1:
            index = {
                "metadata": {KEY_FORMAT: FORMAT_NAME, KEY_VERSION: str(FORMAT_VERSION), "total_size": self._data_bytes},
                "weight_map": {s: written[k].name for s, k in self._stored_names.items()},
            }
            fd, tmp = _create_temporary(index_path(self.path))
            try:
                with os.fdopen(fd, "w") as out:
                    json.dump(index, out, indent=2)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, index_path(self.path))
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            written.append(index_path(self.path))
        for stale in set(self._previous) - set(written):
            stale.unlink(missing_ok=True)
        _fsync_directory(self.path.parent)
        return written[-1] if count > 1 else self.path

    def abort(self) -> None:
        """Discard everything written so far; nothing is left in the output directory."""
        self._closed = True
        if self._file is not None:
            self._file.discard()
        for tmp in self._finished:
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()

    def _finish_file(self) -> None:
        file = self._file or _FileWriter(self.path.parent)
        metadata = {**self._metadata, KEY_TENSORS: json.dumps(self._tensors, separators=(",", ":"))}
        if self._reasons:
            metadata[KEY_REASONS] = json.dumps(self._reasons, separators=(",", ":"))
        metadata[KEY_METADATA_CRC] = metadata_crc32(metadata)
        self._data_bytes += file.nbytes
        self._finished.append(file.finish(metadata, self.path))
        self._file, self._tensors, self._reasons = None, {}, {}


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_bundle(
    path: str | os.PathLike[str],
    tensors: Iterable[tuple[str, TensorValue]],
    *,
    metadata: Mapping[str, str] | None = None,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
    progress: Callable[[str, int], None] | None = None,
) -> Path:
    """Write `(name, HuffmanParts | ndarray)` pairs as they come; returns the path to open.

    `progress(name, stored_bytes)` is called after each tensor is written.
    """
    with BundleWriter(path, metadata=metadata, max_shard_bytes=max_shard_bytes, overwrite=overwrite) as writer:
        for name, value in tensors:
            nbytes = writer.add(name, value)
            if progress is not None:
                progress(name, nbytes)
        return writer.close()


# ---------------------------------------------------------------- reading


class BundleReader:
    """A bundle opened for reading: headers checked at open, each tensor checked when it is read.

    `path` is the bundle file, its index (`*.unw.safetensors.index.json`), or the bundle path of a
    sharded bundle (its index is found beside it).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        if path.is_dir():
            raise BundleError(f"{path}: is a directory; name the {BUNDLE_SUFFIX} file or its index")
        if path.name.endswith(INDEX_SUFFIX) or (not path.exists() and index_path(path).is_file()):
            self.index: Path | None = path if path.name.endswith(INDEX_SUFFIX) else index_path(path)
            files = self._read_index(self.index)
        elif path.exists():
            self.index, files = None, [path]
        else:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
        self.path = path
        self.files = files
        self._infos: dict[str, TensorInfo] = {}
        self._headers: dict[Path, SafetensorsHeader] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        for file in files:
            self._open_file(file)
        if self.index is not None:
            self._check_index()
        first = self._headers[files[0]].metadata
        self.metadata: dict[str, str] = {
            k: v for k, v in first.items() if k not in (KEY_TENSORS, KEY_REASONS, KEY_METADATA_CRC)
        }
        self.config: dict[str, object] | None = self._json_key(first, KEY_CONFIG)
        self.source: dict[str, object] | None = self._json_key(first, KEY_SOURCE)

    # -- catalogue

    @property
    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"bundle {self.path} has no tensor {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __iter__(self) -> Iterator[tuple[str, TensorValue]]:
        for name in self._infos:
            yield name, self.read(name)

    @property
    def file_bytes(self) -> int:
        """Bytes on disk: every file of the bundle, the index included."""
        return sum(p.stat().st_size for p in self.files + ([self.index] if self.index else []))

    # -- reading a tensor

    def read(self, name: str) -> TensorValue:
        """The tensor's parts (or raw array), memory-mapped, after checking its CRCs and structure."""
        info = self.info(name)
        header = self._headers[info.file]
        buffer = self._map(info.file)
        arrays = {}
        for part, stored in info.stored_names().items():
            entry = header.arrays[stored]
            crc = f"{zlib.crc32(memoryview(buffer)[entry.begin : entry.end]):08x}"
            if crc != info.crc32[part]:
                raise BundleError(f"{info.file}: tensor {name!r}: part {stored!r} fails its CRC "
                                  f"(stored {info.crc32[part]}, computed {crc}): the data is corrupt")
            dtype = _SAFETENSORS_DTYPES[entry.dtype]
            count = (entry.end - entry.begin) // dtype.itemsize
            arrays[part] = np.frombuffer(buffer, dtype, count, entry.begin).reshape(entry.shape)
        if info.encoding == "raw":
            return arrays[""]
        parts = HuffmanParts(info.shape, info.chunk_steps, **{p: arrays[p] for p in HUFFMAN_PARTS})
        if parts.max_len != info.max_len:
            raise BundleError(f"{info.file}: tensor {name!r}: metadata max_len {info.max_len} contradicts "
                              f"the table's longest code {parts.max_len}")
        try:
            codec.validate(parts)
        except FormatError as e:
            raise BundleError(f"{info.file}: tensor {name!r}: {e}") from None
        return parts

    def decode(self, name: str) -> np.ndarray:
        """The tensor's values after every check: a compressed tensor is decoded (to bf16), which
        also checks that each chunk's stream ends exactly at its last word."""
        value = self.read(name)
        if not isinstance(value, HuffmanParts):
            return value
        try:
            return codec.decompress(value)
        except FormatError as e:
            raise BundleError(f"{self.info(name).file}: tensor {name!r}: {e}") from None

    # -- opening

    def _open_file(self, file: Path) -> None:
        header = read_safetensors_header(file)
        self._headers[file] = header
        metadata = header.metadata
        if metadata.get(KEY_FORMAT) != FORMAT_NAME:
            raise BundleError(f"{file}: not an unweight bundle (__metadata__ format is {metadata.get(KEY_FORMAT)!r})")
        if metadata.get(KEY_VERSION) != str(FORMAT_VERSION):
            raise BundleError(f"{file}: format_version {metadata.get(KEY_VERSION)!r} is not supported "
                              f"(this reader knows version {FORMAT_VERSION})")
        tensors = self._json_key(metadata, KEY_TENSORS, file)
        reasons = self._json_key(metadata, KEY_REASONS, file) or {}
        if not isinstance(tensors, dict) or not isinstance(reasons, dict):
            raise BundleError(f"{file}: corrupt: {KEY_TENSORS} and {KEY_REASONS} must be JSON objects")
        claimed = set()
        for name, spec in tensors.items():
            if name in self._infos:
                raise BundleError(f"{file}: tensor {name!r} is also in {self._infos[name].file}")
            reason = reasons.get(name)
            info = _parse_entry(file, name, spec, header.arrays, reason if isinstance(reason, str) else None)
            self._infos[name] = info
            claimed.update(info.stored_names().values())
        unclaimed = [a for a in header.arrays if a not in claimed]
        if unclaimed:
            raise BundleError(f"{file}: array {unclaimed[0]!r} belongs to no tensor of the metadata")
        # Last, so that damage the checks above can see is reported by them, naming the tensor.
        _check_metadata_crc(file, metadata)

    def _read_index(self, index: Path) -> list[Path]:
        try:
            content = json.loads(index.read_text())
        except _JSON_ERRORS as e:
            raise BundleError(f"{index}: corrupt: the index is not valid JSON ({e})") from None
        meta = content.get("metadata") if isinstance(content, dict) else None
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(meta, dict) or not isinstance(weight_map, dict):
            raise BundleError(f"{index}: corrupt: the index needs 'metadata' and 'weight_map' objects")
        if meta.get(KEY_FORMAT) != FORMAT_NAME:
            raise BundleError(f"{index}: not an unweight bundle index (format is {meta.get(KEY_FORMAT)!r})")
        if meta.get(KEY_VERSION) != str(FORMAT_VERSION):
            raise BundleError(f"{index}: format_version {meta.get(KEY_VERSION)!r} is not supported "
                              f"(this reader knows version {FORMAT_VERSION})")
        for name in weight_map.values():  # checked before deduplication: a list or dict is unhashable
            if not isinstance(name, str) or Path(name).name != name or not name.endswith(BUNDLE_SUFFIX):
                raise BundleError(f"{index}: corrupt: weight_map names {name!r}, not a bundle file beside the index")
        files = [index.with_name(name) for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not file.is_file():
                raise BundleError(f"{index}: shard {file.name} is missing")
        self._weight_map = weight_map
        self._total_size = meta.get("total_size")
        return files

    def _check_index(self) -> None:
        for file, header in self._headers.items():
            for stored in header.arrays:
                if self._weight_map.get(stored) != file.name:
                    raise BundleError(f"{self.index}: weight_map puts {stored!r} in {self._weight_map.get(stored)!r}, "
                                      f"it is in {file.name}")
        mapped = sum(len(h.arrays) for h in self._headers.values())
        if mapped != len(self._weight_map):
            held = {(f.name, s) for f, h in self._headers.items() for s in h.arrays}
            missing = next(s for s, f in self._weight_map.items() if (f, s) not in held)
            raise BundleError(f"{self.index}: weight_map lists {missing!r}, which its file does not hold")
        data = sum(a.end - a.begin for h in self._headers.values() for a in h.arrays.values())
        if self._total_size != data:
            raise BundleError(
                f"{self.index}: total_size {self._total_size!r} contradicts the shards' {data} data bytes"
            )

    def _map(self, file: Path) -> mmap.mmap:
        if file not in self._maps:
            with open(file, "rb") as f:
                self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[file]

    def _json_key(self, metadata: Mapping[str, str], key: str, file: Path | None = None) -> object:
        if key not in metadata:
            return None
        try:
            return json.loads(metadata[key])
        except _JSON_ERRORS as e:
            where = file or self.files[0]
            raise BundleError(f"{where}: corrupt: __metadata__ {key!r} is not valid JSON ({e})") from None


def load_bundle(path: str | os.PathLike[str]) -> dict[str, TensorValue]:
    """Every tensor of a bundle, checked, memory-mapped: {name: HuffmanParts | ndarray}."""
    reader = BundleReader(path)
    return {name: reader.read(name) for name in reader.names}
