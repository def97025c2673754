"""The bundle container (FORMAT.md section 4): round trips, streaming, and every way a file can be bad."""

from __future__ import annotations

import json
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from unweight_jax import codec
from unweight_jax.bundle import (
    HUFFMAN_PARTS,
    KEY_CONFIG,
    KEY_METADATA_CRC,
    BundleError,
    BundleReader,
    BundleWriter,
    load_bundle,
    metadata_crc32,
    read_safetensors_header,
    save_bundle,
)
from unweight_jax.format import HuffmanParts

BF16 = ml_dtypes.bfloat16


def weights(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 0.02).astype(BF16)


def tensors() -> dict[str, HuffmanParts | np.ndarray]:
    """Compressed tensors of several shapes (one of several chunks, one empty) and raw ones of several dtypes."""
    return {
        "model.layers.0.mlp.up_proj.weight": codec.compress(weights((48, 40), 0), chunk_steps=16),  # 4 chunks
        "model.layers.0.mlp.down_proj.weight": codec.compress(weights((40, 48), 1), chunk_steps=16),
        "model.layers.0.self_attn.q_proj.weight": codec.compress(weights((16, 16), 2)),
        "empty.weight": codec.compress(np.zeros((0, 8), BF16)),
        "model.norm.weight": weights((40,), 3),
        "position_ids": np.arange(12, dtype=np.int64).reshape(1, 12),
        "scale": np.array(0.5, np.float32),
        "flag": np.array([True, False, True]),
    }


def assert_same(a: HuffmanParts | np.ndarray, b: HuffmanParts | np.ndarray) -> None:
    if isinstance(a, HuffmanParts):
        assert isinstance(b, HuffmanParts)
        assert (a.shape, a.chunk_steps) == (b.shape, b.chunk_steps)
        for part in HUFFMAN_PARTS:
            assert np.array_equal(getattr(a, part), getattr(b, part)), part
        assert np.array_equal(codec.decompress(a).view(np.uint16), codec.decompress(b).view(np.uint16))
    else:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


def decoded_bits(array: np.ndarray) -> tuple[str, tuple[int, ...], bytes]:
    return array.dtype.name, array.shape, array.tobytes()


def write(path: Path, **kwargs: object) -> Path:
    return save_bundle(path, tensors().items(), **kwargs)


# ---------------------------------------------------------------- round trips


def test_round_trip_single_file(tmp_path: Path) -> None:
    out = write(tmp_path / "m.unw.safetensors", metadata={"unweight.config": json.dumps({"hidden_size": 8})})
    assert out == tmp_path / "m.unw.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.unw.safetensors"]  # no temporary left
    loaded = load_bundle(out)
    assert list(loaded) == list(tensors())
    for name, value in tensors().items():
        assert_same(value, loaded[name])
    reader = BundleReader(out)
    for name, value in tensors().items():
        original = codec.decompress(value) if isinstance(value, HuffmanParts) else value
        assert decoded_bits(reader.decode(name)) == decoded_bits(original)
    assert reader.config == {"hidden_size": 8}
    assert reader.metadata["format"] == "unweight" and reader.metadata["format_version"] == "1"
    assert reader.info("model.norm.weight").encoding == "raw"
    info = reader.info("model.layers.0.mlp.up_proj.weight")
    assert (info.encoding, info.dtype.name, info.shape, info.chunk_steps) == ("huffman", "bfloat16", (48, 40), 16)
    assert [name for name, _ in reader] == reader.names and len(reader) == len(tensors())


def test_progress_is_reported_per_tensor(tmp_path: Path) -> None:
    seen: list[tuple[str, int]] = []
    write(tmp_path / "m.unw.safetensors", progress=lambda name, nbytes: seen.append((name, nbytes)))
    reader = BundleReader(tmp_path / "m.unw.safetensors")
    assert seen == [(name, reader.info(name).stored_bytes) for name in tensors()]


def test_sharded_round_trip(tmp_path: Path) -> None:
    out = write(tmp_path / "m.unw.safetensors", max_shard_bytes=2500)
    assert out == tmp_path / "m.unw.safetensors.index.json"
    shards = sorted(p.name for p in tmp_path.glob("m-*-of-*.unw.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"m-00001-of-{len(shards):05d}.unw.safetensors"
    assert not (tmp_path / "m.unw.safetensors").exists()
    index = json.loads(out.read_text())
    assert index["metadata"]["format"] == "unweight"
    for name in tensors():
        files = {f for stored, f in index["weight_map"].items() if stored == name or stored.startswith(name + ".")}
        assert len(files) == 1, f"{name} is split over {files}"
    for path in (out, tmp_path / "m.unw.safetensors"):  # the index, or the bundle path beside it
        loaded = load_bundle(path)
        for name, value in tensors().items():
            assert_same(value, loaded[name])


def test_empty_bundle(tmp_path: Path) -> None:
    out = save_bundle(tmp_path / "m.unw.safetensors", [])
    assert BundleReader(out).names == []
    with safe_open(out, framework="numpy") as f:
        assert list(f.keys()) == [] and f.metadata()["format"] == "unweight"
        assert f.metadata()[KEY_METADATA_CRC] == "110f209c"  # FORMAT.md's example


def test_a_single_shard_is_a_plain_file(tmp_path: Path) -> None:
    out = write(tmp_path / "m.unw.safetensors", max_shard_bytes=1 << 30)
    assert out == tmp_path / "m.unw.safetensors" and not (tmp_path / "m.unw.safetensors.index.json").exists()


def test_safetensors_library_reads_the_parts(tmp_path: Path) -> None:
    out = write(tmp_path / "m.unw.safetensors")
    parts = tensors()["model.layers.0.mlp.up_proj.weight"]
    with safe_open(out, framework="numpy") as f:
        keys = set(f.keys())
        assert {f"model.layers.0.mlp.up_proj.weight.{p}" for p in HUFFMAN_PARTS} <= keys
        assert "model.layers.0.mlp.up_proj.weight" not in keys and "model.norm.weight" in keys
        assert np.array_equal(f.get_tensor("model.layers.0.mlp.up_proj.weight.words"), parts.words)
        meta = f.metadata()
    entry = json.loads(meta["unweight.tensors"])["model.layers.0.mlp.up_proj.weight"]
    assert (entry["encoding"], entry["max_len"]) == ("huffman", parts.max_len)
    assert set(entry["crc32"]) == set(HUFFMAN_PARTS)


def test_every_array_is_aligned_to_its_element(tmp_path: Path) -> None:
    out = write(tmp_path / "m.unw.safetensors")
    header = read_safetensors_header(out)
    itemsize = {"U8": 1, "BOOL": 1, "U16": 2, "BF16": 2, "U32": 4, "F32": 4, "I64": 8}
    assert all(a.begin % itemsize[a.dtype] == 0 for a in header.arrays.values())


def test_reasons_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "m.unw.safetensors"
    with BundleWriter(path) as writer:
        writer.add("w", codec.compress(weights((4, 4), 0)), reason="compressed by rule 'w'")
        writer.add("n", weights((4,), 1))
    reader = BundleReader(path)
    assert reader.info("w").reason == "compressed by rule 'w'" and reader.info("n").reason is None


def test_writing_streams(tmp_path: Path) -> None:
    """The writer holds one tensor at a time: peak memory stays near one tensor, not the model."""
    tensor_bytes, count = 1 << 20, 12

    def generate() -> Iterator[tuple[str, np.ndarray]]:
        for i in range(count):
            yield f"t{i}", np.full(tensor_bytes, i, np.uint8)

    tracemalloc.start()
    try:
        save_bundle(tmp_path / "m.unw.safetensors", generate())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * tensor_bytes, f"peak {peak} bytes for {count} tensors of {tensor_bytes}"
    assert BundleReader(tmp_path / "m.unw.safetensors").info("t11").stored_bytes == tensor_bytes


# ---------------------------------------------------------------- writing refuses


def test_a_failure_while_writing_leaves_nothing(tmp_path: Path) -> None:
    def failing() -> Iterator[tuple[str, np.ndarray]]:
        yield "a", weights((8, 8), 0)
        raise RuntimeError("source went away")

    with pytest.raises(RuntimeError):
        save_bundle(tmp_path / "m.unw.safetensors", failing(), max_shard_bytes=64)
    assert list(tmp_path.iterdir()) == []


def test_existing_bundle_needs_overwrite(tmp_path: Path) -> None:
    sharded = write(tmp_path / "m.unw.safetensors", max_shard_bytes=2500)
    with pytest.raises(FileExistsError, match="overwrite"):
        write(tmp_path / "m.unw.safetensors")
    out = write(tmp_path / "m.unw.safetensors", overwrite=True)  # replaces the sharded one, shards and all
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.unw.safetensors"] and not sharded.exists()
    assert len(load_bundle(out)) == len(tensors())


@pytest.mark.parametrize(
    ("path", "items", "error"),
    [
        ("m.safetensors", [], "must end with '.unw.safetensors'"),
        ("m.unw.safetensors", [("a", np.zeros(2)), ("a", np.zeros(2))], "already in the bundle"),
        ("m.unw.safetensors", [("a.sm", np.zeros(2)), ("a", codec.compress(np.zeros((2, 2), BF16)))], "already in"),
        ("m.unw.safetensors", [("a", [1, 2])], "expected HuffmanParts or a numpy array"),
        ("m.unw.safetensors", [("a", np.zeros(2, np.complex64))], "cannot be stored"),
    ],
)
def test_writer_refuses_bad_input(tmp_path: Path, path: str, items: list, error: str) -> None:
    with pytest.raises((ValueError, TypeError), match=error):
        save_bundle(tmp_path / path, items)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- reading refuses


def rewrite_header(path: Path, edit: Callable[[dict], None], *, resign: bool = True) -> None:
    """Edit a file's safetensors header in place, keeping its data; with `resign`, the metadata
    checksum is recomputed as a hand-editor would, so that only the structural checks can notice."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    edit(header)
    metadata = header.get("__metadata__")
    if resign and isinstance(metadata, dict) and KEY_METADATA_CRC in metadata:
        metadata[KEY_METADATA_CRC] = metadata_crc32(metadata)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + n :])


def edit_tensors(edit: Callable[[dict], None]) -> Callable[[dict], None]:
    """A header edit of the `unweight.tensors` metadata."""

    def apply(header: dict) -> None:
        entries = json.loads(header["__metadata__"]["unweight.tensors"])
        edit(entries)
        header["__metadata__"]["unweight.tensors"] = json.dumps(entries)

    return apply


def set_entry(name: str, **fields: object) -> Callable[[dict], None]:
    """A header edit setting fields of one tensor's `unweight.tensors` entry."""
    return edit_tensors(lambda entries: entries[name].update(fields))


def flip_byte(path: Path, stored: str, offset: int = 0) -> None:
    array = read_safetensors_header(path).arrays[stored]
    data = bytearray(path.read_bytes())
    data[array.begin + offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return write(tmp_path / "m.unw.safetensors")


UP = "model.layers.0.mlp.up_proj.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        BundleReader(tmp_path / "absent.unw.safetensors")
    with pytest.raises(BundleError, match="is a directory"):
        BundleReader(tmp_path)


@pytest.mark.parametrize("cut", [0, 5, 8, 40, "mid-data", "last byte"])
def test_truncated(bundle: Path, cut: int | str) -> None:
    data = bundle.read_bytes()
    size = {"mid-data": len(data) - 300, "last byte": len(data) - 1}.get(cut, cut)
    bundle.write_bytes(data[:size])
    with pytest.raises(BundleError, match=rf"{bundle}: truncated"):
        BundleReader(bundle)


def test_bad_header_json(bundle: Path) -> None:
    data = bytearray(bundle.read_bytes())
    data[8] = ord("[")  # the header's opening brace
    data[9] = 0xFF
    bundle.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="not valid JSON"):
        BundleReader(bundle)


@pytest.mark.parametrize(
    ("metadata", "error"),
    [
        ({"format_version": "2"}, "format_version '2' is not supported"),
        ({"format": "gguf"}, "not an unweight bundle"),
        ({"unweight.tensors": "{not json"}, "'unweight.tensors' is not valid JSON"),
    ],
)
def test_unknown_format_or_version(bundle: Path, metadata: dict, error: str) -> None:
    rewrite_header(bundle, lambda h: h["__metadata__"].update(metadata))
    with pytest.raises(BundleError, match=error):
        BundleReader(bundle)


def test_metadata_checksum_covers_every_entry(tmp_path: Path) -> None:
    config = json.dumps({"hidden_size": 8, "name": "caf\u00e9"})
    out = write(tmp_path / "m.unw.safetensors", metadata={KEY_CONFIG: config, "note": "kept"})
    metadata = read_safetensors_header(out).metadata
    assert metadata[KEY_METADATA_CRC] == metadata_crc32(metadata)
    assert KEY_METADATA_CRC not in BundleReader(out).metadata  # a detail of the container
    for key in sorted(set(metadata) - {KEY_METADATA_CRC, "format", "format_version"}):  # those: checked first
        rewrite_header(out, lambda h: h["__metadata__"].update({key: h["__metadata__"][key] + " "}), resign=False)
        with pytest.raises(BundleError, match=rf"{out}: corrupt: __metadata__ fails its CRC '{KEY_METADATA_CRC}' "
                           rf"\(stored \w+, computed \w+\) over the entries format, format_version, note, "
                           r"unweight.config, unweight.tensors: the metadata changed after writing"):
            BundleReader(out)
        write(out, metadata={KEY_CONFIG: config, "note": "kept"}, overwrite=True)


def test_metadata_checksum_serialization() -> None:
    """FORMAT.md's "Metadata checksum", spelled out: sorted by key, u64 lengths, UTF-8 (a lone surrogate included)."""
    metadata = {"format": "unweight", "a\u00e9": "\ud800", KEY_METADATA_CRC: "ignored"}
    serialized = b"".join(
        len(s).to_bytes(8, "little") + s for s in (b"a\xc3\xa9", b"\xed\xa0\x80", b"format", b"unweight")
    )
    assert metadata_crc32(metadata) == f"{zlib.crc32(serialized):08x}"


@pytest.mark.parametrize("value", ["", "ABCDEF01", "0123456", 7])
def test_malformed_metadata_checksum(bundle: Path, value: object) -> None:
    rewrite_header(bundle, lambda h: h["__metadata__"].update({KEY_METADATA_CRC: value}), resign=False)
    error = "not a string-to-string map" if not isinstance(value, str) else "must be 8 lower-case hex digits"
    with pytest.raises(BundleError, match=error):
        BundleReader(bundle)


def test_writer_computes_the_metadata_checksum_itself(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"metadata key '{KEY_METADATA_CRC}': keys must be strings other than"):
        BundleWriter(tmp_path / "m.unw.safetensors", metadata={KEY_METADATA_CRC: "00000000"})


def test_bundle_without_metadata_checksum_loads(bundle: Path) -> None:
    """Bundles written before the checksum existed have none: they load, their metadata unchecked."""
    def drop_checksum_and_edit(header: dict) -> None:
        del header["__metadata__"][KEY_METADATA_CRC]
        header["__metadata__"][KEY_CONFIG] = "{}"

    rewrite_header(bundle, drop_checksum_and_edit)
    assert BundleReader(bundle).config == {} and len(load_bundle(bundle)) == len(tensors())


def test_every_shard_carries_its_metadata_checksum(tmp_path: Path) -> None:
    index = write(tmp_path / "m.unw.safetensors", max_shard_bytes=2500)
    shards = sorted(tmp_path.glob("m-*-of-*.unw.safetensors"))
    for shard in shards:
        metadata = read_safetensors_header(shard).metadata
        assert metadata[KEY_METADATA_CRC] == metadata_crc32(metadata)
    rewrite_header(shards[-1], lambda h: h["__metadata__"].update(extra="x"), resign=False)
    with pytest.raises(BundleError, match=rf"{shards[-1]}: corrupt: __metadata__ fails its CRC"):
        BundleReader(index)


@pytest.mark.parametrize("part", [*HUFFMAN_PARTS, "raw"])
@pytest.mark.parametrize("where", ["first", "last"])
def test_flipped_byte_in_a_part(bundle: Path, part: str, where: str) -> None:
    name, stored = ("model.norm.weight", "model.norm.weight") if part == "raw" else (UP, f"{UP}.{part}")
    array = read_safetensors_header(bundle).arrays[stored]
    flip_byte(bundle, stored, 0 if where == "first" else array.end - array.begin - 1)
    reader = BundleReader(bundle)  # the header is intact: opening works, reading the tensor does not
    with pytest.raises(BundleError, match=rf"{bundle}: tensor '{name}': part '{stored}' fails its CRC"):
        reader.read(name)
    reader.read(DOWN)  # the others are still readable


def test_swapped_tensor_data(bundle: Path) -> None:
    """Two same-shaped tensors whose bytes trade places: both fail their CRC."""
    names = [f"{UP}.sm", f"{DOWN}.sm"]
    header = read_safetensors_header(bundle)
    a, b = (header.arrays[n] for n in names)
    assert a.end - a.begin == b.end - b.begin
    data = bytearray(bundle.read_bytes())
    data[a.begin : a.end], data[b.begin : b.end] = data[b.begin : b.end], data[a.begin : a.end]
    bundle.write_bytes(bytes(data))
    reader = BundleReader(bundle)
    for name in (UP, DOWN):
        with pytest.raises(BundleError, match=f"tensor '{name}'.*fails its CRC"):
            reader.read(name)


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (set_entry(UP, shape=[40, 48]), rf"'{UP}.sm' is U8 \[48, 40\], the metadata implies U8 \[40, 48\]"),
        (set_entry(UP, chunk_steps=512), rf"'{UP}.chunks' is U32 \[4\].*implies U32 \[1\]"),
        (set_entry(UP, encoding="zstd"), "unknown encoding 'zstd'"),
        (set_entry(UP, dtype="float32"), "a huffman tensor must be bfloat16"),
        (edit_tensors(lambda t: t[UP]["crc32"].pop("words")), "crc32 must list exactly the parts"),
        (set_entry("model.norm.weight", dtype="float16"), r"is BF16 \[40\], the metadata implies F16"),
        (edit_tensors(lambda t: t.pop("position_ids")), "array 'position_ids' belongs to no tensor"),
        (lambda h: h.update({f"{UP}.tablX": h.pop(f"{UP}.table")}), rf"part '{UP}.table' is missing"),
        (lambda h: h[f"{UP}.table"].update(dtype="I8"), rf"part '{UP}.table' is I8"),
        (lambda h: h[f"{UP}.words"].update(shape=[1, h[f"{UP}.words"]["shape"][0]]), rf"part '{UP}.words' is U16 \[1,"),
        (lambda h: h[f"{UP}.sm"].update(data_offsets=[0, 8]), "data_offsets .* span 8 bytes"),
    ],
)
def test_metadata_contradicting_the_tensors(bundle: Path, edit: Callable[[dict], None], error: str) -> None:
    rewrite_header(bundle, edit)
    with pytest.raises(BundleError, match=error):
        BundleReader(bundle)


def test_max_len_contradicting_the_table(bundle: Path) -> None:
    rewrite_header(bundle, edit_tensors(lambda t: t[UP].update(max_len=t[UP]["max_len"] - 1)))
    with pytest.raises(BundleError, match=f"tensor '{UP}': metadata max_len .* contradicts"):
        BundleReader(bundle).read(UP)


def corrupt_with_valid_crc(path: Path, stored: str, mutate: Callable[[np.ndarray], None]) -> None:
    """Change a part's data and its CRC to match: only the structure checks can notice."""
    array = read_safetensors_header(path).arrays[stored]
    data = bytearray(path.read_bytes())
    dtype = {"U8": np.uint8, "U16": np.uint16, "U32": np.uint32}[array.dtype]
    values = np.frombuffer(bytes(data[array.begin : array.end]), dtype).copy()
    mutate(values)
    data[array.begin : array.end] = values.tobytes()
    path.write_bytes(bytes(data))
    name, part = stored.rsplit(".", 1)
    crc = f"{zlib.crc32(values.tobytes()):08x}"
    rewrite_header(path, edit_tensors(lambda t: t[name]["crc32"].update({part: crc})))


@pytest.mark.parametrize(
    ("part", "mutate"),
    [
        ("table", lambda v: v.__setitem__(1, 13)),  # a code length beyond 12
        ("table", lambda v: v.__setitem__(slice(0, 2), v[2:4])),  # a repeated symbol
        ("chunks", lambda v: v.__setitem__(1, v[2] + 1)),  # offsets that decrease
        ("chunks", lambda v: v.__setitem__(3, 1 << 30)),  # past the end of the words
    ],
)
def test_invalid_table_or_chunks(bundle: Path, part: str, mutate: Callable[[np.ndarray], None]) -> None:
    corrupt_with_valid_crc(bundle, f"{UP}.{part}", mutate)
    reader = BundleReader(bundle)
    with pytest.raises(BundleError, match=rf"{bundle}: tensor '{UP}': "):
        reader.read(UP)


def test_broken_index(tmp_path: Path) -> None:
    index = write(tmp_path / "m.unw.safetensors", max_shard_bytes=2500)
    content = json.loads(index.read_text())

    def expect(change: Callable[[dict], None], error: str) -> None:
        broken = json.loads(json.dumps(content))
        change(broken)
        index.write_text(json.dumps(broken))
        with pytest.raises(BundleError, match=error):
            BundleReader(index)

    first = next(iter(content["weight_map"]))
    expect(lambda c: c["metadata"].update(format_version="9"), "format_version '9' is not supported")
    expect(lambda c: c["weight_map"].update({first: "../elsewhere.unw.safetensors"}), "not a bundle file beside")
    expect(lambda c: c["weight_map"].update({"ghost.sm": c["weight_map"][first]}), "lists 'ghost.sm', which its file")
    expect(lambda c: c["metadata"].update(total_size=1), "total_size 1 contradicts")
    last_shard = sorted(tmp_path.glob("m-*.unw.safetensors"))[-1]
    expect(lambda c: c["weight_map"].update({first: last_shard.name}), f"weight_map puts '{first}' in")
    index.write_text("{")
    with pytest.raises(BundleError, match="index is not valid JSON"):
        BundleReader(index)
    index.write_text(json.dumps(content))
    last_shard.unlink()
    with pytest.raises(BundleError, match=f"shard {last_shard.name} is missing"):
        BundleReader(index)
