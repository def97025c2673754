"""Damaged bundles, systematically: bit flips, truncations and swapped parts of a real bundle.

Every case must end in a `BundleError`/`FormatError` (naming the tensor when the damage is in its
data). The one byte range where a flip may pass is the name of the metadata checksum's own key: it
then becomes an unknown key, the file reads as one written before the checksum existed, and every
entry and tensor must read back exactly as written.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

import pytest

from unweight_jax.bundle import (
    KEY_CONFIG,
    KEY_METADATA_CRC,
    KEY_REASONS,
    KEY_SOURCE,
    KEY_TENSORS,
    BundleReader,
    BundleWriter,
    StoredArray,
    read_safetensors_header,
)
from unweight_jax.compress import compress_checkpoint
from unweight_jax.format import FormatError

STORIES = Path(__file__).resolve().parents[1] / "unweight_jax" / "data" / "stories260K.bin"
# Raw tensors of two sizes and compressed ones of three shapes, several alike (for the swaps).
KEPT = (
    "model.embed_tokens.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.1.input_layernorm.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.2.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
)
SEED = 11


@dataclasses.dataclass(frozen=True)
class Pristine:
    path: Path
    data: bytes
    header_end: int  # where the data region starts
    arrays: dict[str, StoredArray]  # stored array name -> its byte range
    owners: dict[str, str]  # stored array name -> the tensor it belongs to
    metadata: dict[str, str]  # the reader's view of __metadata__
    infos: dict[str, object]  # tensor -> its TensorInfo, less its file
    bits: dict[str, bytes]  # tensor -> its decoded bytes
    entries: dict[str, tuple[range, range]]  # __metadata__ key -> byte ranges of its key and value, quotes included


def _metadata_entries(data: bytes, header_end: int) -> dict[str, tuple[range, range]]:
    """Where each `__metadata__` key and value lies in the file; the writer's JSON is ASCII and compact."""
    text = data[8:header_end].decode("ascii")
    opening = '"__metadata__":{'
    position = text.index(opening) + len(opening)
    entries = {}
    while text[position] == '"':
        key, key_end = json.decoder.scanstring(text, position + 1)
        assert text[key_end] == ":" and text[key_end + 1] == '"'
        _, value_end = json.decoder.scanstring(text, key_end + 2)
        entries[key] = (range(8 + position, 8 + key_end), range(8 + key_end + 1, 8 + value_end))
        position = value_end + (text[value_end] == ",")
    assert text[position] == "}"
    return entries


def _checked_infos(reader: BundleReader) -> dict[str, object]:
    return {n: dataclasses.replace(reader.info(n), file=Path()) for n in reader.names}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    """A bundle of a few stories260K tensors, with the config, source and reasons the compressor writes."""
    directory = tmp_path_factory.mktemp("corruption")
    full = directory / "full.unw.safetensors"
    compress_checkpoint(STORIES, full, cast_to_bf16=True, progress=False)
    source = BundleReader(full)
    path = directory / "few.unw.safetensors"
    metadata = {key: source.metadata[key] for key in (KEY_CONFIG, KEY_SOURCE)}
    with BundleWriter(path, metadata=metadata) as writer:
        for name in KEPT:
            writer.add(name, source.read(name), reason=source.info(name).reason)
    reader = BundleReader(path)
    header = read_safetensors_header(path)
    header_end = next(iter(header.arrays.values())).begin
    owners = {stored: n for n in reader.names for stored in reader.info(n).stored_names().values()}
    entries = _metadata_entries(path.read_bytes(), header_end)
    assert {KEY_CONFIG, KEY_SOURCE, KEY_REASONS, KEY_METADATA_CRC} <= set(entries)
    return Pristine(
        path=path,
        data=path.read_bytes(),
        header_end=header_end,
        arrays=header.arrays,
        owners=owners,
        metadata=reader.metadata,
        infos=_checked_infos(reader),
        bits={n: reader.decode(n).tobytes() for n in reader.names},
        entries=entries,
    )


def _read_all(path: Path) -> tuple[BundleReader, dict[str, bytes]]:
    reader = BundleReader(path)
    return reader, {n: reader.decode(n).tobytes() for n in reader.names}


def _assert_detected(damaged: bytes, path: Path, *, tensor: str | None) -> None:
    """Reading `damaged` fails cleanly, naming `tensor` when given."""
    path.write_bytes(damaged)
    with pytest.raises(FormatError) as failure:  # BundleError is a FormatError
        _read_all(path)
    if tensor is not None:
        assert f"tensor {tensor!r}" in str(failure.value)


def _flip_positions(pristine: Pristine) -> list[int]:
    """Seeded positions over the whole file, plus the first and last byte of every part."""
    rng = random.Random(SEED)
    sampled = rng.sample(range(len(pristine.data)), 300)
    edges = [p for a in pristine.arrays.values() for p in (a.begin, a.end - 1)]
    return sorted(set(sampled + edges + [0, 7, 8, pristine.header_end - 1]))


def _owner(pristine: Pristine, position: int) -> str | None:
    for stored, array in pristine.arrays.items():
        if array.begin <= position < array.end:
            return pristine.owners[stored]
    return None


def test_every_bit_flip_is_detected_or_harmless(pristine: Pristine, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    damaged_path = tmp_path / "flip.unw.safetensors"
    for position in _flip_positions(pristine):
        damaged = bytearray(pristine.data)
        damaged[position] ^= 1 << rng.randrange(8)
        owner = _owner(pristine, position)
        if owner is not None:
            _assert_detected(bytes(damaged), damaged_path, tensor=owner)
            continue
        damaged_path.write_bytes(damaged)
        try:
            reader, bits = _read_all(damaged_path)
        except FormatError:
            continue
        _assert_harmless(pristine, position, reader, bits)


def _assert_harmless(pristine: Pristine, position: int, reader: BundleReader, bits: dict[str, bytes]) -> None:
    """An undetected flip: only in the checksum's key name, and nothing the reader returns changed."""
    assert position in pristine.entries[KEY_METADATA_CRC][0], f"flip at byte {position} went unnoticed"
    assert {k: reader.metadata.get(k) for k in pristine.metadata} == pristine.metadata
    assert _checked_infos(reader) == pristine.infos, f"flip at byte {position} changed a tensor's description"
    assert bits == pristine.bits, f"flip at byte {position} changed a tensor's values"


def test_every_metadata_byte_flip_is_detected(pristine: Pristine, tmp_path: Path) -> None:
    """Every byte of every `__metadata__` entry, key and value, the checksum's own key name aside:
    the free text (config, source, reasons) included, which only the metadata checksum guards. The
    long tensor list, which the structural checks read too, is sampled."""
    rng = random.Random(SEED)
    damaged_path = tmp_path / "meta.unw.safetensors"
    for key, (key_span, value_span) in pristine.entries.items():
        positions = [*key_span, *value_span]
        if key == KEY_TENSORS:
            positions = rng.sample(positions, 300)
        for position in positions:
            damaged = bytearray(pristine.data)
            damaged[position] ^= 1 << rng.randrange(8)
            damaged_path.write_bytes(damaged)
            try:
                reader = BundleReader(damaged_path)
            except FormatError as e:
                if key in (KEY_CONFIG, KEY_SOURCE, KEY_REASONS):  # before, most flips here passed unseen
                    assert re.search("fails its CRC|is not valid JSON", str(e)), (position, str(e))
                continue
            _assert_harmless(pristine, position, reader, {n: reader.decode(n).tobytes() for n in reader.names})


def test_truncation_is_detected(pristine: Pristine, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    damaged_path = tmp_path / "cut.unw.safetensors"
    in_header = range(pristine.header_end + 1)  # every cut up to the first data byte
    in_data = rng.sample(range(pristine.header_end + 1, len(pristine.data)), 100)
    for length in [*in_header, *in_data]:
        with open(damaged_path, "wb") as f:
            f.write(pristine.data[:length])
        with pytest.raises(FormatError, match="truncated|corrupt"):
            BundleReader(damaged_path)


def test_swapped_parts_of_two_tensors_are_detected(pristine: Pristine, tmp_path: Path) -> None:
    """Same-sized parts of different tensors exchanged: each CRC is recorded per tensor, so both fail."""
    by_size: dict[int, list[str]] = {}
    for stored, array in pristine.arrays.items():
        by_size.setdefault(array.end - array.begin, []).append(stored)
    swaps = [
        (a, b)
        for names in by_size.values()
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if pristine.owners[a] != pristine.owners[b]
        and pristine.data[pristine.arrays[a].begin : pristine.arrays[a].end]
        != pristine.data[pristine.arrays[b].begin : pristine.arrays[b].end]
    ]
    assert len(swaps) >= 3, "the bundle should hold several same-sized parts of different tensors"
    for a, b in swaps:
        ra, rb = pristine.arrays[a], pristine.arrays[b]
        damaged = bytearray(pristine.data)
        damaged[ra.begin : ra.end] = pristine.data[rb.begin : rb.end]
        damaged[rb.begin : rb.end] = pristine.data[ra.begin : ra.end]
        path = tmp_path / "swap.unw.safetensors"
        path.write_bytes(damaged)
        with pytest.raises(FormatError) as failure:
            _read_all(path)
        named = {pristine.owners[a], pristine.owners[b]}
        assert any(f"tensor {t!r}" in str(failure.value) for t in named)

