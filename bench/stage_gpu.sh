#!/usr/bin/env bash
# Stages a CUDA build for the lent GPU machine (which lacks Abseil and FlatBuffers): STAGE/lib holds
# libkvplug.so (debug info stripped) and the non-system libraries the build links, beside the GPU
# test binaries and the demo; carry STAGE (and run bench/run_backends_gpu.sh STAGE OUT ...).
# Usage: bench/stage_gpu.sh BUILD_DIR STAGE [DEVICE_LIBS_TOOL]   (default tool: ../shared/tools/device-libs)
set -euo pipefail
build=${1:?usage: stage_gpu.sh BUILD_DIR STAGE}; stage=${2:?usage: stage_gpu.sh BUILD_DIR STAGE}
tool=${3:-$(dirname "$0")/../../shared/tools/device-libs}
mkdir -p "$stage/lib"
cp -L "$build/abi/libkvplug.so" "$stage/lib/libkvplug.so"
strip --strip-debug "$stage/lib/libkvplug.so"
bins=()
for t in variant_gpu_test comm_gpu_test kv_shift_gpu_test dense_gpu_test attamba_gpu_test; do
  [ -x "$build/tests/$t" ] && cp "$build/tests/$t" "$stage/" && strip --strip-debug "$stage/$t" && bins+=("$build/tests/$t")
done
[ -x "$build/bench/kvplug-demo" ] && cp "$build/bench/kvplug-demo" "$stage/"
"$tool" "$build" "$build/abi/libkvplug.so" "${bins[@]}" >/dev/null
cp -L "$build"/device-libs/* "$stage/lib/" 2>/dev/null || true
for f in /lib/x86_64-linux-gnu/libflatbuffers.so.* /lib/x86_64-linux-gnu/libhwy.so.1*; do [ -e "$f" ] && cp -L "$f" "$stage/lib/"; done
cp "$(dirname "$0")/../../shared/tools/star-peers.py" "$stage/" 2>/dev/null || true
du -sh "$stage" | cut -f1 | xargs echo "staged $stage:"
