"""`unweight bench` end to end on the CPU at the tiny size: the files it writes, their schema
(DESIGN.md section 6), the footprint, a case that does not fit, and a tensor-parallel run on two
fake devices (in a subprocess: XLA_FLAGS must be set before jax starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from unweight_jax.bench.footprint import DeviceMemory
from unweight_jax.bench.run_info import device_tag
from unweight_jax.cli import main

SCHEMA = ("benchmark", "device", "driver", "jax_version", "date", "commit", "rows")
ROW_SCHEMA = ("batch", "model", "pipeline", "ours_ms", "baseline_ms", "baseline", "ratio")
# The tiny model's KV cache at this context needs ~5 TB: more than any machine's free memory.
HUGE_CONTEXT = 10**10
FAST = ["--steps", "2", "--reps", "1"]
# The files a run in this process writes are named after its device (bench-cpu.* in CI).
STEM = "bench-" + device_tag(jax.devices()[0].device_kind)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    args = ["bench", "--size", "tiny", "--batch", "1,2", "--context", f"32,{HUGE_CONTEXT}", "--out", str(out), *FAST]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")  # the command sets it when unset; keep it local
        assert main(args) == 0
    return json.loads((out / f"{STEM}.json").read_text()), out


def test_writes_json_markdown_and_plot(bench):
    report, out = bench
    assert {p.name for p in out.iterdir()} == {f"{STEM}.json", f"{STEM}.md", f"{STEM}.png"}
    assert (out / f"{STEM}.png").read_bytes().startswith(b"\x89PNG")
    table = (out / f"{STEM}.md").read_text()
    assert "| 2 | 32 |" in table and "## MLP stack alone" in table


def test_json_has_the_shared_schema(bench):
    report, _ = bench
    assert all(key in report for key in SCHEMA) and report["benchmark"] == "bench"
    assert [(r["batch"], r["context"]) for r in report["rows"]] == [(1, 32), (2, 32)]
    for row in report["rows"]:
        assert all(key in row for key in ROW_SCHEMA)
        assert row["baseline"] == "xla_bf16" and row["model"] == "llama-tiny"
        assert row["ratio"] == pytest.approx(row["baseline_ms"] / row["ours_ms"], rel=1e-2)
        assert row["tokens_per_s"] == pytest.approx(row["batch"] / row["ours_ms"] * 1e3, rel=1e-2)
        assert 0 < row["weight_bytes_per_step"] < row["baseline_weight_bytes_per_step"]
    assert [r["batch"] for r in report["mlp_stack"]["rows"]] == [1, 2]


def test_compressed_and_bf16_choose_the_same_tokens(bench):
    # On the CPU a palette layer decodes to the very bf16 matrix and runs XLA's dot: bit-identical.
    report, _ = bench
    assert [r["tokens_agree"] for r in report["rows"]] == [1.0, 1.0]


def test_footprint_is_measured(bench):
    report, _ = bench
    f = report["footprint"]
    # The CPU keeps no allocator statistics: there the bytes of the arrays are counted.
    expected = "array bytes" if jax.default_backend() == "cpu" else "device bytes_in_use"
    assert f["method"] == DeviceMemory(jax.devices()[:1]).method == expected
    assert 0 < f["compressed_weights_bytes"] < f["bf16_weights_bytes"] == f["bf16_checkpoint_bytes"]
    assert f["weights_saving_percent"] == pytest.approx(100 * (1 - f["compressed_weights_bytes"] / f["bf16_weights_bytes"]), abs=0.01)
    assert 0 < f["bundle_bytes"] < 0.75 * f["bf16_checkpoint_bytes"]  # a real bundle, Huffman-coded
    assert f["bundle_target_met"] == (f["bundle_saving_percent"] >= 30)


def test_a_case_that_does_not_fit_is_reported_with_its_bytes(bench):
    report, out = bench
    assert [(r["batch"], r["context"]) for r in report["not_run"]] == [(1, HUGE_CONTEXT), (2, HUGE_CONTEXT)]
    for row in report["not_run"]:
        assert row["reason"].startswith("does not fit")
        # keys and values of 2 layers x 2 KV heads x 32 dims in bf16, for every slot
        assert row["kv_cache_bytes_needed"] > 2 * 2 * 2 * 32 * 2 * row["batch"] * HUGE_CONTEXT
    assert f"| 1 | {HUGE_CONTEXT} | not run: does not fit" in (out / f"{STEM}.md").read_text()


def test_bad_arguments_are_refused_with_a_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")
    assert main(["bench", "--size", "tiny", "--tp", "3", "--out", str(tmp_path)]) == 2
    assert "--tp 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--batch", "1,x"])
    assert "not a comma-separated list" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--pipeline", "palette/gemv:nosuch"])
    assert "unknown gemv variant 'nosuch'" in capsys.readouterr().err


def test_tensor_parallel_on_two_fake_devices(tmp_path):
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "unweight_jax.cli", "bench", "--size", "tiny", "--tp", "2", "--batch", "2",
               "--context", "32", "--no-mlp-stack", "--out", str(tmp_path), *FAST]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "bench-cpu.json").read_text())
    assert report["tp"] == 2
    (row,) = report["rows"]
    assert row["tokens_agree"] == 1.0 and row["allreduce_ms"] > 0
    # Each device's shard of the tiny model (dim 128, hidden 256, 4 heads and 2 KV heads of 32, vocab
    # 512) at tp 2: q, gate/up and down, k/v, o, lm_head; on the CPU each runs decode + XLA's dot.
    assert row["plans"] == {f"shard {s}": "palette" for s in ("64x128", "128x128", "32x128", "128x64", "256x128")}
    assert "all-reduce ms" in (tmp_path / "bench-cpu.md").read_text()


def test_a_given_bundle_is_benchmarked_as_it_is(tmp_path, monkeypatch):
    from unweight_jax.bench.footprint import write_bundle
    from unweight_jax.bench.models import TINY, random_model

    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")
    bundle = tmp_path / "tiny.unw.safetensors"
    write_bundle(random_model(TINY, seed=3), bundle)
    out = tmp_path / "out"
    assert main(["bench", "--bundle", str(bundle), "--batch", "2", "--context", "16", "--no-mlp-stack",
                 "--skip-disk", "--out", str(out), *FAST]) == 0
    report = json.loads((out / f"{STEM}.json").read_text())
    assert report["model"] == "tiny" and report["source"] == "bundle tiny.unw.safetensors"
    assert report["footprint"]["bundle_bytes"] == bundle.stat().st_size  # a given bundle is measured as it is
    assert [r["tokens_agree"] for r in report["rows"]] == [1.0]
