"""The compression policy: ordered rules, first match wins, and the tensor constraints after them."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from unweight_jax.policy import CompressionPolicy, Rule

BF16 = ml_dtypes.bfloat16


def spec(shape: tuple[int, ...], dtype: object = BF16) -> np.ndarray:
    return np.zeros(shape, dtype)


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.11.self_attn.k_proj.weight",
        "model.layers.3.self_attn.v_proj.weight",
        "model.layers.3.self_attn.o_proj.weight",
        "model.layers.7.mlp.gate_proj.weight",
        "model.layers.7.mlp.up_proj.weight",
        "model.layers.7.mlp.down_proj.weight",
    ],
)
def test_default_compresses_the_projections(name: str) -> None:
    decision = CompressionPolicy.default().decide(name, spec((8, 4)))
    assert decision.compress
    assert "_proj" in decision.reason


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "lm_head.weight"])
def test_embeddings_only_when_asked(name: str) -> None:
    kept = CompressionPolicy.default().decide(name, spec((32, 8)))
    assert not kept.compress and "--embeddings" in kept.reason
    assert CompressionPolicy.default(embeddings=True).decide(name, spec((32, 8))).compress


@pytest.mark.parametrize(
    ("name", "array", "reason"),
    [
        ("model.layers.0.input_layernorm.weight", spec((8,)), "no rule matches"),
        ("model.norm.weight", spec((8,)), "no rule matches"),
        ("model.layers.0.mlp.up_proj.weight", spec((8,)), "1-D tensor"),
        ("model.layers.0.mlp.up_proj.weight", spec((2, 8, 4)), "3-D tensor"),
        ("model.layers.0.mlp.up_proj.weight", spec((8, 4), np.float32), "dtype float32 is not bf16 (use --cast-bf16)"),
        ("model.layers.0.mlp.up_proj.weight", spec((8, 4), np.float16), "dtype float16 is not bf16 (use --cast-bf16)"),
        ("model.layers.0.mlp.up_proj.weight", spec((8, 4), np.int8), "dtype int8 is not bf16"),
    ],
)
def test_what_stays_raw_and_why(name: str, array: np.ndarray, reason: str) -> None:
    decision = CompressionPolicy.default().decide(name, array)
    assert not decision.compress
    assert reason in decision.reason
    if array.dtype == np.int8:
        assert "--cast-bf16" not in decision.reason


def test_first_match_wins_with_fullmatch() -> None:
    policy = CompressionPolicy([Rule(r"model\.layers\.0\..*", False), Rule(r".*\.weight", True)])
    assert not policy.decide("model.layers.0.mlp.up_proj.weight", spec((4, 4))).compress
    assert policy.decide("model.layers.1.mlp.up_proj.weight", spec((4, 4))).compress
    # fullmatch: a pattern matching only a prefix of the name does not apply
    assert not CompressionPolicy([Rule(r"model\.layers", True)]).decide("model.layers.0.w", spec((4, 4))).compress


def test_unmatched_rules_lists_rules_that_decided_nothing() -> None:
    shadowed = Rule(r".*up_proj\.weight", False)
    never = Rule(r"vision\..*", True)
    used = Rule(r".*_proj\.weight", True)
    policy = CompressionPolicy([used, shadowed, never])
    names = ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"]
    assert policy.unmatched_rules(names) == [shadowed, never]
    assert CompressionPolicy.default().unmatched_rules(["lm_head.weight"]) == [CompressionPolicy.default().rules[0]]


def test_rules_are_immutable_and_checked() -> None:
    policy = CompressionPolicy([Rule("a", True)])
    assert isinstance(policy.rules, tuple)
    with pytest.raises(ValueError, match=r"not a valid regex"):
        Rule("(", True)
