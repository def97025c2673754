"""The pieces of `unweight bench` that its figures rest on: the device transcoder builds exactly
the palette form of FORMAT.md (the codec's), the KV cache size, the plan and tag parsing, and the
DFloat11 peer's stream encoder against DFloat11's own (where that package is installed)."""

from __future__ import annotations

import contextlib
import io
import argparse

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from unweight_jax import codec
from unweight_jax.bench.decode_step import Case, kv_cache_bytes
from unweight_jax.bench.run_info import device_tag
from unweight_jax.bench.transcode import palette_weight
from unweight_jax.cli.bench import plan_spec
from unweight_jax.models.config import LLAMA_3_1_8B
from unweight_jax.pipelines import Plan

PALETTE_FIELDS = ("palette", "idx", "sm", "esc_groups", "esc_exp")


@pytest.mark.parametrize(
    "shape, scale",
    [
        ((64, 256), 0.02),  # trained-like: few escapes
        ((48, 131), 1.0),  # wide exponent spread: many escapes, a short last group, an odd width
        ((3, 64), 1e-3),
        ((5, 7), 0.02),  # narrower than one group
    ],
)
def test_device_transcoder_builds_the_codecs_palette_form(shape, scale):
    rng = np.random.default_rng(sum(shape))
    w = (rng.standard_normal(shape) * scale).astype(ml_dtypes.bfloat16)
    w.view(np.uint16)[0, :3] = [0x7F80, 0xFFC1, 0x0001]  # inf, a NaN payload, a subnormal
    expected = codec.to_palette(w)
    got = palette_weight(jnp.asarray(w))
    for field in PALETTE_FIELDS:
        np.testing.assert_array_equal(np.asarray(getattr(got, field)), getattr(expected, field), err_msg=field)
    if scale == 1.0:
        assert len(expected.esc_groups) > 0


def test_device_transcoder_with_fewer_than_16_exponents():
    w = np.full((4, 128), 0.5, ml_dtypes.bfloat16)
    w[1, 3] = 2.0
    got = palette_weight(jnp.asarray(w))
    expected = codec.to_palette(w)
    for field in PALETTE_FIELDS:
        np.testing.assert_array_equal(np.asarray(getattr(got, field)), getattr(expected, field), err_msg=field)


def test_kv_cache_of_the_8b_model():
    # 2 (keys, values) x 32 layers x 8 KV heads x 128 dims x bf16 per slot, plus a 4-byte position
    per_slot = 2 * 32 * 8 * 128 * 2 + 4
    assert kv_cache_bytes(LLAMA_3_1_8B, Case(1024, 1024), steps=8) == 1024 * (1024 + 8) * per_slot + 4
    assert kv_cache_bytes(LLAMA_3_1_8B, Case(1024, 1024), steps=0) / 1e9 == pytest.approx(137.4, abs=0.1)


def test_plan_spec():
    assert plan_spec("auto") is None
    assert plan_spec("palette") == Plan("palette")
    assert plan_spec("palette/gemv:mma_acc4") == Plan("palette", "gemv", 3)
    assert plan_spec("palette/gemm:1") == Plan("palette", "gemm", 1)
    for bad in ("full", "palette/fma", "palette/gemv:99"):
        with pytest.raises(argparse.ArgumentTypeError):
            plan_spec(bad)


def test_device_tag():
    assert device_tag("NVIDIA H100 80GB HBM3") == "h100"
    assert device_tag("NVIDIA H200") == "h200"
    assert device_tag("cpu") == "cpu"


@pytest.mark.parametrize("n, scale", [(70_001, 0.02), (300_000, 1.0), (5, 0.02), (32_771, 1e-30)])
def test_dfloat11_stream_equals_dfloat11s_own_encoder(n, scale):
    torch = pytest.importorskip("torch")
    pytest.importorskip("dahuffman")
    from unweight_jax.bench import dfloat11_peer

    if dfloat11_peer._package_dir() is None:
        pytest.skip("the dfloat11 package is not installed")
    utils = dfloat11_peer._utils()
    w = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * scale).to(torch.bfloat16)
    exponents = ((w.view(torch.int16) >> 7) & 0xFF).to(torch.uint8)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        _, counter = utils.get_codec(w)
        their_codec, _, table = utils.get_32bit_codec(counter)
        expected = utils.encode(exponents.tolist(), their_codec, dfloat11_peer.BYTES_PER_THREAD,
                                dfloat11_peer.THREADS_PER_BLOCK)
    got = dfloat11_peer.encode(exponents, table)
    for mine, theirs in zip(got, expected):
        np.testing.assert_array_equal(mine.numpy(), theirs.astype(mine.numpy().dtype))
