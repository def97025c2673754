"""Tensor-parallel compressed Llama (`unweight_jax.sharding`) against the single-device model.

The multi-device checks need fake CPU devices, which XLA_FLAGS must request before jax starts:
they run this file as a script in a subprocess (`_worker`) that prints its measurements as JSON,
and the tests here judge them. The host-side pieces run in process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

FAKE_DEVICES = 4
TP_DEGREES = (1, 2, 4)
PROMPTS = [[1, 2, 3], [5]]
NEW_TOKENS = 6
# fp32 activations; the row-parallel psum adds the partial products in another order than one
# dot does, so logits agree to fp32 rounding, not bit for bit (measured: 2.6e-6 on logits up to ~5).
LOGITS_ATOL = 1e-4
# Per-shard palettes, escape indices and esc_exp padding make the shards' sum exceed the
# single-device palette weight a little (measured: +0.4 % at tp=2, +1.3 % at tp=4).
BYTES_RTOL = 0.02
# hidden/tp and intermediate/tp stay multiples of 64 up to tp=4, and the heads divide by 4.
CONFIG = dict(
    vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A random bf16 HF checkpoint compressed with lm_head and embeddings, so lm_head is sharded too."""
    import torch
    from models_testing import save_hf_llama

    from unweight_jax.compress import compress_checkpoint
    from unweight_jax.policy import CompressionPolicy

    root = tmp_path_factory.mktemp("tp")
    save_hf_llama(root / "hf", dtype=torch.bfloat16, **CONFIG)
    path = root / "model.unw.safetensors"
    compress_checkpoint(root / "hf", path, policy=CompressionPolicy.default(embeddings=True), progress=False)
    return path


@pytest.fixture(scope="module")
def measured(bundle) -> dict:
    env = os.environ | {"XLA_FLAGS": f"--xla_force_host_platform_device_count={FAKE_DEVICES}", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, __file__, str(bundle)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("tp", TP_DEGREES)
def test_greedy_generation_equals_the_single_device_model(measured, tp):
    assert measured[str(tp)]["tokens"] == measured["reference"]["tokens"]


@pytest.mark.parametrize("tp", TP_DEGREES)
def test_logits_agree_to_fp32_rounding(measured, tp):
    assert measured[str(tp)]["max_abs_logit_error"] <= LOGITS_ATOL


@pytest.mark.parametrize("tp", TP_DEGREES)
def test_each_device_holds_one_shard_of_every_weight(measured, tp):
    result = measured[str(tp)]
    assert result["shards_per_leaf"] == [1] * tp  # every leaf: one shard on each of tp devices
    per_device = result["bytes_per_device"]
    assert len(per_device) == tp and len(set(per_device)) == 1
    assert per_device[0] == pytest.approx(measured["reference"]["palette_bytes"] / tp, rel=BYTES_RTOL)


def test_the_generate_command_runs_tensor_parallel(measured):
    assert measured["cli_tokens"] == measured["reference"]["tokens"][0]


def test_the_generate_command_refuses_more_devices_than_there_are(bundle, capsys):
    import jax

    from unweight_jax.cli import main

    too_many = len(jax.devices()) + 1
    assert main(["generate", str(bundle), "--ids", "1,2", "-n", "2", "--tp", str(too_many)]) != 0
    err = capsys.readouterr().err
    assert f"--tp {too_many}" in err and f"needs {too_many} devices" in err


def test_loading_refuses_a_form_other_than_palette(bundle):
    from unweight_jax.loading import load_bundle_model
    from unweight_jax.sharding import tp_mesh

    with pytest.raises(ValueError, match="palette-resident"):
        load_bundle_model(bundle, form="huffman", mesh=tp_mesh(1))


def test_row_parallel_splits_must_fall_on_palette_groups():
    from unweight_jax.sharding import COLUMN, ROW, split_weight

    w = np.zeros((8, 192), ml_dtypes.bfloat16)
    assert [s.shape for s in split_weight(w, ROW, 3, "layers/0/mlp/down_proj")] == [(8, 64)] * 3
    with pytest.raises(ValueError, match=r"layers/0/mlp/down_proj: 192 input features .* tp=2 .* multiples of 64"):
        split_weight(w, ROW, 2, "layers/0/mlp/down_proj")
    with pytest.raises(ValueError, match="layers/0/mlp/up_proj: 8 output features do not split over tp=3"):
        split_weight(w, COLUMN, 3, "layers/0/mlp/up_proj")


def test_jnp_palette_decode_is_exact_with_escape_groups():
    import jax.numpy as jnp

    from unweight_jax import codec
    from unweight_jax.sharding import palette_to_bf16
    from unweight_jax.weights import escape_index

    rng = np.random.default_rng(0)
    rows, cols = 6, 2200  # 35 groups: two escape-mask words per row, and a partial last group
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[::2] *= np.exp2(rng.integers(-40, 40, (rows // 2, cols)))  # many exponents: escape groups
    w = w.astype(ml_dtypes.bfloat16)
    parts = codec.to_palette(w)
    assert 0 < len(parts.esc_groups) < rows * 35
    mask, prefix = escape_index(parts.esc_groups, rows, cols)
    got = palette_to_bf16(*map(jnp.asarray, (parts.palette, parts.idx, parts.sm, mask, prefix, parts.esc_exp)))
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), w.view(np.uint16))


def _worker(bundle: str) -> dict:
    """Runs under FAKE_DEVICES fake CPU devices: the single-device compressed model against the
    tensor-parallel one at each degree."""
    import contextlib
    import io

    import jax
    from flax import nnx

    from unweight_jax.cli import main
    from unweight_jax.layers import CompressedLinear, module_paths
    from unweight_jax.loading import load_bundle_model
    from unweight_jax.models.generate import generate
    from unweight_jax.sharding import ShardedCompressedLinear, tp_mesh

    tokens = np.random.default_rng(1).integers(0, CONFIG["vocab_size"], (2, 9))
    positions = np.broadcast_to(np.arange(9), tokens.shape)

    def logits(model) -> np.ndarray:
        graphdef, state = nnx.split(model)
        return np.asarray(jax.jit(lambda s: nnx.merge(graphdef, s)(tokens, positions)[0])(state))

    reference = load_bundle_model(bundle)  # huffman form, the `full` pipeline: bit-exact with bf16
    expected = logits(reference)
    palette = load_bundle_model(bundle, form="palette")
    results = {
        "reference": {
            "tokens": generate(reference, PROMPTS, NEW_TOKENS).tokens,
            "palette_bytes": sum(m.weight.get_value().nbytes for _, m in module_paths(palette)
                                 if isinstance(m, CompressedLinear)),
        }
    }
    for tp in TP_DEGREES:
        model = load_bundle_model(bundle, mesh=tp_mesh(tp))
        leaves = [leaf for _, m in module_paths(model) if isinstance(m, ShardedCompressedLinear)
                  for leaf in jax.tree_util.tree_leaves(m.weight.get_value())]
        per_device = {d: 0 for d in jax.devices()[:tp]}
        shards_per_leaf = np.zeros(tp, int)
        for leaf in leaves:
            for shard in leaf.addressable_shards:
                per_device[shard.device] += shard.data.nbytes
                shards_per_leaf[shard.device.id] += shard.data.shape[0]
        results[str(tp)] = {
            "tokens": generate(model, PROMPTS, NEW_TOKENS).tokens,
            "max_abs_logit_error": float(np.abs(logits(model) - expected).max()),
            "bytes_per_device": list(per_device.values()),
            "shards_per_leaf": (shards_per_leaf // len(leaves)).tolist(),
        }
    out = io.StringIO()
    ids = ",".join(map(str, PROMPTS[0]))
    with contextlib.redirect_stdout(out):
        assert main(["generate", bundle, "--ids", ids, "-n", str(NEW_TOKENS), "--tp", "2"]) == 0
    results["cli_tokens"] = next(
        [int(t) for t in line.split()[1:]] for line in out.getvalue().splitlines() if line.startswith("tokens:")
    )
    return results


if __name__ == "__main__":
    print(json.dumps(_worker(sys.argv[1])))
