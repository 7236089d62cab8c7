#!/usr/bin/env bash
# Installs a built kvplug into a scratch prefix and builds the outside consumer against it twice:
# with CMake's find_package(kvplug) and with pkg-config. Runs both (they check an attention call).
# Usage: tests/consumers/run.sh BUILD_DIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=$(cd "${1:?usage: run.sh BUILD_DIR}" && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
prefix=$scratch/prefix
# A CUDA build's library needs the toolkit's runtime, which the install does not carry.
[ -d /usr/local/cuda/lib64 ] && export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" 
cmake --install "$build" --prefix "$prefix" >/dev/null
echo "== consumer through find_package(kvplug)"
cmake -S "$here" -B "$scratch/cmake" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_RPATH="$(dirname "$(find "$prefix" -name 'libkvplug.so' | head -1)")" >/dev/null
cmake --build "$scratch/cmake" >/dev/null
"$scratch/cmake/consumer"
echo "== consumer through pkg-config"
pc_dir=$(dirname "$(find "$prefix" -name kvplug.pc | head -1)")
export PKG_CONFIG_PATH="$pc_dir"
libdir=$(pkg-config --variable=libdir kvplug)
# shellcheck disable=SC2046
cc -o "$scratch/consumer_pc" "$here/consumer.c" $(pkg-config --cflags --libs kvplug) -lm -Wl,-rpath,"$libdir"
"$scratch/consumer_pc"
# Only kvp_* leaves the installed library.
if nm -D --defined-only "$libdir/libkvplug.so" | awk '{print $3}' | grep -v '^kvp_' | grep -q .; then
  echo "installed libkvplug.so exports non-kvp_ symbols" >&2
  exit 1
fi
echo "consumers ok"
