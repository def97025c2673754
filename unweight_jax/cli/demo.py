"""`unweight demo`: the whole job on the bundled stories260K model, start to finish.

Compress the model into a bundle, show what each tensor costs, then run the model from the bundle
and from the uncompressed bf16 weights side by side, and check that the logits are bit-identical
and the greedy story is the same token for token.
"""

from __future__ import annotations

import argparse
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np

STORY_TOKENS = 256


def bundled_model() -> Path:
    """The stories260K llama2.c checkpoint that ships inside the package."""
    return Path(str(resources.files("unweight_jax") / "data" / "stories260K.bin"))


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo",
        help="compress the bundled stories260K model and generate from the bundle",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    parser.add_argument("--out", metavar="DIR", help="where to write the bundle (default: a temporary directory)")
    parser.add_argument("-n", "--tokens", type=int, default=STORY_TOKENS, help=f"story length (default {STORY_TOKENS})")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.out:
        return _demo(Path(args.out), args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        return _demo(Path(tmp), args.tokens)


def _demo(out: Path, n_tokens: int) -> int:
    import jax.numpy as jnp

    from ..bundle import BundleReader
    from ..compress import compress_checkpoint
    from ..loading import default_form, load_bundle_model
    from ..models.generate import generate
    from ..models.loading import load_llama2c
    from ..policy import CompressionPolicy
    from .inspect import report_text

    source = bundled_model()
    out.mkdir(parents=True, exist_ok=True)
    bundle = out / "stories260K.unw.safetensors"
    print(f"1. compress {source.name} (a real trained Llama, 260K parameters) -> {bundle}")
    print("   Its weights are fp32 and the format is for bf16, so they are rounded to bf16 first (lossy, on")
    print("   request: --cast-bf16). That bf16 model is 'the uncompressed model' every check below refers to.\n")
    compress_checkpoint(
        source, bundle, policy=CompressionPolicy.default(), cast_to_bf16=True, overwrite=True, progress=False
    )
    print(report_text(BundleReader(bundle)), "\n")

    form = default_form()
    print(f"2. load both models: the bf16 reference, and the bundle with compressed layers in {form} form")
    reference = load_llama2c(source, param_dtype=jnp.bfloat16, dtype=jnp.float32)
    compressed = load_bundle_model(bundle, form=form, dtype=jnp.float32)

    ref_run = generate(reference, [[reference.config.bos_id]], n_tokens)
    ours_run = generate(compressed, [[reference.config.bos_id]], n_tokens)
    story = [reference.config.bos_id] + ref_run.tokens[0]
    tokens = jnp.asarray([story[:-1]])
    positions = jnp.arange(tokens.shape[1])[None]
    ref_logits = np.asarray(reference(tokens, positions)[0])
    our_logits = np.asarray(compressed(tokens, positions)[0])
    same_logits = ref_logits.shape == our_logits.shape and np.array_equal(
        ref_logits.view(np.uint32), our_logits.view(np.uint32)
    )
    same_tokens = ref_run.tokens == ours_run.tokens

    print(f"\n3. greedy story from BOS, {n_tokens} tokens (token ids; no tokenizer ships for this 512-token vocabulary):")
    print("  ", " ".join(map(str, ours_run.tokens[0])))
    print(f"\n   uncompressed bf16: {ref_run.tokens_per_second:8.1f} tokens/s")
    print(f"   from the bundle:   {ours_run.tokens_per_second:8.1f} tokens/s")
    print(f"   logits over the story bit-identical to the uncompressed model: {'yes' if same_logits else 'NO'}")
    print(f"   story identical to the uncompressed model's, token for token:  {'yes' if same_tokens else 'NO'}")
    return 0 if same_logits and same_tokens else 1
