#!/usr/bin/env bash
# Tests of the Python binding: the pytest suite, then the example (bench/demo.cc's scenario, checked
# against NumPy). Usage: bash bindings/python/run_tests.sh [build-dir]   (default: build)
# Needs the library built in <build-dir>/abi/libkvplug.so. Exits non-zero on any failure.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${1:-build}"
case "$build" in /*) ;; *) build="$repo/$build" ;; esac
lib="$build/abi/libkvplug.so"
if [ ! -e "$lib" ]; then
  echo "run_tests.sh: $lib not found; build it first (cmake --build $build --target kvplug)" >&2
  exit 1
fi
python="${PYTHON:-python3}"

# numpy and pytest, quietly, only if missing. Debian's system Python refuses pip (PEP 668): then
# its own packages.
if ! "$python" -c "import numpy, pytest" 2>/dev/null; then
  if ! "$python" -m pip install --quiet --disable-pip-version-check numpy pytest 2>/dev/null; then
    if command -v apt-get >/dev/null; then
      SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
      $SUDO apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-numpy python3-pytest >/dev/null
    fi
  fi
  "$python" -c "import numpy, pytest" || { echo "run_tests.sh: cannot install numpy and pytest for $python" >&2; exit 1; }
fi

# The package from the source tree (no install, nothing written into it), the library from the build.
export PYTHONPATH="$repo/bindings/python${PYTHONPATH:+:$PYTHONPATH}"
export KVPLUG_LIBRARY="$lib"
export PYTHONDONTWRITEBYTECODE=1
cd "$repo"
"$python" -m pytest -q -p no:cacheprovider bindings/python/tests
"$python" bindings/python/examples/demo.py
