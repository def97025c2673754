"""Two processes tuning into one autotune cache at once: every entry of both survives, and the
file stays valid throughout (issue 11)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from unweight_jax.autotune import cache as cache_mod

# Each process tunes its own shape (measuring for real, writing one entry per batch), then
# writes many more entries of its own straight through the cache, so that the two overlap.
TUNER = """
import sys
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from unweight_jax import autotune, codec
from unweight_jax.autotune.cache import open_cache
from unweight_jax.weights import from_huffman

tag, rows, cache, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
w = (np.random.default_rng(rows).standard_normal((rows, 128)) * 0.02).astype(ml_dtypes.bfloat16)
autotune.tune(from_huffman(codec.compress(w), "huffman"), [1, 2, 4], progress=False, cache=cache)
store = open_cache(cache)
for i in range(extra):
    store.put(f"{tag}-{i}", {"plan": {"pipeline": "full", "kernel": "xla", "variant": 0}})
"""
EXTRA = 60


@pytest.mark.slow
def test_two_processes_tuning_at_once_lose_no_entry(tmp_path: Path) -> None:
    cache = tmp_path / "autotune.json"
    procs = [
        subprocess.Popen([sys.executable, "-c", TUNER, tag, str(rows), str(cache), str(EXTRA)], stderr=subprocess.PIPE)
        for tag, rows in (("a", 192), ("b", 320))
    ]
    reads = 0
    while any(p.poll() is None for p in procs):
        if cache.exists():
            data = json.loads(cache.read_text())  # a reader never sees a half-written file
            assert data["schema"] == cache_mod.SCHEMA
            reads += 1
    for p in procs:
        assert p.wait() == 0, p.stderr.read().decode()
    entries = json.loads(cache.read_text())["entries"]
    assert {k for k in entries if k[:2] in ("a-", "b-")} == {f"{t}-{i}" for t in "ab" for i in range(EXTRA)}
    tuned = {(e["case"]["rows"], e["case"]["batch"]) for e in entries.values() if "case" in e}
    assert tuned == {(r, b) for r in (192, 320) for b in (1, 2, 4)}
    assert reads > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["autotune.json", "autotune.json.lock"]
