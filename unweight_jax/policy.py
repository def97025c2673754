"""Which tensors of a checkpoint are compressed: ordered regex rules, first match wins (as in qwix).

A rule only says what the user wants. A tensor is compressed when the first rule matching its
name asks for it *and* the tensor can be: 2-D (a linear layer's weight, the shape the kernels
serve) and bf16 (the format's only element type). Everything else is stored raw, unchanged.
Casting fp32/fp16 sources to bf16 is a separate, lossy step taken before the policy sees a
tensor, and only when the user asks (`compress_checkpoint(cast_to_bf16=True)`, `--cast-bf16`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
CASTABLE_TO_BF16 = (np.dtype(np.float32), np.dtype(np.float16))

PROJECTIONS = r".*(q|k|v|o|gate|up|down)_proj\.weight"
EMBEDDINGS = r"(.*\.)?embed_tokens\.weight|(.*\.)?lm_head\.weight"


class ArrayLike(Protocol):
    """What a decision looks at: the tensor's shape and dtype, never its values."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...


@dataclass(frozen=True)
class Rule:
    """Compress (or keep raw) every tensor whose full name matches `name_pattern` (re.fullmatch)."""

    name_pattern: str
    compress: bool
    note: str = ""  # said in the decision's reason, e.g. which flag changes the rule

    def __post_init__(self) -> None:
        try:
            re.compile(self.name_pattern)
        except re.error as e:
            raise ValueError(f"rule pattern {self.name_pattern!r} is not a valid regex: {e}") from None

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.name_pattern, name) is not None


@dataclass(frozen=True)
class Decision:
    compress: bool
    reason: str


@dataclass(frozen=True)
class CompressionPolicy:
    """Ordered rules; the first rule whose pattern matches a tensor's name decides for it."""

    rules: tuple[Rule, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))  # accept any iterable, store it immutable

    @classmethod
    def default(cls, *, embeddings: bool = False) -> CompressionPolicy:
        """Attention and MLP projections; the embeddings and lm_head only when `embeddings`."""
        if embeddings:
            embedding_rule = Rule(EMBEDDINGS, True)
        else:
            embedding_rule = Rule(EMBEDDINGS, False, "embeddings and lm_head are compressed only with --embeddings")
        return cls([Rule(PROJECTIONS, True), embedding_rule])

    def rule_for(self, name: str) -> Rule | None:
        return next((rule for rule in self.rules if rule.matches(name)), None)

    def decide(self, name: str, array: ArrayLike) -> Decision:
        rule = self.rule_for(name)
        if rule is None:
            return Decision(False, "no rule matches the name")
        if not rule.compress:
            return Decision(False, _describe("kept raw by", rule))
        if len(array.shape) != 2:
            return Decision(False, f"{len(array.shape)}-D tensor: only 2-D weights are compressed")
        dtype = np.dtype(array.dtype)
        if dtype != BF16:
            hint = " (use --cast-bf16)" if dtype in CASTABLE_TO_BF16 else ""
            return Decision(False, f"dtype {dtype.name} is not bf16{hint}")
        return Decision(True, _describe("compressed by", rule))

    def unmatched_rules(self, names: Sequence[str]) -> list[Rule]:
        """The rules that no name reaches (none matches them, or an earlier rule takes every match)."""
        used = {self.rule_for(name) for name in names}
        return [rule for rule in self.rules if rule not in used]


def _describe(verb: str, rule: Rule) -> str:
    return f'{verb} rule "{rule.name_pattern}"' + (f": {rule.note}" if rule.note else "")
