#!/usr/bin/env bash
# The main job: install, build, then serve a small batch through every backend (see README).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../.ci/setup.sh"
"$KVP_BUILD_DIR"/bench/kvplug-demo "$KVP_BUILD_DIR"/abi/libkvplug.so
