#!/usr/bin/env bash
# On a GPU machine: the research backends' GPU checks and benchmarks (Star, entropy), peers in the
# same job.
#   bench/run_backends_gpu.sh STAGE OUT tests   the GPU tests (variant family incl. the Star planner,
#                                            communicators incl. NCCL with one rank, dense through the
#                                            ABI), compute-sanitizer memcheck/racecheck over the
#                                            variant, kv_shift, comm and attamba tests, and the demo
#   bench/run_backends_gpu.sh STAGE OUT bench   bench/star_bench.py, ../shared/tools/star-peers.py,
#                                               bench/entropy_bench.py, bench/kv_shift_bench.py
#   bench/run_backends_gpu.sh STAGE OUT attamba attamba's GPU test (every head size built), then
#                                            bench/attamba_gpu_bench.py (KV bytes per token, decode vs
#                                            dense) and bench/attamba_ssm_bench.py --device cuda (SSM
#                                            prefill vs PyTorch), then compute-sanitizer memcheck and
#                                            racecheck over the attamba test
#   bench/run_backends_gpu.sh STAGE OUT decode  the CUDA engine's decode (issue 18): tests, the decode
#                                               A/B bench, the FlashInfer peer if staged, ncu, sanitizers
#   bench/run_backends_gpu.sh STAGE OUT prefill the CUDA engine's prefill paths (issue 18): the variant
#                                               and dense GPU tests, bench/gpu_bench.py --only prefill
#                                               --prefill-ab (the default path and KVP_CUDA_PREFILL=kvplug
#                                               in the same run, beside SDPA flash and cuDNN; pages of
#                                               PREFILL_PAGES), the kv_shift and attamba tests, then
#                                               compute-sanitizer memcheck + racecheck over the FlashInfer
#                                               path's test and memcheck over the graph-captured prefill
# STAGE (bench/stage_gpu.sh) holds lib/ (libkvplug.so and the non-system libraries), the test
# binaries, the demo and a copy of ../shared/tools/star-peers.py.
set -uo pipefail
stage=${1:-.gpu}; out=${2:-${OUT:-/tmp/kvplug-gpu}}; what=${3:-tests}
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/$stage/lib:${LD_LIBRARY_PATH:-}
export KVP_LIBRARY=$PWD/$stage/lib/libkvplug.so
export NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"
if [ "$what" = prefill ]; then
  rc=0
  gtest() {  # name timeout
    [ -x "$stage/$1" ] || { echo "missing $1"; return; }
    echo "== $1"
    timeout "$2" "$stage/$1" > "$out/$1.log" 2>&1; local r=$?; rc=$((rc | r))
    grep -E "^\[  (PASSED|FAILED|SKIPPED)|Failure|FlashInfer|causal/w-1 .*D=128" "$out/$1.log" | tail -30
    echo "$1 rc=$r"
  }
  gtest variant_gpu_test 200
  gtest dense_gpu_test 150
  echo "== prefill A/B"
  PYTHONUNBUFFERED=1 timeout 240 python3 bench/gpu_bench.py --lib "$KVP_LIBRARY" --out "$out" --only prefill --prefill-ab \
    --prefill-block-sizes "${PREFILL_PAGES:-16,64}" 2>&1 | tee "$out/gpu_bench.log" | grep -vE "^\s*$" | tail -40
  gtest kv_shift_gpu_test 60
  gtest attamba_gpu_test 60
  for tool in memcheck racecheck; do
    KVP_GPU_TRIALS=1 timeout 120 compute-sanitizer --tool $tool --error-exitcode 9 "$stage/variant_gpu_test" \
      --gtest_filter='*FlashInfer*' > "$out/sanitizer_${tool}_fi.log" 2>&1
    r=$?; rc=$((rc | r)); echo "$tool variant_gpu_test FlashInfer* rc=$r $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer_${tool}_fi.log" | tail -1)"
    # $OUT returns at most 8 files: the first reports go to stdout.
    grep -m12 -A3 -E "^========= (Error|Warning|Race|Invalid)" "$out/sanitizer_${tool}_fi.log" | head -40
  done
  timeout 90 compute-sanitizer --tool memcheck --error-exitcode 9 "$stage/dense_gpu_test" \
    --gtest_filter='*CudaGraph*' > "$out/sanitizer_memcheck_dense.log" 2>&1
  r=$?; rc=$((rc | r)); echo "memcheck dense_gpu_test CudaGraph* rc=$r $(grep -E 'ERROR SUMMARY' "$out/sanitizer_memcheck_dense.log" | tail -1)"
  echo "tests rc=$rc"
  exit 0
fi
if [ "$what" = decode ]; then
  # Issue 18's decode part: the dense, variant, kv_shift and attamba GPU tests (decode on the
  # default warp-private tiles), gpu_bench.py --only decode (bf16 and fp8 pages beside SDPA flash and
  # cuDNN; DECODE_AB=cta,warp,kv1 also times those pipelines, in a -DKVP_CUDA_DECODE_AB=ON build),
  # FlashInfer's decode kernels when STAGE/fipeer holds the peer build, Nsight Compute on the decode
  # kernel (NCU_SHAPES x NCU_KERNELS, bf16 and fp8), then compute-sanitizer (SANITIZERS) over the
  # decode tests. $OUT returns at most 8 files: logs are concatenated.
  export PYTHONUNBUFFERED=1
  rc=0
  : > "$out/tests.log"
  for t in dense_gpu_test variant_gpu_test kv_shift_gpu_test attamba_gpu_test; do
    echo "== $t"; timeout 200 "$stage/$t" > /tmp/$t.log 2>&1; r=$?; rc=$((rc | r)); cat /tmp/$t.log >> "$out/tests.log"
    grep -E "^\[  (PASSED|FAILED|SKIPPED)|Failure" /tmp/$t.log | tail -12; echo "$t rc=$r"
  done
  echo "== decode A/B"
  timeout 240 python3 bench/gpu_bench.py --lib "$KVP_LIBRARY" --out "$out" --only decode --decode-ab "${DECODE_AB:-}" \
    ${DECODE_SHAPES:+--decode-shapes $DECODE_SHAPES} 2>&1 | grep -vE "^\s*$" | tail -24
  # DECODE_CTAS_PER_SM="8 16": the split rule's grid target, each its own run (default 4 above).
  for cps in ${DECODE_CTAS_PER_SM:-}; do
    echo "== decode, KVP_CUDA_DECODE_CTAS_PER_SM=$cps"
    KVP_CUDA_DECODE_CTAS_PER_SM=$cps timeout 120 python3 bench/gpu_bench.py --lib "$KVP_LIBRARY" --out /tmp/cps$cps \
      --only decode ${DECODE_SHAPES:+--decode-shapes $DECODE_SHAPES} 2>&1 | grep -E "^decode "
  done
  if [ -x "$stage/fipeer/fi_bench.py" ] || [ -f "$stage/fipeer/fi_bench.py" ]; then
    echo "== FlashInfer peer (decode)"
    (cd "$stage/fipeer" && OUT=$out timeout 200 python3 fi_bench.py --lib ./libfi_bench.so ${FI_ARGS:-} 2>&1 | tail -30)
  fi
  if [ -z "${SKIP_NCU:-}" ] && command -v ncu >/dev/null; then
    echo "== Nsight Compute (decode kernel)"
    : > "$out/ncu_decode.txt"
    for shape in ${NCU_SHAPES:-64x4096 16x32768}; do
      for kern in ${NCU_KERNELS:-default}; do
        # launches: 10 warm-up + 60 timed bf16 runs, then the fp8 cache's: skip 20 -> bf16, 90 -> fp8.
        for skip in 20 90; do
          echo "#### $shape KVP_CUDA_DECODE=$kern launch-skip $skip ($([ $skip = 20 ] && echo bf16 || echo fp8))" >> "$out/ncu_decode.txt"
          env $([ $kern = default ] || echo KVP_CUDA_DECODE=$kern) timeout 90 ncu -k regex:PagedAttention --launch-skip $skip --launch-count 1 \
            --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
            --section MemoryWorkloadAnalysis --section SchedulerStats \
            python3 bench/gpu_bench.py --lib "$KVP_LIBRARY" --out /tmp/ncu_scratch --only decode \
            --decode-shapes $shape >> "$out/ncu_decode.txt" 2>&1
        done
      done
    done
    grep -E "^####|DRAM Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Duration|Registers Per|Shared Memory Config|Dynamic Shared|No Eligible|Issued Warp" "$out/ncu_decode.txt" | head -120
  fi
  if [ -z "${SKIP_SANITIZER:-}" ]; then
    for tool in ${SANITIZERS:-memcheck racecheck synccheck}; do
      # KVP_CUDA_PREFILL=kvplug: only kvplug's kernels (FlashInfer's prefill is checked in "prefill").
      KVP_CUDA_PREFILL=kvplug KVP_GPU_TRIALS=1 timeout 150 compute-sanitizer --tool $tool --error-exitcode 9 "$stage/dense_gpu_test" \
        --gtest_filter='*Decode*:*Fp8*:*Ragged*' > "$out/sanitizer_$tool.log" 2>&1
      r=$?; rc=$((rc | r)); echo "$tool dense_gpu_test decode rc=$r $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer_$tool.log" | tail -1)"
      grep -m6 -A3 -E "^========= (Error|Warning|Race|Invalid|Barrier)" "$out/sanitizer_$tool.log" | head -20
    done
  fi
  echo "decode rc=$rc"
  exit 0
fi
if [ "$what" = tests ]; then
  rc=0
  for t in variant_gpu_test comm_gpu_test kv_shift_gpu_test dense_gpu_test attamba_gpu_test; do
    [ -x "$stage/$t" ] || { echo "missing $t"; rc=1; continue; }
    echo "== $t"
    "$stage/$t" > "$out/$t.log" 2>&1; r=$?; rc=$((rc | r))
    grep -E "^\[  (PASSED|FAILED|SKIPPED)|Failure|star" "$out/$t.log" | tail -25
  done
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer $tool (variant family incl. Star and entropy, kv_shift, communicators, attamba)"
    for t in variant_gpu_test kv_shift_gpu_test comm_gpu_test attamba_gpu_test; do
      KVP_GPU_TRIALS=1 timeout 170 compute-sanitizer --tool $tool --error-exitcode 9 "$stage/$t" > "$out/sanitizer_${tool}_$t.log" 2>&1
      r=$?; rc=$((rc | r))
      echo "$t rc=$r $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer_${tool}_$t.log" | tail -1)"
    done
  done
  if [ -x "$stage/kvplug-demo" ]; then
    echo "== demo"; "$stage/kvplug-demo" "$KVP_LIBRARY" > "$out/demo.txt" 2>&1; echo "demo rc=$?"; grep -E "^(dense|star|entropy|kv_shift|attamba) " "$out/demo.txt"
  fi
  echo "tests rc=$rc"
elif [ "$what" = attamba ]; then
  export KVPLUG_LIBRARY=$KVP_LIBRARY PYTHONPATH=$PWD/bindings/python:${PYTHONPATH:-} PYTHONUNBUFFERED=1
  rc=0
  echo "== attamba_gpu_test"
  timeout 120 "$stage/attamba_gpu_test" > "$out/attamba_gpu_test.log" 2>&1; r=$?; rc=$((rc | r))
  grep -E "^\[  (PASSED|FAILED|SKIPPED)|Failure|max err|skipped" "$out/attamba_gpu_test.log" | sed "s/ | max err / /" | tail -45
  echo "attamba_gpu_test rc=$r"
  echo "== attamba_gpu_bench (KV bytes per token, decode vs dense)"
  timeout ${ATTAMBA_BENCH_TIMEOUT:-200} python3 bench/attamba_gpu_bench.py --out "$out" ${ATTAMBA_BENCH_ARGS:-} 2>&1 \
    | tee "$out/attamba_gpu_bench.log" | grep -v "^|"; r=$?; rc=$((rc | r))
  echo "== attamba_ssm_bench --device cuda (SSM prefill vs PyTorch on the same GPU)"
  rm -f "$out/attamba_ssm_gpu.jsonl"; hdr=--header
  # ATTAMBA_SSM_CONFIGS: space-separated SEQUENCESxTOKENSxP.
  for cfg in ${ATTAMBA_SSM_CONFIGS:-1x4096x8 1x16384x8 1x4096x64 8x4096x8}; do
    IFS=x read -r nseq ntok nchunk <<< "$cfg"
    timeout ${ATTAMBA_SSM_TIMEOUT:-60} python3 bench/attamba_ssm_bench.py --device cuda --batch "$nseq" --tokens "$ntok" \
      --chunk "$nchunk" --rounds 7 $hdr --json "$out/attamba_ssm_gpu.jsonl" 2>&1 | tail -3; hdr=
  done
  for tool in memcheck racecheck; do
    KVP_GPU_TRIALS=1 timeout ${ATTAMBA_SANITIZER_TIMEOUT:-150} compute-sanitizer --tool $tool --error-exitcode 9 "$stage/attamba_gpu_test" \
      > "$out/sanitizer_${tool}_attamba_gpu_test.log" 2>&1
    r=$?; rc=$((rc | r))
    echo "compute-sanitizer $tool attamba_gpu_test rc=$r $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer_${tool}_attamba_gpu_test.log" | tail -1)"
  done
  echo "attamba rc=$rc"
else
  echo "== star_bench"; python3 bench/star_bench.py --lib "$KVP_LIBRARY" --out "$out" ${BENCH_ARGS:-} 2>&1 | tee "$out/star_bench.log" | tail -20
  echo "== entropy_bench"; python3 bench/entropy_bench.py --lib "$KVP_LIBRARY" --out "$out" 2>&1 | tee "$out/entropy_bench.log" | tail -10
  echo "== kv_shift_bench"; python3 bench/kv_shift_bench.py --lib "$KVP_LIBRARY" --out "$out" 2>&1 | tee "$out/kv_shift_bench.log" | tail -10
  echo "== star-peers"; python3 "${PEERS:-$stage/star-peers.py}" 32768 65536 131072 2>&1 | tee "$out/star_peers.log" | tail -20
fi
