#!/usr/bin/env bash
# On a GPU machine: the GPU tests, compute-sanitizer over them, then the side-by-side benchmark.
# Usage: bench/run_gpu.sh STAGE_DIR OUT_DIR   (STAGE_DIR holds lib/ with libkvplug.so and its
# non-system libraries, and dense_gpu_test; see README "GPU tests").
set -uo pipefail
stage=${1:-.gpu}; out=${2:-${OUT:-/tmp/kvplug-gpu}}
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/$stage/lib:${LD_LIBRARY_PATH:-}
export KVP_LIBRARY=$PWD/$stage/lib/libkvplug.so
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"
echo "== GPU tests"; "$stage/dense_gpu_test" 2>&1 | tee "$out/gpu_tests.log" | grep -E "^\[  |max\|err\||FAILED|Failure" | tail -40
tests_rc=${PIPESTATUS[0]}
if [ "${SKIP_SANITIZER:-0}" != 1 ]; then
  for tool in memcheck racecheck initcheck synccheck; do
    echo "== compute-sanitizer $tool"
    compute-sanitizer --tool $tool --error-exitcode 9 "$stage/dense_gpu_test" \
      --gtest_filter='-*LongSequence*:*RaggedBatches*' > "$out/sanitizer_$tool.log" 2>&1
    echo "rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer_$tool.log" | tail -1)"
  done
fi
echo "== benchmark"; python3 bench/gpu_bench.py --lib "$KVP_LIBRARY" --out "$out" ${BENCH_ARGS:-} 2>&1 | tail -30
echo "tests rc=$tests_rc"
