#!/usr/bin/env bash
# Builds and tests the Rust binding against the libkvplug of a CMake build directory, then runs the
# demo (which exits non-zero if any attention output is off the f64 reference). The tests and the
# demo find the library through pkg-config, as a user's build would: the build is installed into a
# prefix under target/ (cmake --install) and PKG_CONFIG_PATH points at its kvplug.pc. The demo then runs
# once more with the build's abi/ given as KVPLUG_LIB_DIR (the explicit-directory path).
#   usage: bindings/rust/run_tests.sh [BUILD_DIR]     (default: the repository's build/)
# Needs cargo (no registry access: nothing but the workspace is compiled), cmake, pkg-config and a C
# compiler (cc) for the header-drift test. Exits non-zero on any failure.
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

export CARGO_TARGET_DIR="$here/target"   # git-ignored
# A fixed prefix inside the (git-ignored) target directory: the paths, and so the builds, stay the
# same from run to run, and the test binaries keep a library to run against.
prefix="$CARGO_TARGET_DIR/kvplug-prefix"
cmake --install "$build_dir" --prefix "$prefix" >/dev/null
pc_dir="$(dirname "$(find "$prefix" -name kvplug.pc | head -1)")"

cd "$here"
(
  unset KVPLUG_LIB_DIR
  export PKG_CONFIG_PATH="$pc_dir${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
  echo "== cargo test (pkg-config: $(pkg-config --libs kvplug))"
  cargo test --offline
  echo "== cargo run --example demo (pkg-config)"
  cargo run --offline --example demo
)
# The explicit directory, in its own target directory so that neither build invalidates the other.
echo "== cargo run --example demo (KVPLUG_LIB_DIR=$lib_dir)"
KVPLUG_LIB_DIR="$lib_dir" CARGO_TARGET_DIR="$here/target/lib-dir" cargo run --offline --example demo
echo "== Rust binding: all tests and the demo passed"
