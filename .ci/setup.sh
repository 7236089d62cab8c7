#!/usr/bin/env bash
# Installs what kvplug needs from Debian's packages (only what is missing) and builds it into
# ${KVP_BUILD_DIR:-build}. Sourced by bench/run_demo.sh and tests/run_tests.sh. With nvcc at
# /usr/local/cuda (or on PATH) the CUDA parts build too; without it the CPU-only library builds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

packages=(cmake make g++ pkg-config libflatbuffers-dev flatbuffers-compiler libabsl-dev libfmt-dev
          libdlpack-dev libgtest-dev libgmock-dev libbenchmark-dev libhwy-dev binutils)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "kvplug: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# FlashInfer's headers for the CUDA engine's sm_90 prefill (only where nvcc is; pinned, fetched
# outside the repository). KVP_FETCH_FLASHINFER=0 skips it; the build then runs kvplug's own
# prefill kernel everywhere (CMake's KVP_WITH_FLASHINFER=AUTO finds no headers).
if [ "${KVP_FETCH_FLASHINFER:-1}" != 0 ] && { command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; }; then
  if fi_root=$(bash .ci/fetch_flashinfer.sh); then
    export KVP_FLASHINFER_ROOT=$fi_root
  else
    echo "kvplug: FlashInfer headers not fetched; building without the FlashInfer prefill path" >&2
  fi
fi

KVP_BUILD_DIR=${KVP_BUILD_DIR:-build}
jobs=${KVP_JOBS:-$(nproc)}
cmake -S . -B "$KVP_BUILD_DIR" -DCMAKE_BUILD_TYPE=${KVP_BUILD_TYPE:-RelWithDebInfo} ${KVP_CMAKE_ARGS:-} >/dev/null
cmake --build "$KVP_BUILD_DIR" -j"$jobs"
