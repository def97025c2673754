"""Compress a checkpoint into a bundle, streaming: one tensor in memory at a time.

A source is a Hugging Face directory (`config.json` and `model.safetensors`, or shards with an
index) or a llama2.c `.bin` file; both are read through `unweight_jax.models.loading`, which
yields tensors in Hugging Face naming and layout. Each tensor is optionally cast to bf16, judged
by the `CompressionPolicy`, compressed or kept raw, and handed to the `BundleWriter`, which stages
it on disk; a failure anywhere discards the partial output.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import codec
from .bundle import KEY_CONFIG, KEY_SOURCE, BundleWriter, bundle_path, existing_bundle_files
from .format import DEFAULT_CHUNK_STEPS, HuffmanParts, split_bf16
from .models.config import LlamaConfig
from .policy import BF16, CASTABLE_TO_BF16, CompressionPolicy, Rule

CAST_NOTE = "fp32/fp16 tensors rounded to bf16 (round to nearest even): lossy; the bundle holds the bf16 model"


class CheckpointError(ValueError):
    """A source checkpoint or output path that cannot be used as asked; the message names it."""


# ---------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """A checkpoint to compress: where it is, what it is, and its model config in HF form."""

    kind: str  # "huggingface" | "llama2c"
    path: Path
    files: tuple[Path, ...]  # the files its tensors are read from
    config: dict[str, object]  # the HF config.json content

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(HF name, array) in the source's dtype, one at a time."""
        from .models import loading  # imports jax and flax: only when a checkpoint is read

        reader = loading.iter_hf_tensors if self.kind == "huggingface" else loading.iter_llama2c_tensors
        iterator = reader(self.path)
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                return
            except ValueError as e:  # the loaders' message names the file and the problem
                raise CheckpointError(str(e)) from None
            yield item


def open_source(path: str | os.PathLike[str]) -> Source:
    """Recognise a checkpoint: an HF directory or a llama2.c `.bin` file."""
    from .models import loading  # imports jax and flax: only when a checkpoint is read

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        try:
            files = tuple(Path(f) for f in loading.hf_weight_files(path))
        except (FileNotFoundError, ValueError) as e:  # no weights, a bad index, or a shard it names is missing
            raise CheckpointError(str(e)) from None
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{path}: no config.json (a bundle must carry the model's config)")
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
        return Source("huggingface", path, files, config)
    if path.suffix == ".bin":
        try:
            config = loading.read_llama2c_config(path)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        return Source("llama2c", path, (path,), hf_config(config))
    raise CheckpointError(f"{path}: not a checkpoint: expected a Hugging Face directory "
                          "(config.json and model.safetensors) or a llama2.c .bin file")


def hf_config(config: LlamaConfig) -> dict[str, object]:
    """The Hugging Face `config.json` content of a Llama config (as a llama2.c header gives it)."""
    hf: dict[str, object] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": config.bos_id,
        "eos_token_id": list(config.eos_ids) if len(config.eos_ids) != 1 else config.eos_ids[0],
    }
    if config.rope_scaling is not None:
        hf["rope_scaling"] = {"rope_type": "llama3", **vars(config.rope_scaling)}
    return hf


def to_bf16(array: np.ndarray) -> np.ndarray:
    """fp32/fp16 -> bf16 (round to nearest even, as torch and ml_dtypes do); other dtypes unchanged."""
    return array.astype(BF16) if array.dtype in CASTABLE_TO_BF16 else array


# ---------------------------------------------------------------- report


@dataclass(frozen=True)
class TensorReport:
    name: str
    shape: tuple[int, ...]
    encoding: str  # "huffman" | "raw"
    reason: str
    bf16_bytes: int  # 2 bytes per element: the tensor's size in a bf16 checkpoint
    stored_bytes: int  # what the bundle spends on it (all parts)
    entropy_bound_bytes: float | None  # n * (8 + H) / 8 for bf16 tensors, H = exponent entropy

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.bf16_bytes if self.bf16_bytes else 1.0


@dataclass(frozen=True)
class CompressionReport:
    source: Path
    output: Path  # the path to open: the bundle file, or the index of a sharded bundle
    tensors: tuple[TensorReport, ...]
    unmatched_rules: tuple[Rule, ...]  # rules of the policy that decided no tensor

    @property
    def compressed(self) -> tuple[TensorReport, ...]:
        return tuple(t for t in self.tensors if t.encoding == "huffman")

    @property
    def bf16_bytes(self) -> int:
        return sum(t.bf16_bytes for t in self.tensors)

    @property
    def stored_bytes(self) -> int:
        return sum(t.stored_bytes for t in self.tensors)

    @property
    def huffman_ratio(self) -> float:
        """Stored / bf16 bytes over the compressed tensors."""
        bf16 = sum(t.bf16_bytes for t in self.compressed)
        return sum(t.stored_bytes for t in self.compressed) / bf16 if bf16 else 1.0

    @property
    def bound_ratio(self) -> float:
        """The exponent-entropy bound / bf16 bytes over the compressed tensors."""
        bf16 = sum(t.bf16_bytes for t in self.compressed)
        return sum(t.entropy_bound_bytes or 0.0 for t in self.compressed) / bf16 if bf16 else 1.0


_HISTOGRAM_BLOCK = 1 << 16


def entropy_bound_bytes(array: np.ndarray) -> float | None:
    """n * (8 + H) / 8 bytes for a bf16 tensor, H its exponent entropy in bits; None for others.

    The same figure as `format.exponent_entropy_bits`, counted block by block: its single
    `np.bincount` would hold 8 bytes per element (4x the tensor) at once.
    """
    if array.dtype != BF16:
        return None
    bits = array.reshape(-1).view(np.uint16)
    counts = np.zeros(256, np.int64)
    for start in range(0, bits.size, _HISTOGRAM_BLOCK):
        exponents, _ = split_bf16(bits[start : start + _HISTOGRAM_BLOCK])
        counts += np.bincount(exponents, minlength=256)
    p = counts[counts > 0] / max(bits.size, 1)
    return bits.size * (8 - float((p * np.log2(p)).sum())) / 8


# ---------------------------------------------------------------- compress


def compress_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    policy: CompressionPolicy | None = None,
    cast_to_bf16: bool = False,
    max_shard_bytes: int | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> CompressionReport:
    """Compress checkpoint `src` into bundle `dst` (`*.unw.safetensors`), tensor by tensor.

    `cast_to_bf16` rounds fp32/fp16 tensors to bf16 first (lossy; recorded in `unweight.source`).
    Refuses to write over its input, and over an existing bundle unless `overwrite`.
    """
    policy = policy or CompressionPolicy.default()
    source = open_source(src)
    try:
        dst = bundle_path(dst)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    _refuse_overwriting_input(source, dst)
    metadata = {
        KEY_CONFIG: json.dumps(source.config),
        KEY_SOURCE: json.dumps(
            {"kind": source.kind, "name": source.path.name, "cast_to_bf16": cast_to_bf16}
            | ({"cast": CAST_NOTE} if cast_to_bf16 else {})
        ),
    }
    reports = []
    total = source.nbytes
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=source.path.name, disable=not progress)
    with bar:
        with BundleWriter(dst, metadata=metadata, max_shard_bytes=max_shard_bytes, overwrite=overwrite) as writer:
            for name, array in source.tensors():
                source_bytes = array.nbytes
                if cast_to_bf16:
                    array = to_bf16(array)
                decision = policy.decide(name, array)
                value: HuffmanParts | np.ndarray = array
                if decision.compress:
                    value = codec.compress(array, chunk_steps=DEFAULT_CHUNK_STEPS, threads=threads)
                stored = writer.add(name, value, reason=decision.reason)
                reports.append(
                    TensorReport(
                        name,
                        tuple(array.shape),
                        "huffman" if decision.compress else "raw",
                        decision.reason,
                        2 * array.size,
                        stored,
                        entropy_bound_bytes(array),
                    )
                )
                bar.update(source_bytes)
            output = writer.close()
        bar.update(total - bar.n)  # file headers and tables the model does not use
    unmatched = policy.unmatched_rules([r.name for r in reports])
    return CompressionReport(source.path, output, tuple(reports), tuple(unmatched))



def _refuse_overwriting_input(source: Source, dst: Path) -> None:
    """Refuse an output that is (or links to) one of the source's files."""
    inputs = [source.path, *source.files]
    for out in {dst, *existing_bundle_files(dst)}:
        for file in inputs:
            if out.exists() and os.path.samefile(out, file):
                raise CheckpointError(f"{dst}: refusing to overwrite the input {file}")
