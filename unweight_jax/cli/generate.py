"""`unweight generate MODEL_OR_BUNDLE`: generate tokens from a bundle or a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from . import CommandError

if TYPE_CHECKING:
    from ..models.llama import Llama

DTYPES = ("float32", "bfloat16")


def token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of token ids (example: 1,345,27)") from None
    if not ids:
        raise argparse.ArgumentTypeError("a prompt needs at least one token id")
    return ids


def register(commands: argparse._SubParsersAction) -> None:
    from ..format import FORMS

    parser = commands.add_parser(
        "generate",
        help="generate text from a bundle or a checkpoint",
        description="Generate from a bundle (compressed layers run from their compressed weights), a Hugging Face "
        "directory or a llama2.c .bin file. Prompts are token ids, or text when a tokenizer.json sits beside the weights.",
    )
    parser.add_argument("model", metavar="MODEL_OR_BUNDLE")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", metavar="TEXT", action="append", help="a text prompt (repeat for a batch)")
    prompt.add_argument("--ids", metavar="IDS", type=token_ids, action="append", help="a prompt as token ids, e.g. 1,345,27 (repeat for a batch)")
    parser.add_argument("-n", "--max-new-tokens", type=int, default=64, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--form", choices=FORMS, help="resident form of compressed layers (default: palette on a GPU, huffman elsewhere)")
    parser.add_argument(
        "--tp",
        type=int,
        metavar="N",
        help="tensor-parallel degree: split the compressed layers of a bundle over the first N devices",
    )
    parser.add_argument(
        "--max-weight-memory",
        metavar="SIZE",
        help="bundles: hold all weights in at most SIZE bytes (e.g. 6.5GB, 7GiB) by making layers Huffman-resident "
        "(hard) in priority order, down projections first; see docs/LAYER_PLAN.md",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="activation dtype (default float32)")
    parser.add_argument(
        "--param-dtype",
        choices=DTYPES,
        default="float32",
        help="weight dtype for a plain checkpoint; bfloat16 rounds fp32 weights (lossy). Bundles are bf16",
    )
    parser.set_defaults(run=run)


def find_tokenizer(model: Path):
    """The `tokenizers` tokenizer in a tokenizer.json beside (or inside) the weights, or None."""
    folder = model if model.is_dir() else model.parent
    file = folder / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise CommandError(f"{file} needs the 'tokenizers' package: pip install 'unweight-jax[tools]'") from None
    return Tokenizer.from_file(str(file))


def run(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from ..loading import load_model
    from ..models.generate import generate
    from ..sharding import tp_mesh

    model_path = Path(args.model)
    if not model_path.exists():
        raise CommandError(f"{model_path}: no such model, bundle or checkpoint")
    tokenizer = find_tokenizer(model_path)
    if args.prompt and tokenizer is None:
        raise CommandError(f"--prompt needs a tokenizer.json beside {model_path}; give token ids with --ids instead")
    if args.max_new_tokens < 1:
        raise CommandError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")

    dtypes = dict(dtype=getattr(jnp, args.dtype), param_dtype=getattr(jnp, args.param_dtype))
    try:
        mesh = None if args.tp is None else tp_mesh(args.tp)
        if args.max_weight_memory is not None:
            model = _load_planned(model_path, args)
        else:
            model = load_model(model_path, form=args.form, mesh=mesh, **dtypes)
    except ValueError as e:
        if args.tp is None:
            raise
        raise CommandError(f"--tp {args.tp}: {e}") from None
    if args.prompt:
        prompts = [tokenizer.encode(text).ids for text in args.prompt]
    elif args.ids:
        prompts = args.ids
    elif model.config.bos_id is not None:
        prompts = [[model.config.bos_id]]
    else:
        raise CommandError("the model has no BOS token id: give a prompt with --ids or --prompt")
    try:
        result = generate(
            model,
            prompts,
            args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            eos_id=list(model.config.eos_ids) or None,
        )
    except ValueError as e:
        raise CommandError(str(e)) from None

    for prompt, tokens in zip(prompts, result.tokens):
        if tokenizer is not None:
            print(tokenizer.decode(prompt + tokens))
        print("tokens:", " ".join(map(str, tokens)))
    print(
        f"{sum(map(len, result.tokens))} tokens; decode {result.tokens_per_second:.1f} tokens/s "
        f"(prefill {result.prefill_seconds * 1e3:.1f} ms, compile {result.compile_seconds:.1f} s)"
    )
    return 0


def _load_planned(model_path: Path, args: argparse.Namespace) -> Llama:
    """The bundle's model with each projection in the form the --max-weight-memory plan gives it."""
    import jax.numpy as jnp

    from ..layer_plan import bundle_sizes, parse_size, plan_layers
    from ..loading import is_bundle, load_bundle_model

    if not is_bundle(model_path):
        raise CommandError(f"--max-weight-memory plans compressed layers; {model_path} is not a bundle")
    if args.form is not None or args.tp is not None:
        raise CommandError(
            "--max-weight-memory chooses each layer's form on one device; give no --form or --tp with it"
        )
    try:
        plan = plan_layers(bundle_sizes(model_path), parse_size(args.max_weight_memory, "--max-weight-memory"))
    except ValueError as e:
        raise CommandError(str(e)) from None
    print(f"layer plan: {len(plan.hard)} hard, {len(plan.forms) - len(plan.hard)} easy; "
          f"weights {plan.total_bytes} bytes, {plan.ratio:.4f} of bf16")
    return load_bundle_model(model_path, dtype=getattr(jnp, args.dtype), layer_plan=plan)
