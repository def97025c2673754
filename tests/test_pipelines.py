"""`pipelines.matmul` on every resident form against XLA's dot on the decompressed weight."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from unweight_jax import codec
from unweight_jax.format import FORMS
from unweight_jax.pipelines import PIPELINE_ENV, Plan, decompress, default_plan, dense, matmul, pipelines_for
from unweight_jax.weights import from_huffman


def weight(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, cols)) * 0.02).astype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", [(64, 128), (172, 64), (33, 100)])
def test_every_form_matches_the_dot_on_the_original_weight(form, shape):
    w = weight(*shape)
    cw = from_huffman(codec.compress(w, chunk_steps=4), form)
    np.testing.assert_array_equal(np.asarray(decompress(cw)).view(np.uint16), w.view(np.uint16))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 5, shape[1])), jnp.float32)
    for pipeline in pipelines_for(cw):
        got = jax.jit(lambda x, cw: matmul(x, cw, plan=Plan(pipeline)))(x, cw)
        assert got.shape == (3, 5, shape[0])
        np.testing.assert_array_equal(np.asarray(got), np.asarray(dense(x, jnp.asarray(w))))


def test_plans_are_checked():
    cw = from_huffman(codec.compress(weight(64, 64)), "huffman")
    x = jnp.ones((2, 64), jnp.float32)
    with pytest.raises(ValueError, match="cannot run from HuffmanWeight"):
        matmul(x, cw, plan=Plan("palette"))
    with pytest.raises(ValueError, match="fused kernels take bf16"):
        matmul(x, cw, plan=Plan("full", "gemv"))
    with pytest.raises(ValueError, match="unknown kernel family"):
        matmul(x, cw, plan=Plan("full", "cublas"))
    with pytest.raises(ValueError, match="features"):
        matmul(jnp.ones((2, 63)), cw)


@pytest.mark.parametrize(
    "form, pipeline", [("huffman", "full"), ("transcode", "transcode"), ("palette", "palette"), ("exponent", "exponent")]
)
def test_each_form_runs_its_own_pipeline_by_default(form, pipeline):
    cw = from_huffman(codec.compress(weight(64, 64)), form)
    assert default_plan(cw, 4, jnp.float32) == Plan(pipeline)


def test_the_pipeline_can_be_forced_from_the_environment(monkeypatch):
    cw = from_huffman(codec.compress(weight(64, 64)), "transcode")
    assert default_plan(cw, 1, jnp.float32).pipeline == "transcode"
    monkeypatch.setenv(PIPELINE_ENV, "exponent")
    assert default_plan(cw, 1, jnp.float32).pipeline == "exponent"
    monkeypatch.setenv(PIPELINE_ENV, "fastest")
    with pytest.raises(ValueError, match="UNWEIGHT_PIPELINE"):
        default_plan(cw, 1, jnp.float32)
