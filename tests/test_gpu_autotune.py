"""The autotuner on a GPU: an 8B-shaped palette weight tunes to fused plans, and the choices
come back from the cache file with no measurement."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from unweight_jax import autotune
from unweight_jax.autotune import tuner
from unweight_jax.autotune.measure import synthetic_parts
from unweight_jax.pipelines import decompress, dense, matmul
from unweight_jax.weights import from_huffman


@pytest.mark.gpu
def test_an_8b_palette_weight_tunes_to_fused_plans_and_the_cache_round_trips(tmp_path, monkeypatch):
    cache = tmp_path / "autotune.json"
    w = from_huffman(synthetic_parts(14336, 4096, 512), "palette")
    autotune.set_mode("on")
    autotune.forget()
    try:
        tuned = {b: autotune.choose(w, b, jnp.bfloat16, cache=cache) for b in (1, 256)}
        assert all(plan.kernel in ("gemv", "gemm") for plan in tuned.values()), tuned
        entries = json.loads(cache.read_text())["entries"]
        assert sorted(e["case"]["batch"] for e in entries.values()) == [1, 256]

        autotune.forget()  # as a new process: only the file remains
        monkeypatch.setattr(tuner, "measure", lambda *_: pytest.fail("a warm cache measured"))
        assert {b: autotune.choose(w, b, jnp.bfloat16, cache=cache) for b in (1, 256)} == tuned

        x = jnp.asarray(np.random.default_rng(0).standard_normal((256, 4096)), jnp.bfloat16)
        want = np.asarray(dense(x, decompress(w)), np.float32)
        got = np.asarray(matmul(x, w, plan=tuned[256]), np.float32)
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
    finally:
        autotune.set_mode(None)
        autotune.forget()
