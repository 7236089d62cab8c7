#!/usr/bin/env bash
# Builds and tests the Rust binding against the libkvplug of a CMake build directory, then runs the
# demo (which exits non-zero if any attention output is off the f64 reference).
#   usage: bindings/rust/run_tests.sh [BUILD_DIR]     (default: the repository's build/)
# Needs cargo (no registry access: nothing but the workspace is compiled) and a C compiler (cc) for
# the header-drift test. Exits non-zero on any failure.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
build_dir="${1:-$here/../../build}"
if [[ ! -d "$build_dir" ]]; then
  echo "run_tests.sh: build directory '$build_dir' does not exist" >&2
  exit 1
fi
build_dir="$(cd "$build_dir" && pwd)"   # absolute: it becomes the test binaries' rpath
lib_dir="$build_dir/abi"
if ! compgen -G "$lib_dir/libkvplug.so*" >/dev/null; then
  echo "run_tests.sh: no libkvplug.so in $lib_dir (build it: cmake --build '$build_dir' --target kvplug)" >&2
  exit 1
fi

export KVPLUG_LIB_DIR="$lib_dir"
export CARGO_TARGET_DIR="$here/target"   # git-ignored

cd "$here"
echo "== cargo test (KVPLUG_LIB_DIR=$KVPLUG_LIB_DIR)"
cargo test --offline
echo "== cargo run --example demo"
cargo run --offline --example demo
echo "== Rust binding: all tests and the demo passed"
