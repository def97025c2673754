"""The autotuner on the CPU: key, buckets, candidates and pruning, modes and forcing, the cache,
choosing while a model is traced, and the `unweight tune` / `inspect --plan` commands.

Fused-kernel candidates exist only on a Hopper GPU; the tests that enumerate them pretend to be
one (`fake_gpu`) and never run a kernel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from unweight_jax import autotune, codec, pipelines
from unweight_jax.autotune import cache as cache_mod
from unweight_jax.autotune import candidates, tuner
from unweight_jax.autotune.candidates import FAMILIES, FORM_PIPELINES, OWN_PIPELINE, label, prune, runnable
from unweight_jax.autotune.key import BUCKET_CAP, Case, batch_bucket, key_text, this_machine
from unweight_jax.cli import main as cli_main
from unweight_jax.format import FORMS
from unweight_jax.layers import CompressedLinear
from unweight_jax.ops import gemm, gemv, registry
from unweight_jax.pipelines import Plan, dense
from unweight_jax.weights import from_huffman

STORIES = Path(__file__).resolve().parents[1] / "unweight_jax" / "data" / "stories260K.bin"


def compressed(form: str, rows: int = 256, cols: int = 128):
    w = (np.random.default_rng(0).standard_normal((rows, cols)) * 0.02).astype(ml_dtypes.bfloat16)
    return from_huffman(codec.compress(w), form)


def gemv_plan(name: str, pipeline: str = "palette") -> Plan:
    return Plan(pipeline, "gemv", gemv.VARIANTS[name].id)


def gemm_plan(name: str, pipeline: str = "palette") -> Plan:
    return Plan(pipeline, "gemm", gemm.VARIANTS[name].id)


@pytest.fixture(autouse=True)
def fresh_tuner(tmp_path, monkeypatch):
    """Every test: its own cache file, no mode set by the API, nothing remembered from another test."""
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "autotune.json"))
    autotune.forget()
    yield
    autotune.set_mode(None)
    autotune.forget()


@pytest.fixture
def tuning_on():
    autotune.set_mode("on")


@pytest.fixture
def fake_gpu(monkeypatch):
    """Fused kernels reported as available (their supports() rules apply), as on a Hopper GPU."""
    monkeypatch.setattr(registry, "hopper_available", lambda targets: True)

    def fused_kernels(pipeline, rows, cols, batch):
        if pipeline == "full":
            return ()
        return tuple(f for f, module in FAMILIES.items() if module.supports(rows, cols, batch))

    monkeypatch.setattr(pipelines, "fused_kernels", fused_kernels)


@pytest.fixture
def measurements(monkeypatch):
    """Counts the tuner's measurements (each still runs)."""
    calls = []
    real = tuner.measure

    def counted(case, plans):
        calls.append(case)
        return real(case, plans)

    monkeypatch.setattr(tuner, "measure", counted)
    return calls


def fake_timings(monkeypatch, ms_of) -> list[Plan]:
    """The Bench answers `ms_of(plan)` without running anything; returns the plans timed, in order."""
    timed = []

    class FakeBench:
        def __init__(self, case, budget):
            self.budget = budget

        def prepare(self, plans):
            pass

        def time_ms(self, plan, calls=None):
            timed.append(plan)
            return ms_of(plan)

        def call_ms(self, plan):
            return ms_of(plan)

    monkeypatch.setattr(tuner, "Bench", FakeBench)
    return timed


# ------------------------------------------------------------------------------------ key


def test_batch_buckets_are_powers_of_two_up_to_the_cap():
    assert [batch_bucket(b) for b in (1, 2, 3, 4, 5, 16, 17, 2048, 2049)] == [1, 2, 4, 4, 8, 16, 32, 2048, 4096]
    assert batch_bucket(BUCKET_CAP) == batch_bucket(10 * BUCKET_CAP) == BUCKET_CAP
    for bad in (0, -1, 1.5, True, "4"):
        with pytest.raises(ValueError, match="batch must be a positive integer"):
            batch_bucket(bad)


def test_the_key_is_the_same_in_another_process():
    case = Case.of(compressed("transcode"), 3, jnp.bfloat16)
    assert case == Case(256, 128, "transcode", "bfloat16", 4, 512)
    here = key_text(this_machine(), case)
    code = (
        "from unweight_jax.autotune.key import Case, key_text, this_machine;"
        "print(key_text(this_machine(), Case(256, 128, 'transcode', 'bfloat16', 4, 512)))"
    )
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert there == here
    for part in ("jax=", "jaxlib=", "unweight_jax=", "build=", "256x128;transcode;chunk=512;x=bfloat16;batch=4"):
        assert part in here


def test_keys_differ_by_form_dtype_and_bucket():
    m = this_machine()
    base = Case(256, 128, "palette", "bfloat16", 4)
    others = [Case(128, 256, "palette", "bfloat16", 4), Case(256, 128, "huffman", "bfloat16", 4, 512),
              Case(256, 128, "palette", "float32", 4), Case(256, 128, "palette", "bfloat16", 8)]
    assert len({key_text(m, c) for c in [base, *others]}) == 5


# ------------------------------------------------------------------------------------ candidates


@pytest.mark.parametrize("form", FORMS)
def test_form_tables_agree_with_the_pipelines(form):
    w = compressed(form)
    assert FORM_PIPELINES[form] == pipelines.pipelines_for(w)
    autotune.set_mode("off")
    assert pipelines.default_plan(w, 4, jnp.float32) == Plan(OWN_PIPELINE[form])


def test_without_fused_kernels_the_candidates_are_each_pipelines_decode_and_dot():
    # fp32 activations: no fused kernel, as on the CPU
    assert runnable(FORM_PIPELINES["transcode"], 256, 128, 4, jnp.float32) == [
        Plan("full"), Plan("exponent"), Plan("transcode")
    ]
    assert runnable(FORM_PIPELINES["palette"], 256, 128, 4, jnp.float32) == [Plan("palette")]


def test_fused_candidates_and_pruning(fake_gpu):
    def family(module, batch, names=None):
        plan = gemv_plan if module is gemv else gemm_plan
        return [plan(n) for n in names or module.VARIANTS if module.supports(4096, 4096, batch, n)]

    at = {b: prune(runnable(("palette",), 4096, 4096, b, jnp.bfloat16), b) for b in (1, 16, 32, 64)}
    assert at[1] == [Plan("palette"), *family(gemv, 1)]  # no GEMM tile is at least 1/4 used
    # GEMM tiles of N batch rows from N/4 on
    assert at[16] == [Plan("palette"), *family(gemv, 16), *family(gemm, 16, ["n64_s8"])]
    assert at[32] == [Plan("palette"), *family(gemm, 32, ["n128_s6", "n64_s8"])]  # the GEMV stops at 16
    assert at[64] == [Plan("palette"), *family(gemm, 64)]
    assert gemv_plan("fma") in at[1] and gemv_plan("fma") not in at[16]
    # activations that are not bf16 leave only the decode + dot plans
    assert runnable(("palette",), 4096, 4096, 1, jnp.float32) == [Plan("palette")]


def test_first_pass_takes_the_static_variant_first(fake_gpu):
    plans = prune(runnable(("palette",), 4096, 4096, 1, jnp.bfloat16), 1)
    first, held = candidates.split_passes(plans, 1)
    assert first == [Plan("palette"), gemv_plan("stream_w8"), gemv_plan("rows2")]
    static = ("stream_w8", "rows2", "mma_acc4")  # the static variants covering batch 1, in order
    assert held == [gemv_plan("mma_acc4")] + [gemv_plan(n) for n in gemv.VARIANTS if n not in static]


def test_static_plans_follow_the_table(fake_gpu):
    batches = (1, 2, 16, 32, 64, 128, 256)
    static = {b: label(candidates.static_plan("palette", 4096, 4096, b, jnp.bfloat16)) for b in batches}
    assert static == {
        1: "palette/gemv:stream_w8", 2: "palette/gemv:stream_w8", 16: "palette/gemv:stream_w8",
        32: "palette/gemm:n64_s8", 64: "palette/gemm:n64_s8", 128: "palette/gemm:n128_s6",
        256: "palette/gemm:n256_s4",
    }
    assert candidates.static_plan("palette", 4096, 4096, 1, jnp.float32) == Plan("palette")


def test_static_plans_fall_back_where_the_stream_gemv_does_not_run(fake_gpu, monkeypatch):
    monkeypatch.setattr(registry, "hopper_available", lambda targets: False)  # an sm_80 GPU
    static = {b: label(candidates.static_plan("palette", 4096, 4096, b, jnp.bfloat16)) for b in (1, 2, 16)}
    assert static == {1: "palette/gemv:rows2", 2: "palette/gemv:mma_acc4", 16: "palette/gemv:mma_acc4"}


def test_the_second_pass_refines_only_families_near_the_best(fake_gpu, monkeypatch):
    ms = {Plan("palette"): 10.0, gemv_plan("mma_acc4"): 2.0, gemv_plan("mma"): 2.1, gemv_plan("fma"): 1.9}
    timed = fake_timings(monkeypatch, lambda p: ms.get(p, 3.0))
    plans = prune(runnable(("palette",), 4096, 4096, 1, jnp.bfloat16), 1)
    choice, times = tuner.measure(Case(4096, 4096, "palette", "bfloat16", 1), plans)
    assert choice == gemv_plan("fma")
    assert set(timed) == set(plans)  # the GEMV family was near the best: its held variants were timed
    ms = {Plan("palette"): 1.0}  # decode + dot far ahead: no held GEMV variant is timed
    timed.clear()
    choice, _ = tuner.measure(Case(4096, 4096, "palette", "bfloat16", 1), plans)
    assert choice == Plan("palette")
    assert timed == candidates.split_passes(plans, 1)[0]


# ------------------------------------------------------------------------------------ modes and forcing


def test_off_and_cache_only_never_measure(measurements, monkeypatch):
    w = compressed("huffman")
    autotune.set_mode("off")
    assert autotune.choose(w, 4, jnp.float32) == Plan("full")
    autotune.set_mode(None)
    monkeypatch.setenv(autotune.MODE_ENV, "cache-only")
    assert autotune.choose(w, 4, jnp.float32) == Plan("full")
    assert measurements == []
    assert not autotune.cache_path().exists()


def test_bad_settings_name_themselves(monkeypatch):
    w = compressed("huffman")
    monkeypatch.setenv(autotune.MODE_ENV, "sometimes")
    with pytest.raises(ValueError, match="UNWEIGHT_AUTOTUNE='sometimes'"):
        autotune.choose(w, 1, jnp.float32)
    monkeypatch.delenv(autotune.MODE_ENV)
    monkeypatch.setenv(autotune.VARIANT_ENV, "gemv:fastest")
    with pytest.raises(ValueError, match="UNWEIGHT_VARIANT='gemv:fastest'.*gemv:mma_acc4"):
        autotune.choose(w, 1, jnp.float32)
    with pytest.raises(ValueError, match="set_mode"):
        autotune.set_mode("always")
    with pytest.raises(ValueError, match="needs a plan"):
        with autotune.forced():
            pass


def test_forcing_a_plan_a_pipeline_or_a_variant(tuning_on, measurements, fake_gpu, monkeypatch):
    w = compressed("transcode")
    with autotune.forced(Plan("exponent")):
        assert autotune.choose(w, 4, jnp.float32) == Plan("exponent")
    with autotune.forced(pipeline="exponent"):
        assert autotune.choose(w, 4, jnp.float32) == Plan("exponent")
    with autotune.forced(pipeline="palette"):  # not a pipeline of this form: its own one, statically
        assert autotune.choose(w, 4, jnp.float32) == Plan("transcode")
    palette = compressed("palette")
    with autotune.forced(variant="gemv:mma"):
        assert autotune.choose(palette, 4, jnp.bfloat16) == gemv_plan("mma")
        assert autotune.choose(palette, 256, jnp.bfloat16) == gemm_plan("n256_s4")  # no GEMV there: static
    monkeypatch.setenv(autotune.VARIANT_ENV, "gemv:fma")
    assert autotune.choose(palette, 2, jnp.bfloat16) == gemv_plan("fma")
    monkeypatch.delenv(autotune.VARIANT_ENV)
    monkeypatch.setenv(pipelines.PIPELINE_ENV, "exponent")
    assert autotune.choose(w, 4, jnp.float32) == Plan("exponent")
    assert measurements == []


# ------------------------------------------------------------------------------------ choosing and the cache


def test_the_cpu_picks_the_fastest_cpu_path_and_caches_it(tuning_on, monkeypatch):
    fake_timings(monkeypatch, {Plan("full"): 2.0, Plan("exponent"): 1.0}.__getitem__)
    w = compressed("huffman")
    assert autotune.choose(w, 3, jnp.float32) == Plan("exponent")
    (entry,) = json.loads(autotune.cache_path().read_text())["entries"].values()
    assert entry["label"] == "exponent" and entry["times_ms"] == {"exponent": 1.0, "full": 2.0}
    assert entry["case"]["batch"] == 4 and entry["date"]


def test_a_single_candidate_is_not_measured(tuning_on, measurements):
    assert autotune.choose(compressed("palette"), 4, jnp.float32) == Plan("palette")
    assert measurements == [] and not autotune.cache_path().exists()


def test_a_warm_cache_measures_nothing_and_gives_the_same_plan(tuning_on, measurements):
    w = compressed("transcode")
    cold = autotune.choose(w, 8, jnp.float32)
    assert len(measurements) == 1
    saved = autotune.cache_path().read_bytes()
    autotune.cache_path().unlink()
    assert autotune.choose(w, 8, jnp.float32) == cold  # from memory: the file is not read again
    autotune.cache_path().write_bytes(saved)
    autotune.forget()  # as a new process: only the file remains
    assert autotune.choose(w, 8, jnp.float32) == cold
    assert autotune.choose(w, 5, jnp.float32) == cold  # same bucket
    assert len(measurements) == 1
    autotune.set_mode("cache-only")
    autotune.forget()
    assert autotune.choose(w, 8, jnp.float32) == cold


def test_tracing_a_model_tunes_each_case_once_and_compiles_once(tuning_on, measurements):
    layers = [CompressedLinear(compressed("huffman"), dtype=jnp.float32) for _ in range(3)]
    traces = []

    @jax.jit
    def model(x):
        traces.append(1)
        for layer in layers:
            x = layer(x[..., :128])
        return x

    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 2, 128)), jnp.float32)
    y = model(x)
    model(x + 1)
    assert len(traces) == 1 and len(measurements) == 1  # three layers, one case
    (entry,) = json.loads(autotune.cache_path().read_text())["entries"].values()
    assert entry["label"] in ("full", "exponent")
    ref = x
    for layer in layers:
        ref = dense(ref[..., :128], pipelines.decompress(layer.weight.get_value()))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))


def test_a_corrupt_or_foreign_cache_is_set_aside_with_a_warning(tuning_on, measurements):
    path = autotune.cache_path()
    w = compressed("huffman")
    for content in ("{not json", json.dumps({"schema": "other"}),
                    json.dumps({"schema": cache_mod.SCHEMA, "version": 99, "entries": {}})):
        autotune.forget()
        path.write_text(content)
        with pytest.warns(UserWarning, match=str(path)):
            autotune.choose(w, 1, jnp.float32)
        assert json.loads(path.read_text())["version"] == cache_mod.VERSION
        path.unlink()
    aside = sorted(p.read_text() for p in path.parent.glob(path.name + ".corrupt-*"))
    assert len(aside) == 3 and "{not json" in aside


def test_a_cached_plan_that_cannot_run_is_measured_again(tuning_on, measurements):
    w = compressed("huffman")
    key = key_text(this_machine(), Case.of(w, 1, jnp.float32))
    cache_mod.open_cache().put(key, {"plan": {"pipeline": "palette", "kernel": "gemm", "variant": 0}})
    autotune.choose(w, 1, jnp.float32)
    assert len(measurements) == 1


# ------------------------------------------------------------------------------------ commands


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from unweight_jax.compress import compress_checkpoint

    out = tmp_path_factory.mktemp("bundle") / "stories.unw.safetensors"
    compress_checkpoint(STORIES, out, cast_to_bf16=True, progress=False)
    return out


def test_unweight_tune_writes_its_table_json_and_heat_map(bundle, tmp_path, capsys):
    cache = tmp_path / "tuned.json"
    out = tmp_path / "o"
    args = ["--form", "huffman", "--cache", str(cache)]  # huffman: the form a GPU would not pick
    assert cli_main(["tune", str(bundle), "--batch", "1,3", "--out", str(out), *args]) == 0
    printed = capsys.readouterr().out
    assert "| matrix | form | batch | chosen plan |" in printed and "| 172x64 | huffman | 4 |" in printed
    report = json.loads((out / "tune.json").read_text())
    assert {(r["matrix"], r["batch"]) for r in report["rows"]} == {
        (m, b) for m in ("64x64", "32x64", "172x64", "64x172") for b in (1, 4)
    }
    assert all(r["plan_ms"] > 0 and r["decode_ms"] > 0 for r in report["rows"])
    assert (out / "tune.md").read_text().count("\n| ") == 9
    assert (out / "tune.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads(cache.read_text())["entries"]) == 8

    assert cli_main(["inspect", str(bundle), "--plan", "--batch", "1,16", *args]) == 0
    listing = capsys.readouterr().out.splitlines()
    gate = next(line for line in listing if line.startswith("model.layers.0.mlp.gate_proj.weight"))
    tuned = json.loads(cache.read_text())["entries"]
    gate_label = next(e["label"] for e in tuned.values() if e["case"]["rows"] == 172 and e["case"]["batch"] == 1)
    assert gate.split()[3] == gate_label and "untuned (static: full)" in gate


def test_unweight_tune_refuses_bad_batches(bundle, capsys):
    assert cli_main(["tune", str(bundle), "--batch", "1,0"]) == 2
    assert "--batch '1,0'" in capsys.readouterr().err
