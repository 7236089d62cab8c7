#!/usr/bin/env bash
# The test command: install, build, run every CPU test (ctest; the `gpu` label runs on a GPU
# machine, see README), then the Python, Rust and Go bindings' tests and examples.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../.ci/setup.sh"
ctest --test-dir "$KVP_BUILD_DIR" --output-on-failure -j"$jobs" -LE gpu
if [ "${KVP_SKIP_BINDINGS:-0}" != 1 ]; then
  for binding in python rust go; do
    echo "== bindings/$binding"
    bash "bindings/$binding/run_tests.sh" "$KVP_BUILD_DIR"
  done
fi
