#!/usr/bin/env bash
# The test command: install, build, run every CPU test (the GPU label runs on a GPU machine).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../.ci/setup.sh"
ctest --test-dir "$KVP_BUILD_DIR" --output-on-failure -j"$jobs" -LE gpu
