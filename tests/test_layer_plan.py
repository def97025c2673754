"""The layer plan (issue 12): exact sizes, the budget and the rules, loading in the planned forms,
and outputs of a mixed plan bit-identical to the all-palette plan."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from models_testing import save_hf_llama, stories_path

from unweight_jax import codec
from unweight_jax.cli import main
from unweight_jax.compress import compress_checkpoint
from unweight_jax.format import DEFAULT_CHUNK_STEPS, GROUP, num_chunks
from unweight_jax.layer_plan import (
    EASY,
    HARD,
    ProjectionSizes,
    WeightSizes,
    bundle_sizes,
    palette_form_bytes,
    parse_size,
    plan_layers,
    transcode_form_bytes,
)
from unweight_jax.layers import CompressedLinear, module_paths
from unweight_jax.loading import load_bundle_model
from unweight_jax.models.generate import generate
from unweight_jax.policy import CompressionPolicy
from unweight_jax.weights import PaletteWeight, TranscodeWeight

# Large enough that the MLP projections are smaller hard than easy (the 2^L decoder table is paid back).
SMALL = dict(
    vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)
MLP_HARD = [(r"layers/\d+/mlp/.*", HARD), (r".*", EASY)]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    save_hf_llama(root / "hf", dtype=torch.bfloat16, **SMALL)
    path = root / "model.unw.safetensors"
    compress_checkpoint(root / "hf", path, policy=CompressionPolicy.default(), progress=False)
    return path


@pytest.fixture(scope="module")
def sizes(bundle) -> WeightSizes:
    return bundle_sizes(bundle)


def held_bytes(model) -> tuple[dict[str, int], int]:
    """Bytes of the resident arrays: per compressed projection, and of the plain parameters."""
    layers = {path: m.weight.get_value().nbytes for path, m in module_paths(model) if isinstance(m, CompressedLinear)}
    plain = sum(int(v.nbytes) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return layers, plain


def logits(model, tokens: np.ndarray) -> np.ndarray:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(model(jnp.asarray(tokens), positions)[0]).view(np.uint32)


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "text, expected",
    [("6.5GB", 6_500_000_000), ("6500MB", 6_500_000_000), ("7GiB", 7 * 2**30), ("512", 512), ("1.5 kib", 1536)],
)
def test_parse_size_reads_decimal_and_binary_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "6.5 GBs", "-1GB", "6,5GB", "1e9"])
def test_parse_size_names_the_argument_on_bad_input(text):
    with pytest.raises(ValueError, match=r"--max-weight-memory: .* is not a size"):
        parse_size(text, "--max-weight-memory")


def test_plan_holds_exactly_the_bytes_it_says_per_layer(bundle, sizes):
    plan = plan_layers(sizes, rules=[(r"layers/0/.*", HARD), (r".*/(down|q)_proj", HARD)])
    assert {HARD, EASY} == set(plan.forms.values())
    model = load_bundle_model(bundle, layer_plan=plan)
    layers, plain = held_bytes(model)
    assert layers == plan.layer_bytes()
    assert plain == sizes.plain_bytes
    assert sum(layers.values()) + plain == plan.total_bytes
    for path, module in module_paths(model):
        if isinstance(module, CompressedLinear):
            resident = {HARD: TranscodeWeight, EASY: PaletteWeight}[plan.forms[path]]
            assert isinstance(module.weight.get_value(), resident)


# ---------------------------------------------------------------- the budget


def synthetic(n_layers: int = 3) -> WeightSizes:
    """Sizes where each kind saves a different amount, so the order of the plan shows."""
    kinds = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
    projections = [
        ProjectionSizes(f"layers/{i}/{block}/{name}", (64, 64 * (1 + i)), 1000 * (1 + i), 1100 * (1 + i))
        for i in range(n_layers)
        for block, names in kinds.items()
        for name in names
    ]
    return WeightSizes("synthetic.unw.safetensors", tuple(projections), plain_bytes=5000, plain_bf16_bytes=5000)


def test_a_budget_turns_layers_hard_in_priority_order_and_no_more_than_needed():
    sizes = synthetic()
    all_easy = plan_layers(sizes, 10**9)
    assert not all_easy.hard
    # Down projections, largest first (layer 2, then 1, then 0), then up.
    order = [f"layers/{i}/mlp/{kind}" for kind in ("down_proj", "up_proj") for i in (2, 1, 0)]
    for n in range(1, len(order) + 1):
        saved = sum(100 * (1 + int(path.split("/")[1])) for path in order[:n])
        plan = plan_layers(sizes, all_easy.total_bytes - saved)
        assert plan.hard == sorted(order[:n], key=list(plan.forms).index)
        assert plan.total_bytes == all_easy.total_bytes - saved
        # One byte less needs one more hard layer: the set is the shortest prefix that fits.
        assert len(plan_layers(sizes, all_easy.total_bytes - saved - 1).hard) == n + 1


def test_attention_turns_hard_after_the_mlp_in_o_q_k_v_order():
    sizes = synthetic(n_layers=1)
    plan = plan_layers(sizes, sizes.plain_bytes + sum(p.transcode_bytes for p in sizes.projections) + 250)
    assert set(plan.hard) == {"layers/0/mlp/down_proj", "layers/0/mlp/up_proj", "layers/0/mlp/gate_proj",
                              "layers/0/self_attn/o_proj", "layers/0/self_attn/q_proj"}


def test_an_impossible_budget_names_the_budget_the_smallest_plan_and_the_file():
    sizes = synthetic()
    smallest = sizes.plain_bytes + sum(p.transcode_bytes for p in sizes.projections)
    assert len(plan_layers(sizes, smallest).hard) == len(sizes.projections)
    expected = rf"synthetic.unw.safetensors: .*budget of {smallest - 1} bytes .* holds {smallest} bytes"
    with pytest.raises(ValueError, match=expected):
        plan_layers(sizes, smallest - 1)


def test_a_layer_whose_hard_form_is_larger_stays_easy():
    tiny = ProjectionSizes("layers/0/mlp/down_proj", (8, 8), transcode_bytes=9000, palette_bytes=100)
    big = ProjectionSizes("layers/0/mlp/up_proj", (64, 64), transcode_bytes=5000, palette_bytes=6000)
    sizes = WeightSizes("x.unw.safetensors", (tiny, big), plain_bytes=0, plain_bf16_bytes=0)
    assert plan_layers(sizes, 5100).hard == ["layers/0/mlp/up_proj"]


def test_plan_layers_takes_a_budget_or_rules_and_checks_the_rules():
    sizes = synthetic(n_layers=1)
    with pytest.raises(ValueError, match="exactly one"):
        plan_layers(sizes)
    with pytest.raises(ValueError, match="exactly one"):
        plan_layers(sizes, 10, rules=[])
    with pytest.raises(ValueError, match="unknown form 'huffman'"):
        plan_layers(sizes, rules=[(".*", "huffman")])
    with pytest.raises(ValueError, match=r"layer rule '\(': not a regular expression"):
        plan_layers(sizes, rules=[("(", HARD)])
    first_wins = plan_layers(sizes, rules=[(r".*/down_proj", EASY), (r".*/mlp/.*", HARD)])
    assert sorted(first_wins.hard) == ["layers/0/mlp/gate_proj", "layers/0/mlp/up_proj"]
    assert not plan_layers(sizes, rules=[]).hard  # unmatched projections stay easy


def test_a_plan_for_another_model_is_refused(bundle):
    other = WeightSizes("other.unw.safetensors", (), plain_bytes=0, plain_bf16_bytes=0)
    with pytest.raises(ValueError, match="the layer plan for other.unw.safetensors has no projection"):
        load_bundle_model(bundle, layer_plan=plan_layers(other, rules=[]))
    with pytest.raises(ValueError, match="give no form or mesh"):
        load_bundle_model(bundle, form="palette", layer_plan=plan_layers(other, rules=[]))


# ---------------------------------------------------------------- outputs


def test_a_mixed_plan_gives_the_all_palette_plans_logits_and_tokens(bundle, sizes):
    easy = load_bundle_model(bundle, layer_plan=plan_layers(sizes, rules=[]))
    budget = plan_layers(sizes, plan_layers(sizes, rules=[]).total_bytes - 1)
    assert budget.hard == ["layers/0/mlp/down_proj"]  # same sizes: layer order
    tokens = np.random.default_rng(0).integers(0, SMALL["vocab_size"], (2, 9))
    for plan in (plan_layers(sizes, rules=MLP_HARD), budget):
        mixed = load_bundle_model(bundle, layer_plan=plan)
        np.testing.assert_array_equal(logits(mixed, tokens), logits(easy, tokens))
        assert generate(mixed, [[1, 5, 7]], 8).tokens == generate(easy, [[1, 5, 7]], 8).tokens


def test_stories260k_story_is_the_same_under_a_mixed_plan(tmp_path):
    bundle = tmp_path / "stories.unw.safetensors"
    compress_checkpoint(stories_path(), bundle, policy=CompressionPolicy.default(), cast_to_bf16=True, progress=False)
    sizes = bundle_sizes(bundle)
    easy = load_bundle_model(bundle, layer_plan=plan_layers(sizes, rules=[]))
    mixed = load_bundle_model(bundle, layer_plan=plan_layers(sizes, rules=MLP_HARD + [(r".*/o_proj", HARD)]))
    bos = easy.config.bos_id
    assert generate(mixed, [[bos]], 128).tokens == generate(easy, [[bos]], 128).tokens


# ---------------------------------------------------------------- commands


def test_inspect_prints_the_layer_plan_and_generate_follows_it(bundle, sizes, capsys):
    budget = plan_layers(sizes, rules=MLP_HARD).total_bytes
    assert main(["inspect", str(bundle), "--layer-plan", "--max-weight-memory", str(budget)]) == 0
    out = capsys.readouterr().out
    assert "layers/1/mlp/down_proj" in out and "transcode" in out and "palette" in out
    assert f"all weights {plan_layers(sizes, budget).total_bytes} bytes" in out
    assert main(["generate", str(bundle), "--ids", "1,5,7", "-n", "4", "--max-weight-memory", str(budget)]) == 0
    assert "layer plan: " in capsys.readouterr().out
    assert main(["generate", str(bundle), "--ids", "1", "--max-weight-memory", "1KB"]) == 2
    assert "a weight budget of 1000 bytes cannot be met" in capsys.readouterr().err
    assert main(["inspect", str(bundle), "--layer-plan", "--max-weight-memory", "lots"]) == 2
    assert "--max-weight-memory: 'lots' is not a size" in capsys.readouterr().err


# ---------------------------------------------------------------- Llama-3.1-8B, from shapes only

LLAMA_8B = dict(dim=4096, ffn=14336, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, vocab=128256)


def measured_rates(seed: int = 0) -> tuple[float, float, int]:
    """Stream bytes per weight, escape groups per group and the longest code, measured on a
    4096-wide block drawn as `unweight bench` draws the 8B matrices (bf16 N(0, 0.02))."""
    rng = np.random.default_rng(seed)
    block = (rng.standard_normal((512, 4096)) * 0.02).astype(ml_dtypes.bfloat16)
    parts = codec.compress(block)
    n_esc = len(codec.huffman_to_palette(parts).esc_groups)
    return parts.words.nbytes / block.size, n_esc / (block.size // GROUP), parts.max_len


def sizes_8b() -> tuple[WeightSizes, float]:
    """The 8B configuration's `WeightSizes` from its shapes and the measured rates (no 16 GB)."""
    c = LLAMA_8B
    stream_rate, escape_rate, max_len = measured_rates()
    shapes = {
        "self_attn/q_proj": (c["n_heads"] * c["head_dim"], c["dim"]),
        "self_attn/k_proj": (c["n_kv_heads"] * c["head_dim"], c["dim"]),
        "self_attn/v_proj": (c["n_kv_heads"] * c["head_dim"], c["dim"]),
        "self_attn/o_proj": (c["dim"], c["n_heads"] * c["head_dim"]),
        "mlp/gate_proj": (c["ffn"], c["dim"]),
        "mlp/up_proj": (c["ffn"], c["dim"]),
        "mlp/down_proj": (c["dim"], c["ffn"]),
    }

    def sized(path: str, shape: tuple[int, int]) -> ProjectionSizes:
        n = shape[0] * shape[1]
        n_esc = round(escape_rate * (n // GROUP))
        huffman = n + round(stream_rate * n) + 4 * num_chunks(n, DEFAULT_CHUNK_STEPS) + 2 * (1 << max_len)
        hard, easy = transcode_form_bytes(shape, huffman, n_esc), palette_form_bytes(shape, n_esc)
        return ProjectionSizes(path, shape, hard, easy)

    projections = [sized(f"layers/{i}/{k}", s) for i in range(c["n_layers"]) for k, s in shapes.items()]
    projections.append(sized("lm_head", (c["vocab"], c["dim"])))
    # Plain bf16: the embedding table and the norms (two per layer, one final).
    plain = 2 * (c["vocab"] * c["dim"] + (2 * c["n_layers"] + 1) * c["dim"])
    return WeightSizes("llama3.1-8b shapes", tuple(projections), plain, plain), escape_rate


def test_llama_8b_all_mlp_hard_attention_easy_footprint():
    sizes, escape_rate = sizes_8b()
    plan = plan_layers(sizes, rules=MLP_HARD)
    projections = sum(plan.layer_bytes().values()) / sum(p.bf16_bytes for p in sizes.projections)
    print(f"8B, all MLP hard, attention and LM head easy, escape groups {100 * escape_rate:.2f} %: "
          f"all weights {plan.total_bytes} bytes, {plan.ratio:.4f} of bf16; projections {projections:.4f} of bf16")
    assert plan.bf16_bytes == 2 * 8_030_261_248  # Llama-3.1-8B's parameter count: the shapes are right
    assert projections <= 0.70  # the target, on the compressed weights
    assert len(plan.hard) == 3 * LLAMA_8B["n_layers"]
