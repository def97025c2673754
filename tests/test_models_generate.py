"""Generation on stories260K: compilation count, batching, EOS, seeded sampling, refusals.

Most tests share the shapes (batch 1 or 3, prompts padded to 16, a 512-slot cache) so that they
share compilations: each compilation of the model costs about a second on a CPU.
"""

from __future__ import annotations

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models_testing import stories_path
from unweight_jax.models import generate as generate_module
from unweight_jax.models.generate import generate
from unweight_jax.models.llama import Llama
from unweight_jax.models.loading import load_llama2c

MAX_LEN = 512  # the default for stories260K's 256-token test, whose compilation this shares
N = 24


@pytest.fixture(scope="module")
def model():
    return load_llama2c(stories_path(), param_dtype=jnp.float32)


@pytest.fixture(scope="module")
def prompts(model):
    """Three prompts of different lengths: BOS, and two prefixes of the greedy story."""
    story = generate(model, [[1]], 12, max_len=MAX_LEN).tokens[0]
    return [[1], [1, *story[:3]], [1, *story[:12]]]


def test_generation_compiles_once_whatever_its_length(model, monkeypatch, caplog):
    """A generation traces the model twice (the prefill, the decode loop's body) and compiles
    `_prefill` and `_decode` once each, whatever its number of tokens; more tokens on seen shapes
    trace and compile nothing."""
    traces = []
    model_call = Llama.__call__

    def counting_call(self, *args, **kwargs):
        traces.append(args[0].shape)
        return model_call(self, *args, **kwargs)

    monkeypatch.setattr(Llama, "__call__", counting_call)

    def compiled() -> list[str]:
        """Names of the functions XLA compiled, from jax's compile log."""
        found = (re.match(r"Finished XLA compilation of jit\((\w+)\)", r.getMessage()) for r in caplog.records)
        names = [m.group(1) for m in found if m]
        caplog.clear()
        return names

    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        # A 48-slot cache is used by no other test: this call starts from nothing.
        result = generate(model, [[1], [1, 2]], 3, max_len=48)
        assert [len(t) for t in result.tokens] == [3, 3]
        assert traces == [(2, 16), (2, 1)]  # the padded prompts, then one token per row
        ours = [name for name in compiled() if name in ("_prefill", "_decode")]
        assert sorted(ours) == ["_decode", "_prefill"]

        traces.clear()
        result = generate(model, [[1], [1, 3]], 33, max_len=48)
        assert [len(t) for t in result.tokens] == [33, 33]
        assert traces == [] and compiled() == []


def test_batch_equals_each_prompt_alone(model, prompts):
    batched = generate(model, prompts, N, max_len=MAX_LEN).tokens
    alone = [generate(model, [p], N, max_len=MAX_LEN).tokens[0] for p in prompts]
    assert batched == alone
    assert len({tuple(t) for t in batched}) == 3
    # The story continues the same way whatever prefix of it is the prompt.
    assert batched[1][: N - 3] == batched[0][3:N]


def test_rows_stop_at_their_first_eos(model, prompts):
    full = generate(model, prompts, N, max_len=MAX_LEN).tokens
    eos = [full[0][5], full[2][2]]
    stopped = generate(model, prompts, N, eos_id=eos, max_len=MAX_LEN).tokens
    for row, expected in zip(stopped, full):
        ends = [i for i, t in enumerate(expected) if t in eos]
        assert row == (expected[: ends[0] + 1] if ends else expected)
    assert stopped[0][-1] == eos[0] and len(stopped[0]) <= 6


def test_sampling_is_seeded(model, prompts):
    def sample(seed: int) -> list[list[int]]:
        return generate(model, prompts, N, temperature=0.9, top_p=0.95, seed=seed, max_len=MAX_LEN).tokens

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    assert first != generate(model, prompts, N, max_len=MAX_LEN).tokens


def test_tiny_top_p_is_greedy(model, prompts):
    nucleus_of_one = generate(model, prompts, N, temperature=1.0, top_p=1e-6, seed=3, max_len=MAX_LEN)
    assert nucleus_of_one.tokens == generate(model, prompts, N, max_len=MAX_LEN).tokens


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    """probs (0.4, 0.3, 0.2, 0.1), top_p 0.5: only the first two tokens, renormalised to 4:3."""
    logits = jnp.log(jnp.tile(jnp.array([0.4, 0.3, 0.2, 0.1]), (20000, 1)))
    mode = generate_module._Sampling(greedy=False, nucleus=True)
    sample = jax.jit(generate_module._sample, static_argnums=4)
    draws = np.asarray(sample(logits, jax.random.key(0), jnp.float32(1.0), jnp.float32(0.5), mode))
    counts = np.bincount(draws, minlength=4)
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] / counts.sum() - 4 / 7) < 0.015


def test_generate_refuses_bad_requests(model):
    with pytest.raises(ValueError, match="max_len 20 is too short"):
        generate(model, [[1]], 10, max_len=20)
    with pytest.raises(ValueError, match="no empty prompt"):
        generate(model, [[1], []], 4)
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        generate(model, [[1, 512]], 4)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], 4, temperature=1.0, top_p=0.0)
