"""Which projections are hard (Huffman-resident, `transcode`) and which easy (palette-resident):
the layer plan of issue 12, chosen to fit a budget of weight bytes or given by module-path rules.

A hard layer holds ~0.67 of its bf16 bytes (the Huffman parts plus the escape side tables) and
rebuilds its 4-bit indices at every call; an easy layer holds ~0.75 and computes straight from
them. Sizes are exact: they are the bytes of the arrays `weights.TranscodeWeight` and
`weights.PaletteWeight` hold, computed from the bundle without building either.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import codec
from .bundle import BundleReader
from .format import GROUP, PALETTE_SIZE, HuffmanParts, as_matrix_shape
from .weights import ESC_WORD_BITS

HARD = "transcode"
EASY = "palette"
PLAN_FORMS = (HARD, EASY)

# The order in which layers turn hard. Down projections first: in the MLP they are consumed last,
# after attention, gate, up and the activation, so a decode started with the layer has the
# longest runway to hide behind that compute. Then up and gate (the rest of the MLP, the largest
# matrices), then attention in the order it consumes least early: o after q, k, v. The LM head,
# one tensor that ends the forward pass, comes last.
PRIORITY = ("down_proj", "up_proj", "gate_proj", "o_proj", "q_proj", "k_proj", "v_proj", "lm_head")

_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)
_UNIT_BYTES = {"": 1, "b": 1} | {
    f"{p}{i}b": (1024 if i else 1000) ** (k + 1) for k, p in enumerate("kmgt") for i in ("", "i")
}


def parse_size(text: str, argument: str = "size") -> int:
    """Bytes from `6.5GB`, `6500MB`, `7GiB` or `123` (decimal units are powers of 1000, binary
    ones of 1024); `argument` names the option in the error."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"{argument}: {text!r} is not a size (examples: 6.5GB, 6500MB, 7GiB)")
    number, unit = match.groups()
    return int(float(number) * _UNIT_BYTES[(unit or "").lower()])


# ---------------------------------------------------------------- sizes of the resident forms


def _escape_index_bytes(shape: tuple[int, ...]) -> int:
    """`esc_mask` and `esc_prefix`: two u32 per 32 groups of each row."""
    rows, cols = as_matrix_shape(shape)
    groups = -(-cols // GROUP)
    return 2 * 4 * rows * -(-groups // ESC_WORD_BITS)


def _escape_bytes(n_esc: int) -> int:
    """`esc_groups` (one u32 each) and `esc_exp` (64 verbatim exponent bytes each)."""
    return n_esc * (4 + GROUP)


def palette_form_bytes(shape: tuple[int, ...], n_esc: int) -> int:
    """Bytes a `PaletteWeight` holds: palette, 4-bit indices, sign/mantissa, escapes and their index."""
    rows, cols = as_matrix_shape(shape)
    return PALETTE_SIZE + rows * -(-cols // 2) + rows * cols + _escape_bytes(n_esc) + _escape_index_bytes(shape)


def huffman_resident_bytes(parts: HuffmanParts) -> int:
    """Bytes a `HuffmanWeight` holds: sign/mantissa, stream words, chunk offsets and the 2^L decoder
    table of u16 entries (one entry for an empty tensor)."""
    lut_entries = 1 << parts.max_len if len(parts.table) else 1
    return parts.sm.nbytes + parts.words.nbytes + parts.chunks.nbytes + 2 * lut_entries


def transcode_form_bytes(shape: tuple[int, ...], huffman_bytes: int, n_esc: int) -> int:
    """Bytes a `TranscodeWeight` holds: the Huffman weight plus palette, symbol->index table and escapes."""
    return huffman_bytes + PALETTE_SIZE + 256 + _escape_bytes(n_esc) + _escape_index_bytes(shape)


@dataclass(frozen=True)
class ProjectionSizes:
    """One compressed projection's resident bytes in each form of a plan."""

    module_path: str  # e.g. "layers/0/mlp/down_proj"
    shape: tuple[int, int]
    transcode_bytes: int
    palette_bytes: int

    @classmethod
    def from_parts(cls, module_path: str, parts: HuffmanParts) -> ProjectionSizes:
        """Exact sizes; the escape count is not in the bundle's metadata, so the tensor is transcoded."""
        n_esc = len(codec.huffman_to_palette(parts).esc_groups)
        shape = as_matrix_shape(parts.shape)
        return cls(
            module_path,
            shape,
            transcode_form_bytes(shape, huffman_resident_bytes(parts), n_esc),
            palette_form_bytes(shape, n_esc),
        )

    @property
    def bf16_bytes(self) -> int:
        return 2 * self.shape[0] * self.shape[1]

    def bytes_in(self, form: str) -> int:
        return self.transcode_bytes if form == HARD else self.palette_bytes


@dataclass(frozen=True)
class WeightSizes:
    """Every weight a model loaded from `source` holds: its projections, sized per form, and the
    plain parameters (embeddings, norms, an uncompressed or decoded tensor), held as they load."""

    source: str
    projections: tuple[ProjectionSizes, ...]
    plain_bytes: int
    plain_bf16_bytes: int


def bundle_sizes(path: str | os.PathLike[str]) -> WeightSizes:
    """The `WeightSizes` of the model `loading.load_bundle_model` builds from the bundle at `path`."""
    from .loading import projection_path  # loading imports this module for its type
    from .models.config import LlamaConfig
    from .models.loading import model_template

    reader = BundleReader(path)
    if reader.config is None:
        raise ValueError(f"{path}: the bundle holds no model config (unweight.config); it cannot plan a model")
    model = model_template(LlamaConfig.from_hf(reader.config), param_dtype=jnp.bfloat16)
    projections = []
    for name in reader.names:
        module_path = projection_path(model, reader, name)
        if module_path is not None:
            projections.append(ProjectionSizes.from_parts(module_path, reader.read(name)))
    planned = {f"{p.module_path}/weight" for p in projections}
    plain = [
        v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
        if "/".join(map(str, path)) not in planned
    ]
    return WeightSizes(
        str(path),
        tuple(projections),
        plain_bytes=sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in plain),
        plain_bf16_bytes=sum(2 * int(np.prod(v.shape)) for v in plain),
    )


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class LayerPlan:
    """The resident form of each compressed projection (`HARD` or `EASY`) and what it all holds."""

    source: str
    forms: Mapping[str, str]  # module path -> form
    sizes: WeightSizes = field(repr=False)

    def form(self, module_path: str) -> str:
        try:
            return self.forms[module_path]
        except KeyError:
            raise ValueError(f"the layer plan for {self.source} has no projection {module_path!r}: "
                             "it was made for another model") from None

    def layer_bytes(self) -> dict[str, int]:
        """module path -> bytes the projection holds in its planned form."""
        return {p.module_path: p.bytes_in(self.forms[p.module_path]) for p in self.sizes.projections}

    @property
    def hard(self) -> list[str]:
        return [path for path, form in self.forms.items() if form == HARD]

    @property
    def total_bytes(self) -> int:
        """All resident weight bytes: projections in their forms plus the plain parameters."""
        return sum(self.layer_bytes().values()) + self.sizes.plain_bytes

    @property
    def bf16_bytes(self) -> int:
        return sum(p.bf16_bytes for p in self.sizes.projections) + self.sizes.plain_bf16_bytes

    @property
    def ratio(self) -> float:
        return self.total_bytes / self.bf16_bytes if self.bf16_bytes else 1.0


def plan_layers(
    tensors: WeightSizes,
    max_weight_bytes: int | None = None,
    *,
    rules: Sequence[tuple[str, str]] | None = None,
) -> LayerPlan:
    """A plan that fits `max_weight_bytes` (all resident weights), or one given by `rules`.

    Budget: start all easy; while over budget, turn layers hard in `PRIORITY` order of their kind,
    the largest first within a kind, then in layer order. A layer whose hard form is not smaller
    (a tiny matrix, where the 2^L decoder table outweighs the saving) never helps and stays easy.

    Rules: (module-path regex, form) pairs, qwix style: the first regex that fully matches a
    projection's path gives its form; a projection no rule matches stays easy.
    """
    if (max_weight_bytes is None) == (rules is None):
        raise ValueError("plan_layers needs exactly one of max_weight_bytes and rules")
    if rules is not None:
        return LayerPlan(tensors.source, _forms_by_rules(tensors, rules), tensors)
    forms = {p.module_path: EASY for p in tensors.projections}
    total = sum(p.palette_bytes for p in tensors.projections) + tensors.plain_bytes
    helpful = [p for p in _priority_order(tensors.projections) if p.transcode_bytes < p.palette_bytes]
    smallest = total - sum(p.palette_bytes - p.transcode_bytes for p in helpful)
    if max_weight_bytes < smallest:
        raise ValueError(
            f"{tensors.source}: a weight budget of {max_weight_bytes} bytes cannot be met: the smallest plan "
            f"(every layer hard where that is smaller) holds {smallest} bytes"
        )
    for projection in helpful:
        if total <= max_weight_bytes:
            break
        forms[projection.module_path] = HARD
        total -= projection.palette_bytes - projection.transcode_bytes
    return LayerPlan(tensors.source, forms, tensors)


def _priority_order(projections: Sequence[ProjectionSizes]) -> list[ProjectionSizes]:
    def key(item: tuple[int, ProjectionSizes]) -> tuple[int, int, int]:
        position, p = item
        kind = p.module_path.rsplit("/", 1)[-1]
        rank = PRIORITY.index(kind) if kind in PRIORITY else len(PRIORITY)
        return rank, -p.bf16_bytes, position

    return [p for _, p in sorted(enumerate(projections), key=key)]


def _forms_by_rules(tensors: WeightSizes, rules: Sequence[tuple[str, str]]) -> dict[str, str]:
    compiled = []
    for pattern, form in rules:
        if form not in PLAN_FORMS:
            raise ValueError(f"layer rule {pattern!r}: unknown form {form!r}; expected one of {PLAN_FORMS}")
        try:
            compiled.append((re.compile(pattern), form))
        except re.error as e:
            raise ValueError(f"layer rule {pattern!r}: not a regular expression ({e})") from None
    return {
        p.module_path: next((form for regex, form in compiled if regex.fullmatch(p.module_path)), EASY)
        for p in tensors.projections
    }


def plan_table(plan: LayerPlan) -> str:
    """Per projection: path, form and bytes; then the total against bf16."""
    from .cli._units import human_bytes

    rows = [("projection", "form", "bytes", "of bf16")]
    layer_bytes = plan.layer_bytes()
    for p in plan.sizes.projections:
        held = layer_bytes[p.module_path]
        rows.append((p.module_path, plan.forms[p.module_path], str(held), f"{held / p.bf16_bytes:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.append(
        f"{len(plan.hard)} hard, {len(plan.forms) - len(plan.hard)} easy; "
        f"plain parameters {plan.sizes.plain_bytes} bytes; "
        f"all weights {plan.total_bytes} bytes ({human_bytes(plan.total_bytes)}) against bf16 {plan.bf16_bytes} "
        f"({human_bytes(plan.bf16_bytes)}): ratio {plan.ratio:.4f}"
    )
    return "\n".join(lines)
