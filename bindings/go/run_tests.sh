#!/usr/bin/env bash
# Vet, test (with the race detector) and run the demo of the Go binding against a built libkvplug.
# Usage: bindings/go/run_tests.sh BUILD_DIR   (the CMake build directory holding abi/libkvplug.so)
# The package is built through pkg-config against BUILD_DIR installed into a prefix
# (KVPLUG_GO_PREFIX, default /tmp/kvplug-go/prefix). Offline: the binding uses the standard library
# only (GOPROXY=off); installs golang-go with apt-get if `go` is missing; needs cmake and pkg-config.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
build="${1:-$repo/build}"
build="$(cd "$build" && pwd)"
lib_dir="$build/abi"
if [[ ! -e "$lib_dir/libkvplug.so" ]]; then
  echo "run_tests.sh: $lib_dir/libkvplug.so not found; build it first: cmake --build $build --target kvplug" >&2
  exit 1
fi

if ! command -v go >/dev/null 2>&1; then
  echo "run_tests.sh: go not found; installing golang-go" >&2
  sudo=""
  if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
  $sudo apt-get install -y golang-go >/dev/null || { $sudo apt-get update >/dev/null && $sudo apt-get install -y golang-go >/dev/null; }
fi
go version

export CGO_ENABLED=1
# The package finds kvplug through pkg-config (#cgo pkg-config: kvplug): the build is installed
# into a prefix (cmake --install; a fixed one beside the Go caches, so that the flags, and with them
# go's build cache, stay the same from run to run) whose kvplug.pc comes first on PKG_CONFIG_PATH.
# The rpath lets test binaries and the demo find the installed library without LD_LIBRARY_PATH.
prefix="${KVPLUG_GO_PREFIX:-/tmp/kvplug-go/prefix}"
cmake --install "$build" --prefix "$prefix" >/dev/null
pc_dir="$(dirname "$(find "$prefix" -name kvplug.pc | head -1)")"
export PKG_CONFIG_PATH="$pc_dir${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
echo "pkg-config kvplug: $(pkg-config --cflags --libs kvplug)"
libdir="$(cd "$(pkg-config --variable=libdir kvplug)" && pwd)"
export CGO_LDFLAGS="-Wl,-rpath,$libdir${CGO_LDFLAGS:+ $CGO_LDFLAGS}"
# dlpack/dlpack.h: wherever CMake found it, if not on the default include path.
dlpack_dir="$(sed -n 's/^DLPACK_INCLUDE_DIR:[A-Z]*=//p' "$build/CMakeCache.txt" 2>/dev/null || true)"
if [[ -n "$dlpack_dir" && "$dlpack_dir" != "/usr/include" ]]; then
  export CGO_CFLAGS="-I$dlpack_dir${CGO_CFLAGS:+ $CGO_CFLAGS}"
fi
export GOFLAGS=-mod=mod GOPROXY=off GOTOOLCHAIN=local
# Caches under /tmp unless the caller chose: $HOME may be read-only in CI.
export GOCACHE="${GOCACHE:-/tmp/kvplug-go/cache}" GOPATH="${GOPATH:-/tmp/kvplug-go/path}"

cd "$here"
unformatted="$(gofmt -l .)"
if [[ -n "$unformatted" ]]; then
  echo "run_tests.sh: not gofmt-formatted: $unformatted" >&2
  exit 1
fi
echo "== go vet ./..."
go vet ./...
echo "== go test -race ./..."
go test -race -count=1 -timeout 300s ./...
echo "== go run ./cmd/demo"
go run ./cmd/demo
