#!/usr/bin/env bash
# Sanitizer builds for CI (CPU only, g++, 2 cores: about 10 minutes from a clean tree).
#
#  1. build-asan: -DKVP_SANITIZE=address,undefined. Builds the library and every CPU test, then runs
#     the whole CPU ctest suite (-LE gpu) under ASan (detect_leaks=1) and UBSan (halt_on_error=1,
#     print_stacktrace=1). The ABI tests dlopen libkvplug.so: both the library and the test
#     executables are instrumented (KVP_SANITIZE applies to every target), so the executable carries
#     the ASan runtime the library needs. The long block-manager model test runs 2^15 operations per
#     pool here (KVP_MODEL_OPS) instead of 2^19: ASan+UBSan make it ~10x slower, and the normal build
#     runs the full count. The fault-injection test runs here with leak detection on.
#  2. build-tsan: -DKVP_SANITIZE=thread. Builds only the library and the three test executables that
#     use threads, and runs only the tests that exercise concurrency: the Concurrency.* suite
#     (tests/abi/concurrency_test.cc: handle sets per thread, shared read-only attention/plan/cache,
#     one context's thread pool under concurrent runs, concurrent read-only block-manager queries,
#     thread-local kvp_last_error, config parsing from many threads), ThreadPool.* and the dense
#     backend's multi-threaded test. Everything else is single-threaded: TSan would add build time,
#     not coverage.
#
# Usage: .ci/sanitize.sh [asan|tsan|all]   (default all). KVP_JOBS (default 2) sets the build jobs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

what=${1:-all}
jobs=${KVP_JOBS:-2}
# -O1 -g1: sanitizer builds compile about twice as fast as at -O2 -g, keep line numbers in reports,
# and keep asserts on.
common=(-DKVP_ENABLE_CUDA=OFF -DKVP_BUILD_BENCH=OFF -DCMAKE_BUILD_TYPE=Debug "-DCMAKE_CXX_FLAGS_DEBUG=-O1 -g1")
start=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - start )) s)"; }

if [ "$what" = asan ] || [ "$what" = all ]; then
  stamp "ASan+UBSan: configure and build (build-asan)"
  cmake -S . -B build-asan "${common[@]}" -DKVP_SANITIZE=address,undefined >/dev/null
  cmake --build build-asan -j"$jobs"
  stamp "ASan+UBSan: ctest -LE gpu"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:strict_string_checks=1:detect_stack_use_after_return=1 \
  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  KVP_MODEL_OPS=32768 \
    ctest --test-dir build-asan -LE gpu -j"$jobs" --output-on-failure --no-tests=error
fi

if [ "$what" = tsan ] || [ "$what" = all ]; then
  stamp "TSan: configure and build (build-tsan)"
  cmake -S . -B build-tsan "${common[@]}" -DKVP_SANITIZE=thread >/dev/null
  cmake --build build-tsan -j"$jobs" --target kvplug concurrency_test batch_plan_test dense_cpu_test
  stamp "TSan: concurrency tests"
  # TSan maps its shadow memory at fixed addresses; with a high mmap randomization its runtime can
  # fail to start ("unexpected memory mapping"): then run without address randomization.
  run=()
  if [ "$(cat /proc/sys/vm/mmap_rnd_bits 2>/dev/null || echo 0)" -gt 28 ] && command -v setarch >/dev/null; then
    run=(setarch "$(uname -m)" -R)
  fi
  TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 \
    "${run[@]}" ctest --test-dir build-tsan -j"$jobs" --output-on-failure --no-tests=error \
      -R '^(Concurrency\.|ThreadPool\.|DenseCpu\.RandomRaggedBatchesSingleAndMultiThreaded)'
fi
stamp "sanitizers passed"
