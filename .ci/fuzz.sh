#!/usr/bin/env bash
# Fuzzing for CI: builds the libFuzzer harnesses of tests/fuzz with clang (Debian's clang and
# libclang-rt-dev; installed when missing) into build-fuzz, under ASan + UBSan, and runs each one
# for SECONDS (default 60) starting from its committed seed corpus (tests/fuzz/corpus/<harness>,
# copied to a scratch directory so the run does not grow the repository). Fails on any crash,
# sanitizer report, leak, FUZZ_CHECK failure or hang (> 25 s on one input); the input that failed is
# written to build-fuzz/artifacts/.
#
#   config         backend config parsing, FlatBuffers binary and JSON (kvp_config_check,
#                  kvp_attention_create, and a run with the parsed config)
#   block_manager  call sequences on the block manager and KV cache ABI, with the engine's K/V
#                  bookkeeping and the invariants observable through the ABI checked after each call
#   dlpack         DLPack tensor validation: arbitrary shapes, strides, dtypes, devices and byte
#                  offsets on every tensor argument, over memory exactly as large as the tensor spans
#   batch          batch descriptions with phase markers (context_lens, query_pos_starts) against
#                  Star configs (blocks, anchors, shards) and dense: accepted batches run in bounds
#
# Usage: .ci/fuzz.sh [SECONDS] [harness...]   (default: 60, all four). KVP_JOBS sets build jobs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

secs=${1:-60}
shift || true
harnesses=("$@")
[ ${#harnesses[@]} -gt 0 ] || harnesses=(config block_manager dlpack batch)
jobs=${KVP_JOBS:-2}

packages=(cmake make clang libclang-rt-dev libflatbuffers-dev flatbuffers-compiler libabsl-dev libfmt-dev
          libdlpack-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "kvplug fuzz: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

start=$(date +%s)
cmake -S tests/fuzz -B build-fuzz -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ >/dev/null
cmake --build build-fuzz -j"$jobs" --target "${harnesses[@]/%/_fuzzer}"
echo "== fuzzers built ($(( $(date +%s) - start )) s)"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir -p build-fuzz/artifacts
summary=()
status=0
for h in "${harnesses[@]}"; do
  mkdir -p "$scratch/$h"
  cp tests/fuzz/corpus/"$h"/* "$scratch/$h/"
  args=(-max_total_time="$secs" -timeout=25 -print_final_stats=1 -artifact_prefix="build-fuzz/artifacts/$h-")
  case "$h" in
    config) args+=(-dict=tests/fuzz/config.dict) ;;
    block_manager) args+=(-max_len=512) ;;  # up to ~170 operations per input
  esac
  echo "== $h: ${secs} s"
  log="$scratch/$h.log"
  if ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
       "build-fuzz/${h}_fuzzer" "${args[@]}" "$scratch/$h" >"$log" 2>&1; then
    result=ok
  else
    result=FAILED
    status=1
    tail -n 60 "$log"
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  corpus=$(find "$scratch/$h" -type f | wc -l)
  summary+=("$(printf '%-14s %-6s %12s executions %8s exec/s %6s corpus files' "$h" "$result" "${execs:-?}" "${rate:-?}" "$corpus")")
done
echo "== fuzzing summary ($(( $(date +%s) - start )) s)"
printf '%s\n' "${summary[@]}"
exit $status
