"""Streaming compression of checkpoints and the `unweight compress | inspect | verify` commands."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from unweight_jax import codec
from unweight_jax.bundle import BundleReader, read_safetensors_header, save_bundle
from unweight_jax.cli import main
from unweight_jax.cli.compress import parse_size
from unweight_jax.compress import CheckpointError, compress_checkpoint, entropy_bound_bytes
from unweight_jax.format import HuffmanParts, exponent_entropy_bits
from unweight_jax.models.config import LlamaConfig
from unweight_jax.models.loading import read_llama2c_config
from unweight_jax.policy import CompressionPolicy, Rule

BF16 = ml_dtypes.bfloat16
STORIES = Path(__file__).resolve().parents[1] / "unweight_jax" / "data" / "stories260K.bin"
PROJECTIONS = tuple(f"self_attn.{p}_proj" for p in "qkvo") + tuple(f"mlp.{p}_proj" for p in ("gate", "up", "down"))


# ---------------------------------------------------------------- small checkpoints


def llama_tensors(dtype: object = BF16, *, layers: int = 2, dim: int = 32, hidden: int = 64) -> dict[str, np.ndarray]:
    """An HF Llama's tensors (GQA: 4 heads, 2 KV heads), weights drawn like trained ones."""
    rng = np.random.default_rng(0)
    kv = dim // 2
    shapes = {"model.embed_tokens.weight": (64, dim)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (dim,),
            p + "self_attn.q_proj.weight": (dim, dim),
            p + "self_attn.k_proj.weight": (kv, dim),
            p + "self_attn.v_proj.weight": (kv, dim),
            p + "self_attn.o_proj.weight": (dim, dim),
            p + "post_attention_layernorm.weight": (dim,),
            p + "mlp.gate_proj.weight": (hidden, dim),
            p + "mlp.up_proj.weight": (hidden, dim),
            p + "mlp.down_proj.weight": (dim, hidden),
        }
    shapes |= {"model.norm.weight": (dim,), "lm_head.weight": (64, dim)}
    return {name: (rng.standard_normal(shape) * 0.02).astype(dtype) for name, shape in shapes.items()}


def hf_config(layers: int = 2, dim: int = 32, hidden: int = 64) -> dict[str, object]:
    return {
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 64,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }


def write_hf(directory: Path, tensors: dict[str, np.ndarray], *, shards: int = 1) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config()))
    if shards == 1:
        save_file(tensors, directory / "model.safetensors")
        return directory
    names = list(tensors)
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[k::shards]}
        save_file(part, directory / file)
        weight_map |= {name: file for name in part}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def write_llama2c(path: Path, *, dim: int = 16, hidden: int = 24, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                  vocab: int = 32, seq_len: int = 8, tied: bool = False) -> Path:
    """A legacy llama2.c file: 7 int32 of header, then the fp32 tensors in llama2.c's order."""
    head_dim = dim // heads
    kv_dim = kv_heads * head_dim
    counts = [vocab * dim, layers * dim, layers * dim * dim, layers * kv_dim * dim, layers * kv_dim * dim,
              layers * dim * dim, layers * dim, layers * hidden * dim, layers * dim * hidden, layers * hidden * dim,
              dim, seq_len * head_dim // 2, seq_len * head_dim // 2] + ([] if tied else [vocab * dim])
    header = np.array([dim, hidden, layers, heads, kv_heads, vocab if tied else -vocab, seq_len], "<i4")
    values = (np.random.default_rng(1).standard_normal(sum(counts)) * 0.02).astype("<f4")
    path.write_bytes(header.tobytes() + values.tobytes())
    return path


@pytest.fixture
def hf_bf16(tmp_path: Path) -> Path:
    return write_hf(tmp_path / "src", llama_tensors())


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def decoded(value: HuffmanParts | np.ndarray) -> np.ndarray:
    return codec.decompress(value) if isinstance(value, HuffmanParts) else value


# ---------------------------------------------------------------- compress


def test_compress_hf_round_trip(hf_bf16: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.unw.safetensors"
    report = compress_checkpoint(hf_bf16, out, progress=False)
    by_name = {t.name: t for t in report.tensors}
    source = llama_tensors()
    assert set(by_name) == set(source)
    projections = {f"model.layers.{i}.{p}.weight" for i in range(2) for p in PROJECTIONS}
    assert {t.name for t in report.compressed} == projections
    assert "no rule matches" in by_name["model.norm.weight"].reason
    assert "--embeddings" in by_name["model.embed_tokens.weight"].reason
    reader = BundleReader(report.output)
    assert reader.config == hf_config() and reader.source["kind"] == "huggingface"
    assert reader.info("model.layers.0.mlp.up_proj.weight").reason.startswith("compressed by rule")
    for name, value in reader:
        assert decoded(value).tobytes() == source[name].tobytes(), name
    t = by_name["model.layers.1.mlp.down_proj.weight"]
    assert t.bf16_bytes == 2 * 32 * 64 and t.stored_bytes == reader.info(t.name).stored_bytes
    assert 0.6 < t.entropy_bound_bytes / t.bf16_bytes < t.ratio < 0.8
    assert report.unmatched_rules == ()


def test_embeddings_and_sharded_source_and_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_hf(tmp_path / "src", llama_tensors(), shards=3)
    out = tmp_path / "m.unw.safetensors"
    code, stdout, _ = run_cli(capsys, "compress", str(src), "-o", str(out), "--embeddings", "--max-shard-size", "8KB")
    assert code == 0 and "compressed" in stdout
    shards = sorted(tmp_path.glob("m-*-of-*.unw.safetensors"))
    assert len(shards) > 2 and all(p.stat().st_size <= 8000 + 4096 for p in shards)  # data <= 8 KB, plus header
    reader = BundleReader(out)
    assert {reader.info(n).encoding for n in ("lm_head.weight", "model.embed_tokens.weight")} == {"huffman"}
    code, stdout, err = run_cli(capsys, "verify", str(out), "--against", str(src))
    assert (code, err) == (0, "") and "OK: 21 tensors" in stdout and "bit for bit" in stdout


def test_fp32_is_cast_only_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_hf(tmp_path / "src", llama_tensors(np.float32))
    raw = compress_checkpoint(src, tmp_path / "raw.unw.safetensors", progress=False)
    assert raw.compressed == ()
    up = next(t for t in raw.tensors if t.name == "model.layers.0.mlp.up_proj.weight")
    assert up.reason == "dtype float32 is not bf16 (use --cast-bf16)" and up.stored_bytes == 4 * 64 * 32
    assert BundleReader(raw.output).read(up.name).dtype == np.float32

    code, _, _ = run_cli(capsys, "compress", str(src), "-o", str(tmp_path / "cast.unw.safetensors"), "--cast-bf16")
    assert code == 0
    reader = BundleReader(tmp_path / "cast.unw.safetensors")
    assert reader.source["cast_to_bf16"] is True and "lossy" in reader.source["cast"]
    assert reader.info(up.name).encoding == "huffman" and reader.read("model.norm.weight").dtype == BF16
    assert run_cli(capsys, "verify", str(tmp_path / "cast.unw.safetensors"), "--against", str(src))[0] == 0
    assert "LOSSY" in subprocess_help("compress")


def subprocess_help(command: str) -> str:
    argv = [sys.executable, "-m", "unweight_jax.cli", command, "--help"]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return " ".join(done.stdout.split())


def test_llama2c_source_carries_an_hf_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_llama2c(tmp_path / "tiny.bin")
    out = tmp_path / "tiny.unw.safetensors"
    assert run_cli(capsys, "compress", str(src), "-o", str(out), "--cast-bf16", "--embeddings")[0] == 0
    reader = BundleReader(out)
    assert LlamaConfig.from_hf(reader.config) == read_llama2c_config(src)
    assert reader.source["kind"] == "llama2c" and "lm_head.weight" in reader
    assert run_cli(capsys, "verify", str(out), "--against", str(src))[0] == 0


def test_stories260k(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "stories.unw.safetensors"
    assert run_cli(capsys, "compress", str(STORIES), "-o", str(out), "--cast-bf16")[0] == 0
    code, stdout, _ = run_cli(capsys, "verify", str(out), "--against", str(STORIES))
    assert code == 0 and "OK: 47 tensors" in stdout
    code, stdout, _ = run_cli(capsys, "inspect", str(out), "--json")
    report = json.loads(stdout)
    totals = report["totals"]
    assert code == 0 and totals["tensors"] == 47 and totals["compressed"] == 5 * len(PROJECTIONS)
    assert 0.64 < totals["bound_ratio"] < totals["huffman_ratio"] < 0.70
    assert 0.70 < totals["palette_ratio"] < 0.80 and totals["file_bytes"] == out.stat().st_size
    code, stdout, _ = run_cli(capsys, "inspect", str(out))
    line = next(row for row in stdout.splitlines() if row.startswith("model.layers.4.mlp.down_proj.weight"))
    assert "huffman" in line and "64x172" in line and "compressed by rule" in line
    assert "--embeddings" in next(row for row in stdout.splitlines() if row.startswith("model.embed_tokens.weight"))


def test_compression_streams(tmp_path: Path) -> None:
    """Peak memory stays a small multiple of the largest tensor, far below the checkpoint's size."""
    shape = (512, 512)
    rng = np.random.default_rng(0)
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": (rng.standard_normal(shape) * 0.02).astype(BF16)
               for i in range(16)}
    src = write_hf(tmp_path / "src", tensors)
    compress_checkpoint(src, tmp_path / "warm.unw.safetensors", progress=False)  # imports, caches
    largest = 2 * shape[0] * shape[1]
    tracemalloc.start()
    try:
        compress_checkpoint(src, tmp_path / "m.unw.safetensors", progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * largest, f"peak {peak} bytes; largest tensor {largest}, checkpoint {16 * largest}"


def test_entropy_bound_counts_block_by_block() -> None:
    x = (np.random.default_rng(0).standard_normal((300, 700)) * np.linspace(1e-4, 1, 700)).astype(BF16)  # > 3 blocks
    expected = x.size * (8 + exponent_entropy_bits(x.view(np.uint16))) / 8
    assert entropy_bound_bytes(x) == pytest.approx(expected, rel=1e-12)
    assert entropy_bound_bytes(np.zeros((0, 4), BF16)) == 0 and entropy_bound_bytes(np.zeros(4, np.float32)) is None


@pytest.mark.parametrize(
    ("text", "size"), [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("1.5kb", 1500), ("4096", 4096)]
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


# ---------------------------------------------------------------- bad input: clear error, exit 2, no output


def assert_refused(capsys: pytest.CaptureFixture[str], out_dir: Path, argv: list[str], message: str) -> None:
    before = sorted(out_dir.iterdir())
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"unweight {argv[0]}: error: ") and "Traceback" not in err
    assert message in err, err
    assert sorted(out_dir.iterdir()) == before


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


def test_missing_source(tmp_path: Path, out_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert_refused(capsys, out_dir, ["compress", str(missing), "-o", str(out_dir / "m.unw.safetensors")],
                   f"{missing}: no such file or directory")


def test_dangling_symlink_source(tmp_path: Path, out_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "gone.bin").symlink_to(tmp_path / "deleted.bin")
    assert_refused(capsys, out_dir, ["compress", str(tmp_path / "gone.bin"), "-o", str(out_dir / "m.unw.safetensors")],
                   "no such file or directory")


def test_unreadable_bundle_paths(tmp_path: Path, out_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_refused(capsys, out_dir, ["inspect", str(out_dir)], "is a directory")
    assert_refused(capsys, out_dir, ["inspect", str(tmp_path / "none.unw.safetensors")], "No such file or directory")
    (tmp_path / "x.unw.safetensors").write_bytes(b"not a safetensors file at all")
    assert_refused(capsys, out_dir, ["inspect", str(tmp_path / "x.unw.safetensors")], "truncated")


def test_directory_without_weights(tmp_path: Path, out_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert_refused(capsys, out_dir, ["compress", str(tmp_path / "empty"), "-o", str(out_dir / "m.unw.safetensors")],
                   "no model.safetensors or model.safetensors.index.json")


def test_not_a_checkpoint(tmp_path: Path, out_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert_refused(capsys, out_dir, ["compress", str(tmp_path / "notes.txt"), "-o", str(out_dir / "m.unw.safetensors")],
                   "not a checkpoint")
    truncated = write_llama2c(tmp_path / "cut.bin")
    truncated.write_bytes(truncated.read_bytes()[:-10])
    assert_refused(capsys, out_dir, ["compress", str(truncated), "-o", str(out_dir / "m.unw.safetensors")], "truncated")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_source(tmp_path: Path, out_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_llama2c(tmp_path / "locked.bin")
    src.chmod(0)
    argv = ["compress", str(src), "-o", str(out_dir / "m.unw.safetensors")]
    assert_refused(capsys, out_dir, argv, "Permission denied")


def test_source_failing_midway_leaves_no_output(
    tmp_path: Path, out_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_hf(tmp_path / "src", llama_tensors(), shards=2)
    second = src / "model-00002-of-00002.safetensors"
    second.write_bytes(second.read_bytes()[:-100])
    assert_refused(capsys, out_dir, ["compress", str(src), "-o", str(out_dir / "m.unw.safetensors")], str(second))


def test_bad_output_paths(hf_bf16: Path, tmp_path: Path, out_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_refused(capsys, out_dir, ["compress", str(hf_bf16), "-o", str(out_dir / "m.safetensors")],
                   "must end with '.unw.safetensors'")
    assert_refused(capsys, out_dir, ["compress", str(hf_bf16), "-o", str(tmp_path / "absent" / "m.unw.safetensors")],
                   "output directory does not exist")
    out = out_dir / "m.unw.safetensors"
    assert run_cli(capsys, "compress", str(hf_bf16), "-o", str(out))[0] == 0
    first = out.read_bytes()
    assert_refused(capsys, out_dir, ["compress", str(hf_bf16), "-o", str(out), "--embeddings"], "--overwrite")
    assert out.read_bytes() == first
    assert run_cli(capsys, "compress", str(hf_bf16), "-o", str(out), "--embeddings", "--overwrite")[0] == 0
    assert BundleReader(out).info("lm_head.weight").encoding == "huffman"


@pytest.mark.parametrize("link", [os.symlink, os.link])
def test_refuses_to_overwrite_its_input(
    tmp_path: Path, out_dir: Path, capsys: pytest.CaptureFixture[str], link: Callable[[Path, Path], None]
) -> None:
    src = write_llama2c(tmp_path / "model.bin")
    content = src.read_bytes()
    link(src, out_dir / "m.unw.safetensors")
    with pytest.raises(CheckpointError, match="refusing to overwrite the input"):
        compress_checkpoint(src, out_dir / "m.unw.safetensors", cast_to_bf16=True, overwrite=True, progress=False)
    assert_refused(capsys, out_dir, ["compress", str(src), "-o", str(out_dir / "m.unw.safetensors"), "--overwrite"],
                   "refusing to overwrite the input")
    assert src.read_bytes() == content


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compress", "src"], "the following arguments are required: -o/--output"),
        (["compress", "src", "-o", "m.unw.safetensors", "--max-shard-size", "5XB"], "'5XB' is not a size"),
        (["compress", "src", "-o", "m.unw.safetensors", "--threads", "0"], "'0' is not a positive integer"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


# ---------------------------------------------------------------- verify and inspect find what is wrong


@pytest.fixture
def bundle(hf_bf16: Path, tmp_path: Path) -> Path:
    return compress_checkpoint(hf_bf16, tmp_path / "m.unw.safetensors", progress=False).output


@pytest.mark.parametrize("part", ["sm", "words", "chunks", "table"])
def test_verify_and_inspect_name_a_corrupt_tensor(bundle: Path, capsys: pytest.CaptureFixture[str], part: str) -> None:
    name = "model.layers.1.self_attn.v_proj.weight"
    array = read_safetensors_header(bundle).arrays[f"{name}.{part}"]
    data = bytearray(bundle.read_bytes())
    data[array.end - 1] ^= 0x01
    bundle.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "verify", str(bundle))
    assert code == 1 and f"tensor '{name}': part '{name}.{part}' fails its CRC" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "inspect", str(bundle))
    assert code == 2 and f"tensor '{name}'" in err and err.count("\n") == 1


@pytest.mark.parametrize(("change", "error"), [(1, "leaves 1 words unread"), (-1, "runs past its words")])
def test_verify_decodes_every_stream_to_its_last_word(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: int, error: str
) -> None:
    """A stream one word too long or too short passes every CRC and index check; decoding finds it."""
    parts = codec.compress(llama_tensors()["model.layers.0.mlp.up_proj.weight"])
    words = np.append(parts.words, np.uint16(0)) if change > 0 else parts.words[:-1].copy()
    out = save_bundle(tmp_path / "m.unw.safetensors", [("w", dataclasses.replace(parts, words=words))])
    code, _, err = run_cli(capsys, "verify", str(out))
    assert code == 1 and f"{out}: tensor 'w': corrupt Huffman stream: chunk 0 {error}" in err
    code, _, err = run_cli(capsys, "inspect", str(out))
    assert code == 2 and f"{out}: tensor 'w': corrupt Huffman stream" in err


def test_verify_a_truncated_bundle(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle.write_bytes(bundle.read_bytes()[:-1])
    code, _, err = run_cli(capsys, "verify", str(bundle))
    assert code == 1 and f"{bundle}: truncated" in err


def test_verify_against_a_different_source(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tensors = llama_tensors()
    changed = tensors["model.layers.0.mlp.gate_proj.weight"]
    changed[3, 5] = -changed[3, 5] if changed[3, 5] != 0 else BF16(1)
    del tensors["model.norm.weight"]
    tensors["extra.weight"] = np.zeros(3, BF16)
    other = write_hf(tmp_path / "other", tensors)
    code, _, err = run_cli(capsys, "verify", str(bundle), "--against", str(other))
    assert code == 1
    name = "model.layers.0.mlp.gate_proj.weight"
    assert f"tensor '{name}' differs from the source in 1 of 2048 elements (first at index (3, 5))" in err
    assert "tensor 'extra.weight' of" in err and "is missing from the bundle" in err
    assert "tensor 'model.norm.weight' is not in the source" in err


def test_inspect_table_and_json(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = run_cli(capsys, "inspect", str(bundle))
    assert code == 0
    assert "huffman:" in stdout and "palette:" in stdout and "on disk" in stdout
    code, stdout, _ = run_cli(capsys, "inspect", str(bundle), "--json")
    report = json.loads(stdout)
    up = next(t for t in report["tensors"] if t["name"] == "model.layers.0.mlp.up_proj.weight")
    assert up["encoding"] == "huffman" and up["shape"] == [64, 32] and up["groups"] == 64 and up["palette_bytes"] > 0
    norm = next(t for t in report["tensors"] if t["name"] == "model.norm.weight")
    assert norm["encoding"] == "raw" and norm["palette_bytes"] is None and norm["reason"] == "no rule matches the name"
    assert report["totals"]["compressed"] == 14 and report["totals"]["file_bytes"] == bundle.stat().st_size


def test_policy_for_other_architectures(tmp_path: Path) -> None:
    """A custom policy: every 2-D `.weight` of a BERT-style checkpoint."""
    tensors = {"encoder.layer.0.attention.self.query.weight": llama_tensors()["model.layers.0.mlp.up_proj.weight"],
               "encoder.layer.0.attention.self.query.bias": np.zeros(64, BF16),
               "embeddings.position_ids": np.arange(8, dtype=np.int64).reshape(1, 8)}
    src = write_hf(tmp_path / "bert", tensors)
    policy = CompressionPolicy([Rule(r".*\.weight", True)])
    done = compress_checkpoint(src, tmp_path / "b.unw.safetensors", policy=policy, progress=False)
    report = {t.name: t for t in done.tensors}
    assert [report[name].encoding for name in tensors] == ["huffman", "raw", "raw"]
    assert report["embeddings.position_ids"].reason == "no rule matches the name"
