"""The Huffman bundle of a whole Llama-3.1-8B configuration on disk, against its bf16 weights.

The weights are the ones `unweight bench` draws (bf16 N(0, 0.02) matrices, norms of ones, the
same seed gives the same tensors), generated one tensor at a time, each matrix Huffman-coded by the
C++ codec and streamed into a real bundle in a temporary directory, so host memory holds one
tensor at a time. The size is the file's, header and metadata included. A property of the format,
not of a device: it runs on any machine (about four minutes on two cores).

    python benchmarks/bundle_size.py --out benchmarks/results     # bundle_size-cpu.{json,md}
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from run_info import run_info
from unweight_jax import codec
from unweight_jax.bench.models import DTYPE, SIZE_NAMES, SIZES
from unweight_jax.bench.synthetic import normal_bf16
from unweight_jax.bundle import BundleWriter
from unweight_jax.models.loading import hf_name, model_template

TARGET_SAVING = 30.0  # issue 8: the bundle at least 30 % smaller than the bf16 weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--size", default="8b", choices=list(SIZES))
    parser.add_argument("--seed", type=int, default=0, help="as `unweight bench --seed`")
    parser.add_argument("--commit", help="the commit measured (default: git's)")
    args = parser.parse_args()

    config = SIZES[args.size]
    template = model_template(config, param_dtype=DTYPE, dtype=DTYPE)
    params = nnx.to_flat_state(nnx.state(template, nnx.Param))
    key = jax.random.key(args.seed)
    start = time.monotonic()
    bf16_bytes = matrix_bf16 = matrix_coded = 0
    with tempfile.TemporaryDirectory() as tmp:
        with BundleWriter(Path(tmp) / "model.unw.safetensors") as writer:
            for i, (path, param) in enumerate(tqdm(list(params), desc="tensors", unit="tensor")):
                shape = tuple(param.shape)
                if len(shape) == 2:  # as unweight_jax.bench.models.random_model draws them
                    value = np.asarray(normal_bf16(jax.random.fold_in(key, i), shape))
                    parts = codec.compress(value)
                    matrix_bf16 += value.nbytes
                    matrix_coded += parts.nbytes
                    writer.add(hf_name(path), parts)
                else:
                    value = np.asarray(jnp.ones(shape, DTYPE))
                    writer.add(hf_name(path), value)
                bf16_bytes += value.nbytes
        bundle_bytes = writer.path.stat().st_size
    seconds = time.monotonic() - start

    saving = 100 * (1 - bundle_bytes / bf16_bytes)
    report = {
        **run_info("bundle_size", commit=args.commit),
        "model": SIZE_NAMES[args.size],
        "weights": "bf16 N(0, 0.02) matrices, norms of ones (as unweight bench draws them)",
        "seconds": round(seconds, 1),
        "rows": [
            {
                "model": SIZE_NAMES[args.size],
                "pipeline": "huffman bundle (whole file)",
                "ours_bytes": bundle_bytes,
                "baseline_bytes": bf16_bytes,
                "baseline": "bf16 weights",
                "ratio": round(bf16_bytes / bundle_bytes, 4),
                "size_ratio": round(bundle_bytes / bf16_bytes, 4),
                "saving_percent": round(saving, 2),
                "target_saving_percent": TARGET_SAVING,
                "target_met": saving >= TARGET_SAVING,
            },
            {
                "model": SIZE_NAMES[args.size],
                "pipeline": "huffman parts of the matrices",
                "ours_bytes": matrix_coded,
                "baseline_bytes": matrix_bf16,
                "baseline": "bf16 matrices",
                "ratio": round(matrix_bf16 / matrix_coded, 4),
                "size_ratio": round(matrix_coded / matrix_bf16, 4),
            },
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "bundle_size-cpu"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    whole, matrices = report["rows"]
    table = [
        f"# bundle_size: {report['model']} ({report['weights']})",
        "",
        f"{report['date']}, commit {report['commit']}, jax {report['jax_version']}; {seconds:.0f} s.",
        "",
        "| what | bytes | bf16 bytes | size ratio | saving |",
        "|---|---|---|---|---|",
        f"| whole bundle file | {whole['ours_bytes']:,} | {whole['baseline_bytes']:,} | {whole['size_ratio']:.4f} | "
        f"{whole['saving_percent']:.2f} % (target {TARGET_SAVING:.0f} %) |",
        f"| Huffman parts of the matrices | {matrices['ours_bytes']:,} | {matrices['baseline_bytes']:,} | "
        f"{matrices['size_ratio']:.4f} | |",
    ]
    stem.with_suffix(".md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
