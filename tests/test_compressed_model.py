"""A model served from compressed weights against the same model uncompressed: bundles, resident
forms, in-memory swapping, and the `generate` and `demo` commands."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from models_testing import save_hf_llama, stories_path

from unweight_jax.cli import main
from unweight_jax.compress import compress_checkpoint
from unweight_jax.format import FORMS
from unweight_jax.layers import CompressedLinear, compress_linears, module_paths
from unweight_jax.loading import load_bundle_model, load_model
from unweight_jax.models.generate import generate
from unweight_jax.models.loading import load_hf, load_llama2c
from unweight_jax.policy import CompressionPolicy

GQA = dict(
    vocab_size=96, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
)
TIED = GQA | dict(tie_word_embeddings=True, num_key_value_heads=1)


def logits(model, tokens: np.ndarray) -> np.ndarray:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(model(jnp.asarray(tokens), positions)[0])


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint16)


@pytest.fixture(scope="module", params=[GQA, TIED], ids=["gqa", "tied"])
def hf_bundle(request, tmp_path_factory):
    """A random bf16 HF checkpoint and its bundle, with lm_head/embeddings compressed too."""
    root = tmp_path_factory.mktemp("hf")
    save_hf_llama(root / "hf", dtype=torch.bfloat16, **request.param)
    bundle = root / "model.unw.safetensors"
    compress_checkpoint(root / "hf", bundle, policy=CompressionPolicy.default(embeddings=True), progress=False)
    return root / "hf", bundle


@pytest.mark.parametrize("form", FORMS)
def test_bundle_logits_are_bit_identical_to_the_uncompressed_model(hf_bundle, form):
    hf, bundle = hf_bundle
    reference = load_hf(hf, param_dtype=jnp.bfloat16)
    compressed = load_bundle_model(bundle, form=form)
    projections = [p for p, m in module_paths(compressed) if isinstance(m, CompressedLinear)]
    assert len(projections) == 7 * reference.config.n_layers + (0 if reference.config.tie_embeddings else 1)
    tokens = np.random.default_rng(0).integers(0, reference.config.vocab_size, (2, 9))
    expected, got = logits(reference, tokens), logits(compressed, tokens)
    np.testing.assert_array_equal(bits(got), bits(expected))


def test_load_model_dispatches_on_what_the_path_is(hf_bundle, tmp_path):
    hf, bundle = hf_bundle
    assert any(isinstance(m, CompressedLinear) for _, m in module_paths(load_model(bundle)))
    assert not any(isinstance(m, CompressedLinear) for _, m in module_paths(load_model(hf)))
    with pytest.raises(FileNotFoundError, match="missing"):
        load_model(tmp_path / "missing")


def test_compress_linears_swaps_by_module_path_and_keeps_outputs(hf_bundle):
    hf, _ = hf_bundle
    reference = load_hf(hf, param_dtype=jnp.bfloat16)
    model = load_hf(hf, param_dtype=jnp.bfloat16)
    swapped = compress_linears(model, module_path=r"layers/\d+/mlp/(gate|down)_proj", form="palette")
    assert sorted(swapped) == sorted(
        f"layers/{i}/mlp/{p}" for i in range(model.config.n_layers) for p in ("gate_proj", "down_proj")
    )
    assert isinstance(model.layers[0].mlp.up_proj, type(reference.layers[0].mlp.up_proj))
    tokens = np.arange(8)[None] % model.config.vocab_size
    np.testing.assert_array_equal(bits(logits(model, tokens)), bits(logits(reference, tokens)))
    with pytest.raises(ValueError, match="no Linear layer matches"):
        compress_linears(model, module_path=r"nothing/.*")


def test_compress_linears_refuses_weights_that_are_not_bf16(hf_bundle):
    model = load_hf(hf_bundle[0], param_dtype=jnp.float32)
    with pytest.raises(TypeError, match="lossless only for bf16"):
        compress_linears(model)


def test_stories260k_story_from_the_bundle_equals_the_uncompressed_bf16_model(tmp_path):
    bundle = tmp_path / "stories.unw.safetensors"
    compress_checkpoint(stories_path(), bundle, policy=CompressionPolicy.default(), cast_to_bf16=True, progress=False)
    reference = load_llama2c(stories_path(), param_dtype=jnp.bfloat16)
    bos = reference.config.bos_id
    expected = generate(reference, [[bos]], 256).tokens
    for form in ("huffman", "palette"):
        assert generate(load_bundle_model(bundle, form=form), [[bos]], 256).tokens == expected


def test_generate_command_prints_the_greedy_tokens(hf_bundle, capsys):
    hf, bundle = hf_bundle
    reference = load_hf(hf, param_dtype=jnp.bfloat16)
    expected = generate(reference, [[1, 5, 7]], 6).tokens[0]
    assert main(["generate", str(bundle), "--ids", "1,5,7", "-n", "6"]) == 0
    out = capsys.readouterr().out
    assert f"tokens: {' '.join(map(str, expected))}" in out
    assert "tokens/s" in out


def test_generate_command_errors_are_one_line(hf_bundle, tmp_path, capsys):
    _, bundle = hf_bundle
    assert main(["generate", str(bundle), "--prompt", "hello"]) == 2
    assert "needs a tokenizer.json" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "nope.unw.safetensors")]) == 2
    assert "nope.unw.safetensors" in capsys.readouterr().err


def test_demo_runs_the_whole_job_and_checks_it(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "-n", "32"]) == 0
    out = capsys.readouterr().out
    assert "bit-identical to the uncompressed model: yes" in out
    assert "token for token:  yes" in out
    assert (tmp_path / "stories260K.unw.safetensors").is_file()
