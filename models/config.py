"""Llama model configuration, read from Hugging Face `config.json` or a llama2.c header."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 rotary frequency scaling (HF `rope_type: "llama3"`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and hyper-parameters of a Llama decoder.

    Frozen and hashable, so that it can be a static argument of `jax.jit`.
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    bos_id: int | None = 1
    eos_ids: tuple[int, ...] = (2,)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}; give head_dim")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.head_dim < 0 or self.head_dim % 2:
            raise ValueError(f"head_dim must be positive and even (RoPE rotates pairs), got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any]) -> LlamaConfig:
        """Reads a Hugging Face Llama `config.json` (a path to it, its directory, or the parsed dict).

        Raises ValueError, naming the field, for anything this model does not implement, so that
        an unsupported checkpoint fails at load time instead of producing wrong logits.
        """
        if isinstance(path_or_dict, Mapping):
            hf = dict(path_or_dict)
            source = "config"
        else:
            source = os.fspath(path_or_dict)
            if os.path.isdir(source):
                source = os.path.join(source, "config.json")
            try:
                with open(source, encoding="utf-8") as f:
                    hf = json.load(f)
            except FileNotFoundError:
                raise FileNotFoundError(f"{source}: no such file or directory") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{source}: not a valid JSON config ({e})") from None

        def refuse(field: str, value: Any, why: str) -> ValueError:
            return ValueError(f"{source}: unsupported {field}={value!r} ({why})")

        if hf.get("model_type") != "llama":
            raise refuse("model_type", hf.get("model_type"), 'only "llama" is supported')
        for field in ("num_local_experts", "num_experts", "n_routed_experts"):
            if (hf.get(field) or 0) > 0:
                raise refuse(field, hf[field], "mixture-of-experts models are not supported")
        for field in ("attention_bias", "mlp_bias"):
            if hf.get(field):
                raise refuse(field, hf[field], "projections with biases are not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise refuse("hidden_act", hf["hidden_act"], 'only "silu" is supported')

        # transformers >= 5 writes `rope_parameters` (holding rope_theta too); older configs write
        # `rope_theta` and `rope_scaling` (whose type key was once "type").
        rope_field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
        rope = hf.get(rope_field) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "default":
            rope_scaling = None
        elif rope_type == "llama3":
            rope_scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        else:
            raise refuse(f"{rope_field}.rope_type", rope_type, 'only "llama3" scaling or none is supported')

        def required(field: str) -> Any:
            if field not in hf:
                raise ValueError(f"{source}: missing required field {field!r}")
            return hf[field]

        eos = hf.get("eos_token_id")
        n_heads = int(required("num_attention_heads"))
        return cls(
            vocab_size=int(required("vocab_size")),
            dim=int(required("hidden_size")),
            n_layers=int(required("num_hidden_layers")),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            hidden_dim=int(required("intermediate_size")),
            head_dim=int(hf.get("head_dim") or 0),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            rope_scaling=rope_scaling,
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_id=hf.get("bos_token_id"),
            eos_ids=tuple(int(e) for e in eos) if isinstance(eos, list) else () if eos is None else (int(eos),),
        )

    @classmethod
    def from_llama2c_header(cls, header: Sequence[int]) -> LlamaConfig:
        """Builds the config from the 7 int32 of a llama2.c (legacy format) `.bin` header:
        dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len.

        A negative vocab_size marks an untied classifier. llama2.c models use the Llama-2
        sentencepiece conventions (BOS 1, EOS 2), RMSNorm epsilon 1e-5 and RoPE theta 10000.
        """
        if len(header) != 7:
            raise ValueError(f"a llama2.c header has 7 integers, got {len(header)}")
        dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = (int(v) for v in header)
        return cls(
            vocab_size=abs(vocab_size),
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            hidden_dim=hidden_dim,
            norm_eps=1e-5,
            rope_theta=10000.0,
            max_seq_len=seq_len,
            tie_embeddings=vocab_size > 0,
            bos_id=1,
            eos_ids=(2,),
        )


# Meta's Llama-3.1-8B (its Hugging Face config.json), for benchmarks at real shapes without the weights.
LLAMA_3_1_8B = LlamaConfig(
    vocab_size=128256,
    dim=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    hidden_dim=14336,
    head_dim=128,
    norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    ),
    max_seq_len=131072,
    bos_id=128000,
    eos_ids=(128001, 128008, 128009),
)
