#!/usr/bin/env bash
# On a GPU machine with no network, from a fresh clone: build, run every GPU test and every GPU
# benchmark. Results (JSON, markdown tables, plots, logs) go to $1 (default benchmarks/results).
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-benchmarks/results}")
mkdir -p "$out"
export UNWEIGHT_CUDA=ON PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0  # no NVLink multicast: it can take a shared host's GPUs out of service
export UNWEIGHT_CUDA_ARCHITECTURES=${UNWEIGHT_CUDA_ARCHITECTURES:-90a}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}

status=0
step() {  # step NAME COMMAND...: run, log to $out/NAME.log, remember a failure, go on
  local name=$1; shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== $name failed (exit $rc)"; status=1; }
}

step build python3 -m pip install --no-build-isolation --no-deps -e . -q
step gpu_tests python3 -m pytest -q -m gpu
step demo python3 -m unweight_jax.cli demo
step decoders python3 benchmarks/decoders.py --out "$out"
step mlp_stack python3 benchmarks/mlp_stack.py --out "$out"
step gemm_shapes python3 benchmarks/gemm_shapes.py --out "$out"
step autotune python3 benchmarks/autotune.py --out "$out"
step bench python3 -m unweight_jax.cli bench --out "$out"
step side_stream python3 benchmarks/side_stream.py --out "$out"
step call_overhead python3 benchmarks/call_overhead.py --out "$out" --trace
command -v ncu > /dev/null && step profile_step python3 benchmarks/profile_step.py --out "$out"
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then  # tensor parallelism; NVLink multicast stays off
  step tensor_parallel python3 benchmarks/tensor_parallel.py --out "$out"
fi
exit $status
