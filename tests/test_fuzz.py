"""Fuzzing the parsers and decoders that read untrusted bytes: every outcome is a clean
`FormatError` (or, through jax, a runtime error carrying the handler's message) or a correct result;
never a crash, a hang or another exception.

Bounded for CI (about a minute in all); for a longer session set UNWEIGHT_FUZZ_EXAMPLES, e.g.
`UNWEIGHT_FUZZ_EXAMPLES=20000 python -m pytest -q tests/test_fuzz.py`.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unweight_jax import codec, reference
from unweight_jax.bundle import KEY_TENSORS, BundleReader, read_safetensors_header, save_bundle
from unweight_jax.format import FormatError, HuffmanParts
from unweight_jax.ops import decode

FUZZ = settings(
    max_examples=int(os.environ.get("UNWEIGHT_FUZZ_EXAMPLES", "300")),
    deadline=timedelta(seconds=5),  # a hang fails the example instead of stalling CI
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)

JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def bf16_tensor(shape: tuple[int, ...], seed: int, spread: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-spread, spread + 1, shape).astype(float))
    return x.astype(ml_dtypes.bfloat16)


# ---------------------------------------------------------------- the bundle's headers


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A valid bundle of one compressed and one raw tensor: (its path, its bytes)."""
    path = tmp_path_factory.mktemp("fuzz") / "t.unw.safetensors"
    x = bf16_tensor((12, 20), 0, 3)
    save_bundle(path, [("w", codec.compress(x, chunk_steps=2)), ("norm", x[0])])
    return path, path.read_bytes()


def read_everything(path: Path) -> None:
    """Open the bundle and decode every tensor; FormatError is the only acceptable failure."""
    try:
        reader = BundleReader(path)
        for name in reader.names:
            reader.decode(name)
    except FormatError:
        pass


def split_header(data: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join_header(header: object, body: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + body


def json_paths(value: object, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside nested dicts and lists, the root's children first."""
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    paths = []
    for key, child in children:
        paths.append(prefix + (key,))
        paths.extend(json_paths(child, prefix + (key,)))
    return paths


@FUZZ
@given(data=st.data())
def test_header_with_a_replaced_json_value(template: tuple[Path, bytes], data: st.DataObject) -> None:
    """Any value of the header, or of the `unweight.tensors` JSON inside it, replaced by any JSON."""
    path, original = template
    header, body = split_header(original)
    tensors = json.loads(header["__metadata__"][KEY_TENSORS])
    target = data.draw(st.sampled_from(["header", "tensors"]))
    tree = header if target == "header" else tensors
    where = data.draw(st.sampled_from(json_paths(tree)))
    parent = tree
    for key in where[:-1]:
        parent = parent[key]
    parent[where[-1]] = data.draw(JSON_VALUES)
    if target == "tensors":
        header["__metadata__"][KEY_TENSORS] = json.dumps(tensors)
    path.write_bytes(join_header(header, body))
    read_everything(path)


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=6),
    length=st.none() | st.integers(0, 2**64 - 1),
    cut=st.none() | st.integers(0, 10**9),
)
def test_header_with_mutated_bytes(
    template: tuple[Path, bytes], edits: list[tuple[int, int]], length: int | None, cut: int | None
) -> None:
    """Random bytes over the header, a random length prefix, a random truncation."""
    path, original = template
    damaged = bytearray(original)
    header_end = 8 + int.from_bytes(original[:8], "little")
    for position, byte in edits:
        damaged[position % header_end] = byte
    if length is not None:
        damaged[:8] = length.to_bytes(8, "little")
    if cut is not None:
        del damaged[cut % (len(damaged) + 1) :]
    path.write_bytes(damaged)
    try:
        read_safetensors_header(path)
    except FormatError:
        pass
    read_everything(path)


@FUZZ
@given(header=st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=5), padding=st.binary(max_size=16))
def test_random_json_header(template: tuple[Path, bytes], header: dict, padding: bytes) -> None:
    path, _ = template
    path.write_bytes(join_header(header, padding))
    read_everything(path)


@pytest.fixture(scope="module")
def sharded_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A bundle of two shards: (its index's path, the index's JSON)."""
    x = bf16_tensor((12, 20), 2, 3)
    path = tmp_path_factory.mktemp("fuzz-sharded") / "s.unw.safetensors"
    index = save_bundle(path, [("w", codec.compress(x)), ("norm", x[0])], max_shard_bytes=100)
    return index, json.loads(index.read_text())


@FUZZ
@given(data=st.data())
def test_index_with_a_replaced_json_value(sharded_template: tuple[Path, dict], data: st.DataObject) -> None:
    index, content = sharded_template
    content = json.loads(json.dumps(content))  # a fresh copy to mutate
    where = data.draw(st.sampled_from(json_paths(content)))
    parent = content
    for key in where[:-1]:
        parent = parent[key]
    parent[where[-1]] = data.draw(JSON_VALUES)
    try:
        index.write_text(json.dumps(content))
        read_everything(index)
    finally:
        index.write_text(json.dumps(sharded_template[1]))


# ---------------------------------------------------------------- Huffman parts and the CPU decoders

PART_DTYPES = {"words": np.uint16, "chunks": np.uint32, "table": np.uint8}


@st.composite
def huffman_parts(draw: st.DrawFn) -> HuffmanParts:
    """Parts of a small random tensor, then none to a few mutations of their bytes or lengths."""
    rows, cols = draw(st.integers(0, 12)), draw(st.integers(1, 40))
    x = bf16_tensor((rows, cols), draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 40)))
    parts = codec.compress(x, chunk_steps=draw(st.integers(1, 4)))
    arrays = {name: getattr(parts, name).copy() for name in PART_DTYPES}
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(sorted(PART_DTYPES)))
        flat = arrays[name].reshape(-1).view(np.uint8)
        # chunks keeps its length (its shape is checked before anything is read); words and table may change theirs
        resizes = [] if name == "chunks" else ["grow", "shrink"] if flat.size else ["grow"]
        actions = (["set"] if flat.size else []) + resizes
        if not actions:  # the chunk index of an empty tensor: nothing to change
            continue
        action = draw(st.sampled_from(actions))
        if action == "set":
            flat[draw(st.integers(0, flat.size - 1))] = draw(st.integers(0, 255))
        elif name == "words":
            count = draw(st.integers(1, 4))
            extra = np.array(draw(st.lists(st.integers(0, 0xFFFF), min_size=count, max_size=count)), np.uint16)
            arrays[name] = np.concatenate([arrays[name], extra]) if action == "grow" else arrays[name][:-count]
        else:
            row = np.array([draw(st.lists(st.integers(0, 255), min_size=2, max_size=2))], np.uint8)
            arrays[name] = np.concatenate([arrays[name], row]) if action == "grow" else arrays[name][:-1]
    return HuffmanParts(parts.shape, parts.chunk_steps, parts.sm, **arrays)


@FUZZ
@given(parts=huffman_parts())
def test_cpu_decoders_on_mutated_parts(parts: HuffmanParts) -> None:
    """Valid parts decode as the reference does; invalid ones raise FormatError, in every decoder."""
    try:
        codec.validate(parts)
    except FormatError:
        for decoder in (codec.decompress, codec.decode_exponents, codec.huffman_to_palette):
            with pytest.raises(FormatError):
                decoder(parts)
        return
    try:
        expected = reference.decode(parts)
    except FormatError:
        for decoder in (codec.decompress, codec.decode_exponents, codec.huffman_to_palette):
            with pytest.raises(FormatError, match="corrupt Huffman stream"):
                decoder(parts)
        return
    np.testing.assert_array_equal(codec.decompress(parts).view(np.uint16), expected)
    np.testing.assert_array_equal(codec.decode_exponents(parts).reshape(-1), reference.decode_exponents(parts))
    np.testing.assert_array_equal(codec.from_palette(codec.huffman_to_palette(parts)).view(np.uint16), expected)


# ---------------------------------------------------------------- the CPU FFI ops through jax

OP_SHAPE, OP_CHUNK_STEPS = (16, 48), 3  # fixed, so that jax compiles each op once


@pytest.fixture(scope="module")
def op_parts() -> HuffmanParts:
    return codec.compress(bf16_tensor(OP_SHAPE, 1, 6), chunk_steps=OP_CHUNK_STEPS)


@FUZZ
@given(
    word_edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 0xFFFF)), max_size=4),
    chunk_edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 2**32 - 1)), max_size=2),
    lut_edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 0xFFFF)), max_size=3),
)
def test_ffi_decode_ops_on_mutated_streams(
    op_parts: HuffmanParts,
    word_edits: list[tuple[int, int]],
    chunk_edits: list[tuple[int, int]],
    lut_edits: list[tuple[int, int]],
) -> None:
    """A corrupt stream, chunk index or decoder table fails the computation with a Python
    exception; a stream that decodes gives the bits the C++ codec gives for the same stream."""
    words, chunks = op_parts.words.copy(), op_parts.chunks.copy()
    lut = codec.decoder_table(op_parts).copy()
    for array, edits in ((words, word_edits), (chunks, chunk_edits), (lut, lut_edits)):
        for position, value in edits:
            array[position % array.size] = value
    try:
        got = jax.block_until_ready(decode.huffman_to_bf16(op_parts.sm, words, chunks, lut, chunk_steps=OP_CHUNK_STEPS))
    except (jax.errors.JaxRuntimeError, ValueError) as e:  # jax versions differ in how a handler's error surfaces
        assert "unweight_huffman_to_bf16: " in str(e)
        return
    assert (lut >> 8).max() <= lut.size.bit_length() - 1, "a table entry longer than L was accepted"
    mutated = HuffmanParts(op_parts.shape, OP_CHUNK_STEPS, op_parts.sm, words, chunks, op_parts.table)
    if not lut_edits:  # the table still matches the parts: the C++ codec is the oracle
        np.testing.assert_array_equal(np.asarray(got).view(np.uint16), codec.decompress(mutated).view(np.uint16))
