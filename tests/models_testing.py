"""Shared helpers of the `test_models_*` tests: the stories260K checkpoint and small random
Hugging Face Llama checkpoints."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest

import unweight_jax

_STORIES = "stories260K.bin"


def stories_path() -> Path:
    """stories260K (llama2.c format): the repo's copy, else the shared data directory's."""
    for candidate in (Path(unweight_jax.__file__).parent / "data" / _STORIES, Path("/work/shared/data") / _STORIES):
        if candidate.is_file():
            return candidate
    pytest.skip(f"{_STORIES} is neither in unweight_jax/data nor in /work/shared/data")


def save_hf_llama(path: Path, *, seed: int = 0, max_shard_size: str | None = None, dtype=None, **config):
    """Writes a random transformers `LlamaForCausalLM` (safetensors) to `path` and returns it, in eval mode.

    Weights are redrawn away from transformers' init (which sets every norm weight to 1 and
    makes logits nearly flat), so that the comparison exercises every tensor.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    # transformers writes into the rope_scaling dict it is given: hand it a copy.
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**copy.deepcopy(config))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 1 / math.sqrt(p.shape[-1]) if "embed" not in name else 1.0)
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return model
