"""Tensor parallelism (Megatron style) for compressed projections over a mesh axis named "tp".

Each device holds and decodes only its shard of a weight W [out, in]:

- column-parallel (q, k, v, gate, up, lm_head): W split by rows; a device computes its slice of
  the output features, and the layer returns the global output sharded along its last axis;
- row-parallel (o, down): W split by columns, on 64-column palette-group boundaries; a device
  multiplies its slice of the input features and the partial products are `psum`med over "tp".

A sharded weight is one palette-form pytree whose leaves are the per-shard leaves stacked along a
new leading axis of size tp and placed with `NamedSharding(mesh, P("tp"))`, so device i holds
exactly shard i. Shards are re-encoded on the host at load, one tensor at a time. Only `esc_exp`
differs in size between shards; it is zero-padded to the largest, and the padding rows are never
read (a slot is used only where the escape mask flags the group, and flagged slots index real rows).

The product runs under `shard_map`, each device running the plan the autotuner chooses for its
shard's shape (`autotune.choose_case`): on a GPU the fused palette GEMV or GEMM on the local
shard, elsewhere (or when decode + dot wins) the local palette form decoded with plain jnp
(exact) and XLA's dot. Row-parallel partial products are added in fp32; a fused kernel's partial
arrives rounded to bf16 (its output type), as in the usual bf16 all-reduce of tensor-parallel
serving. Everything outside the projections (norms, embeddings, attention) is replicated, and
XLA partitions it from the shardings the projections produce.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import autotune, codec
from .autotune.key import Case
from .format import GROUP, HuffmanParts
from .layers import CompressedParam
from .pipelines import FUSED, Plan, join_bf16
from .weights import ESC_WORD_BITS, escape_index

try:  # jax >= 0.7
    from jax import shard_map
except ImportError:  # older jax
    from jax.experimental.shard_map import shard_map

TP_AXIS = "tp"
COLUMN = "column"
ROW = "row"
ROW_PARALLEL_MODULES = ("o_proj", "down_proj")


def tp_mesh(tp: int, devices: list[jax.Device] | None = None) -> Mesh:
    """A one-axis ("tp") mesh over the first `tp` devices (default: `jax.devices()`, every process's)."""
    devices = jax.devices() if devices is None else devices
    if tp < 1:
        raise ValueError(f"tensor-parallel degree must be at least 1, got {tp}")
    if len(devices) < tp:
        raise ValueError(f"tensor-parallel degree {tp} needs {tp} devices; {len(devices)} available")
    return Mesh(np.array(devices[:tp]), (TP_AXIS,))


def check_mesh(mesh: Mesh) -> None:
    if TP_AXIS not in mesh.axis_names:
        raise ValueError(f"the mesh has axes {mesh.axis_names}; tensor parallelism needs one named {TP_AXIS!r}")


def parallel_kind(module_path: str) -> str:
    """ROW for the projections whose input is already split (o_proj, down_proj), else COLUMN."""
    return ROW if module_path.rsplit("/", 1)[-1] in ROW_PARALLEL_MODULES else COLUMN


def split_weight(w: np.ndarray, kind: str, tp: int, name: str) -> list[np.ndarray]:
    """The tp shards of W [out, in]: row blocks for COLUMN, column blocks for ROW.

    A row-parallel split must fall on palette-group (64-column) boundaries, so that every shard
    has whole groups and its own escape index; `name` is the layer named in errors.
    """
    out_features, in_features = w.shape
    if kind == COLUMN:
        if out_features % tp:
            raise ValueError(f"{name}: {out_features} output features do not split over tp={tp}")
        return np.split(w, tp, axis=0)
    if kind == ROW:
        if tp > 1 and (in_features % tp or (in_features // tp) % GROUP):
            raise ValueError(
                f"{name}: {in_features} input features do not split over tp={tp} into multiples of {GROUP} "
                "(row-parallel shards must hold whole palette groups)"
            )
        return np.split(w, tp, axis=1)
    raise ValueError(f"{name}: unknown parallel kind {kind!r}; expected {COLUMN!r} or {ROW!r}")


@struct.dataclass
class ShardedPaletteWeight:
    """Palette-form shards (FORMAT.md section 3) stacked on a leading "tp" axis; `shape` is the
    whole weight's [out, in]."""

    palette: jax.Array  # u8 [tp, 16]
    idx: jax.Array  # u8 [tp, r, ceil(c/2)]
    sm: jax.Array  # u8 [tp, r, c]
    esc_mask: jax.Array  # u32 [tp, r, ceil(G/32)]
    esc_prefix: jax.Array  # u32 [tp, r, ceil(G/32)]
    esc_exp: jax.Array  # u8 [tp, max escapes of a shard (>= 1), 64], zero-padded
    shape: tuple[int, int] = struct.field(pytree_node=False)
    kind: str = struct.field(pytree_node=False)

    @classmethod
    def from_huffman(cls, parts: HuffmanParts, kind: str, mesh: Mesh, name: str) -> ShardedPaletteWeight:
        """Decodes one tensor on the host, splits it, palette-encodes each shard and places shard
        i on the i-th device of the mesh's "tp" axis."""
        if len(parts.shape) != 2:
            raise ValueError(f"{name}: tensor parallelism needs a 2-D weight, got shape {tuple(parts.shape)}")
        tp = mesh.shape[TP_AXIS]
        blocks = split_weight(codec.decompress(parts), kind, tp, name)
        shards = [codec.to_palette(np.ascontiguousarray(block)) for block in blocks]
        rows, cols = shards[0].sm.shape
        index = [escape_index(s.esc_groups, rows, cols) for s in shards]
        n_esc = max(1, *(len(s.esc_groups) for s in shards))
        esc_exp = np.zeros((tp, n_esc, GROUP), np.uint8)
        for i, s in enumerate(shards):
            esc_exp[i, : len(s.esc_exp)] = s.esc_exp
        leaves = dict(
            palette=np.stack([s.palette for s in shards]),
            idx=np.stack([s.idx for s in shards]),
            sm=np.stack([s.sm for s in shards]),
            esc_mask=np.stack([mask for mask, _ in index]),
            esc_prefix=np.stack([prefix for _, prefix in index]),
            esc_exp=esc_exp,
        )
        placed = jax.device_put(leaves, NamedSharding(mesh, P(TP_AXIS)))
        return cls(**placed, shape=tuple(parts.shape), kind=kind)

    @property
    def nbytes(self) -> int:
        """Bytes over all devices, padding included."""
        return sum(int(a.nbytes) for a in jax.tree_util.tree_leaves(self))


def palette_to_bf16(
    palette: jax.Array,
    idx: jax.Array,
    sm: jax.Array,
    esc_mask: jax.Array,
    esc_prefix: jax.Array,
    esc_exp: jax.Array,
) -> jax.Array:
    """bf16 [R, C] from one shard's palette form, in plain jnp (any backend, inside `shard_map`).

    Group g of row r is escaped when bit g % 32 of esc_mask[r, g // 32] is set; its exponents are
    esc_exp[esc_prefix[r, g // 32] + popcount(mask bits below g % 32)]. Unflagged groups never
    read esc_exp, so padding rows there are never used.
    """
    rows, cols = sm.shape
    nibbles = jnp.stack([idx & 0xF, idx >> 4], axis=-1).reshape(rows, -1)[:, :cols]
    exp = palette[nibbles]
    col = jnp.arange(cols)
    group = col // GROUP
    word = group // ESC_WORD_BITS
    bit = (group % ESC_WORD_BITS).astype(jnp.uint32)
    mask = esc_mask[:, word]
    escaped = ((mask >> bit) & 1) == 1
    slot = esc_prefix[:, word] + lax.population_count(mask & ((jnp.uint32(1) << bit) - 1))
    verbatim = esc_exp.at[slot, col % GROUP].get(mode="clip")
    return join_bf16(jnp.where(escaped, verbatim, exp), sm)


@struct.dataclass
class PaletteShard:
    """One device's shard of a `ShardedPaletteWeight` inside `shard_map`: the operands the fused
    palette kernels take (`ops.operands.palette_operands`), `shape` the shard's [rows, cols]."""

    palette: jax.Array
    idx: jax.Array
    sm: jax.Array
    esc_mask: jax.Array
    esc_prefix: jax.Array
    esc_exp: jax.Array
    shape: tuple[int, int] = struct.field(pytree_node=False)


def shard_shape(w: ShardedPaletteWeight) -> tuple[int, int]:
    """[rows, cols] of each device's shard."""
    rows, cols = w.shape
    tp = w.palette.shape[0]
    return (rows // tp, cols) if w.kind == COLUMN else (rows, cols // tp)


def shard_plan(w: ShardedPaletteWeight, batch: int, x_dtype: Any) -> Plan:
    """The plan of every device's shard product at `batch` (all shards share one shape)."""
    rows, cols = shard_shape(w)
    case = Case(rows, cols, "palette", np.dtype(x_dtype).name, autotune.batch_bucket(batch))
    return autotune.choose_case(case, batch)


def _local_product(x: jax.Array, w: ShardedPaletteWeight, plan: Plan) -> jax.Array:
    """One device's share of `x @ W.T` in fp32 (before the row-parallel sum): the plan's fused
    kernel on the local shard, or the shard decoded with jnp and XLA's dot (`pipelines.dense`)."""
    leaves = [leaf[0] for leaf in (w.palette, w.idx, w.sm, w.esc_mask, w.esc_prefix, w.esc_exp)]
    fused = FUSED[plan.kernel][0] if plan.pipeline == "palette" and plan.kernel in FUSED else None
    if fused is not None:
        shard = PaletteShard(*leaves, shape=tuple(leaves[2].shape))
        lead = x.shape[:-1]
        y = fused(x.reshape(-1, x.shape[-1]), shard, variant=plan.variant).astype(jnp.float32)
        y = y.reshape(*lead, y.shape[-1])
    else:
        y = lax.dot_general(
            x, palette_to_bf16(*leaves).astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
    if w.kind == ROW:
        y = lax.psum(y, TP_AXIS)
    return y.astype(x.dtype)


class ShardedCompressedLinear(nnx.Module):
    """A bias-free projection `x @ W.T` whose compressed `W` is split over the mesh's "tp" axis.

    Same contract as `CompressedLinear` on global arrays: a column-parallel layer returns its
    output sharded along the features; a row-parallel one takes its input that way (or resharded
    by XLA) and returns it replicated.
    """

    def __init__(self, weight: ShardedPaletteWeight, *, mesh: Mesh, dtype: Any):
        check_mesh(mesh)
        self.weight = CompressedParam(weight)
        self.mesh = mesh
        self.dtype = dtype

    @classmethod
    def from_huffman(cls, parts: HuffmanParts, *, module_path: str, mesh: Mesh, dtype: Any) -> ShardedCompressedLinear:
        weight = ShardedPaletteWeight.from_huffman(parts, parallel_kind(module_path), mesh, module_path)
        return cls(weight, mesh=mesh, dtype=dtype)

    @property
    def out_features(self) -> int:
        return self.weight.get_value().shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.get_value().shape[1]

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weight.get_value()
        if x.shape[-1] != w.shape[1]:
            raise ValueError(f"x has {x.shape[-1]} features, the weight {w.shape} expects {w.shape[1]}")
        lead = (None,) * (x.ndim - 1)
        x_spec, out_spec = (P(), P(*lead, TP_AXIS)) if w.kind == COLUMN else (P(*lead, TP_AXIS), P())
        plan = shard_plan(w, int(np.prod(x.shape[:-1])), self.dtype)
        product = shard_map(
            functools.partial(_local_product, plan=plan), mesh=self.mesh, in_specs=(x_spec, P(TP_AXIS)),
            out_specs=out_spec,
        )
        return product(x.astype(self.dtype), w)


def replicate_params(model: nnx.Module, mesh: Mesh) -> None:
    """Places every plain parameter (norms, embeddings, layers left uncompressed) replicated on
    the mesh, so one jit takes them together with the sharded weights."""
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.device_put(params, NamedSharding(mesh, P())))
