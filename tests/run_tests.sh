#!/usr/bin/env bash
# The test command: install, build, run every CPU test (ctest; the `gpu` label runs on a GPU
# machine, see README), the outside C consumers of an installed tree, then the Python, Rust and Go bindings' tests and examples, then the mini
# serving engine's tests. KVP_SKIP_BINDINGS=1 / KVP_SKIP_ENGINE=1 leave those out (KVP_SKIP_WHEEL=1
# only the pip wheel's test).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../.ci/setup.sh"
ctest --test-dir "$KVP_BUILD_DIR" --output-on-failure -j"$jobs" -LE gpu
echo "== outside consumers (cmake --install, find_package, pkg-config)"
bash tests/consumers/run.sh "$KVP_BUILD_DIR"
if [ "${KVP_SKIP_BINDINGS:-0}" != 1 ]; then
  for binding in python rust go; do
    echo "== bindings/$binding"
    bash "bindings/$binding/run_tests.sh" "$KVP_BUILD_DIR"
  done
  if [ "${KVP_SKIP_WHEEL:-0}" != 1 ]; then
    # pip wheel ./bindings/python (a CPU build of the library, about 2 min on 2 cores), installed
    # into a fresh venv: ldd and exports of the bundled library, import and the demo outside the
    # repository with no KVPLUG_LIBRARY, and with this build on LD_LIBRARY_PATH.
    echo "== bindings/python wheel"
    KVP_JOBS="$jobs" bash bindings/python/run_wheel_test.sh "$KVP_BUILD_DIR"
  fi
fi
if [ "${KVP_SKIP_ENGINE:-0}" != 1 ]; then
  # The mini serving engine: logits against Hugging Face transformers, the 200-request stress test
  # and a smoke run (installs torch and transformers from PyPI on first use).
  echo "== engine"
  bash bindings/python/run_engine_tests.sh "$KVP_BUILD_DIR"
fi
