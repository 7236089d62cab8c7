#!/usr/bin/env bash
# Tests of the serving engine (bindings/python/kvplug/engine): pytest on tests_engine (parity with
# Hugging Face transformers, per-layer backends, scheduler, a 200-request stress run), then a
# 64-request synthetic workload through `python -m kvplug.engine`.
# Usage: bash bindings/python/run_engine_tests.sh [build-dir]   (default: build)
# Needs <build-dir>/abi/libkvplug.so (built here if the build dir is configured). Installs PyTorch,
# transformers, safetensors, numpy and pytest with pip when missing: into the current Python, or,
# where that Python refuses pip (Debian's PEP 668), into a venv at <build-dir>/engine-venv.
# PYTHON picks the interpreter; KVP_ENGINE_PIP_ARGS adds pip arguments. Exits non-zero on any failure.
set -euo pipefail
start=$(date +%s)
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${1:-build}"
case "$build" in /*) ;; *) build="$repo/$build" ;; esac
lib="$build/abi/libkvplug.so"
say() { echo "run_engine_tests.sh: $*" >&2; }

if [ ! -e "$lib" ]; then
  if [ -f "$build/CMakeCache.txt" ]; then
    say "building $lib"
    cmake --build "$build" -j"${KVP_JOBS:-2}" --target kvplug
  fi
  [ -e "$lib" ] || { say "$lib not found; build it first (bash tests/run_tests.sh, or cmake --build $build --target kvplug)"; exit 1; }
fi

python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { say "no $python; set PYTHON"; exit 1; }
need="import torch, transformers, safetensors, numpy, pytest; torch.randn(2)"
pkgs=(torch "transformers>=4.45" safetensors numpy pytest)
pip_install() {  # pip_install PYTHON: the packages, quietly; fails if pip refuses
  PIP_ROOT_USER_ACTION=ignore "$1" -m pip install --quiet --disable-pip-version-check --progress-bar off \
    ${KVP_ENGINE_PIP_ARGS:-} "${pkgs[@]}"
}
if ! "$python" -c "$need" 2>/dev/null; then
  t0=$(date +%s)
  say "installing ${pkgs[*]} for $python (PyPI's Linux torch wheel pulls its CUDA libraries: ~3 GB, runs on the CPU)"
  if ! pip_install "$python"; then
    venv="$build/engine-venv"
    say "pip refused $python; using a venv at $venv"
    if ! "$python" -m venv "$venv" 2>/dev/null; then
      if command -v apt-get >/dev/null; then
        SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
      fi
      rm -rf "$venv"
      "$python" -m venv "$venv" || { say "cannot create a venv with $python (install python3-venv)"; exit 1; }
    fi
    python="$venv/bin/python"
    "$python" -c "$need" 2>/dev/null || pip_install "$python" || {
      say "pip could not install ${pkgs[*]} (is PyPI reachable?)"; exit 1; }
  fi
  "$python" -c "$need" || { say "installed, but '$need' still fails for $python"; exit 1; }
  say "installed in $(( $(date +%s) - t0 )) s"
fi
"$python" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"

# The package from the source tree (no install, nothing written into it), the library from the build.
export PYTHONPATH="$repo/bindings/python${PYTHONPATH:+:$PYTHONPATH}"
export KVPLUG_LIBRARY="$lib"
export PYTHONDONTWRITEBYTECODE=1
cd "$repo"
"$python" -m pytest -q -p no:cacheprovider bindings/python/tests_engine
"$python" -m kvplug.engine --num-requests 64 --prompt-len 16:96 --output-len 8:48 --system-prompt-len 32 \
  --num-blocks 96 --num-host-blocks 128 --max-num-seqs 32 --max-batched-tokens 256 --progress on --device auto
say "passed in $(( $(date +%s) - start )) s"
