#!/usr/bin/env bash
# The pip path end to end: builds the wheel of bindings/python (scikit-build-core builds libkvplug
# from the repository root, CPU only here), installs it into a fresh virtual environment (numpy
# from PyPI), checks the bundled library (ldd: nothing outside the package folder but the C/C++
# runtime, libm and the loader; only kvp_* exported), then, from a folder outside the repository
# and with no KVPLUG_LIBRARY, imports kvplug and runs examples/demo.py (attention checked against
# NumPy): once with a clean environment, once with LD_LIBRARY_PATH holding another build and the
# system's library folder, which must not shadow what the wheel carries.
#
# Usage: bash bindings/python/run_wheel_test.sh [OTHER_BUILD_DIR]
#   OTHER_BUILD_DIR  a CMake build whose abi/ goes on LD_LIBRARY_PATH for the shadowing check
#                    (default: build/ when it has abi/libkvplug.so; skipped otherwise)
# Environment: KVP_JOBS (build jobs, default: all cores); KVPLUG_WHEEL_BUILD_DIR (scikit-build-core's
# build directory, kept between runs so a rebuild is incremental; default: a fresh temporary one);
# KVPLUG_CUDA (default 0 here: a CPU wheel); PYTHON (default python3).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${PYTHON:-python3}"
other="${1:-$repo/build}"
case "$other" in /*) ;; *) other="$repo/$other" ;; esac
start=$(date +%s)

scratch="$(mktemp -d /tmp/kvplug-wheel.XXXXXX)"
trap 'rm -rf "$scratch"' EXIT
venv="$scratch/venv"

echo "== venv and numpy"
if ! "$python" -m venv "$venv" 2>/dev/null; then
  # Debian's python3 keeps venv (with ensurepip) in a package of its own.
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
  rm -rf "$venv"
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check numpy

echo "== pip wheel ./bindings/python"
build_args=()
if [[ -n "${KVPLUG_WHEEL_BUILD_DIR:-}" ]]; then
  build_args+=(--config-settings "build-dir=$KVPLUG_WHEEL_BUILD_DIR")
fi
KVPLUG_CUDA="${KVPLUG_CUDA:-0}" CMAKE_BUILD_PARALLEL_LEVEL="${KVP_JOBS:-$(nproc)}" \
  "$venv/bin/python" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$scratch/dist" \
  ${build_args[@]+"${build_args[@]}"} "$repo/bindings/python"
wheel="$(ls "$scratch"/dist/kvplug-*.whl)"
echo "built $(basename "$wheel") ($(du -k "$wheel" | cut -f1) KiB) in $(( $(date +%s) - start )) s"
"$venv/bin/python" - "$wheel" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
libs = sorted(n for n in names if ".so" in n)
print("libraries in the wheel:", " ".join(n.split("/")[-1] for n in libs))
assert "kvplug/libkvplug.so.0" in names, "no kvplug/libkvplug.so.0 in the wheel"
assert not [n for n in names if n.startswith("kvplug/libkvplug.so") and n != "kvplug/libkvplug.so.0"], libs
assert "kvplug/_lib.py" in names and "kvplug/engine/__init__.py" in names and "kvplug/py.typed" in names
assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")], "compiled files in the wheel"
EOF

echo "== pip install the wheel"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$wheel"
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')"
pkg="$site/kvplug"
lib="$pkg/libkvplug.so.0"

echo "== ldd $lib"
# Allowed outside the package folder: the C/C++ runtime, libm, the loader (and the CUDA driver).
system_re='^(linux-vdso\.so\.1|ld-linux[^ ]*|libc\.so\.6|libm\.so\.6|libstdc\+\+\.so\.6|libgcc_s\.so\.1|libdl\.so\.2|libpthread\.so\.0|librt\.so\.1|libcuda\.so\.1)$'
check_ldd() {  # check_ldd LABEL [env assignments...]
  local label="$1"; shift
  local out bad=0 name path
  out="$(env -i PATH=/usr/bin:/bin "$@" ldd "$lib")"
  while read -r name _ path _; do
    [[ -z "$name" ]] && continue
    if [[ "$name" == /* ]]; then name="$(basename "$name")"; path=""; fi   # the loader's own line
    if [[ "$path" == "not" ]]; then echo "  $name: not found" >&2; bad=1; continue; fi
    if [[ "$path" == "$pkg/"* ]]; then continue; fi
    if [[ "$name" =~ $system_re ]]; then continue; fi
    echo "  $name resolves outside the package: $path" >&2; bad=1
  done <<<"$out"
  if [[ $bad -ne 0 ]]; then echo "$out" >&2; echo "run_wheel_test.sh: ldd ($label) failed" >&2; exit 1; fi
  echo "ldd ($label): ok"
}
env -i PATH=/usr/bin:/bin ldd "$lib"
check_ldd "clean environment"
shadow="/usr/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu"
[[ -e "$other/abi/libkvplug.so" ]] && shadow="$other/abi:$shadow"
check_ldd "LD_LIBRARY_PATH=$shadow" LD_LIBRARY_PATH="$shadow"
foreign="$(nm -D --defined-only "$lib" | awk '$3 !~ /^kvp_/ {print $3}')"
if [[ -n "$foreign" ]]; then
  echo "run_wheel_test.sh: the bundled libkvplug exports non-kvp_ symbols: $foreign" >&2
  exit 1
fi
echo "exports: kvp_* only"

echo "== import kvplug and the demo, outside the repository, no KVPLUG_LIBRARY"
run="$scratch/run"
mkdir -p "$run"
cp "$repo/bindings/python/examples/demo.py" "$run/"
cd "$run"
probe='
import os, sys, kvplug
pkg = sys.argv[1]
path = os.path.realpath(kvplug.library_path())
assert path.startswith(pkg + os.sep), f"loaded {path}, not the wheel library in {pkg}"
assert "dense" in kvplug.backends()
# Every libkvplug, Abseil, FlatBuffers and Highway library mapped into the process is the package copy.
maps = {l.split()[-1] for l in open("/proc/self/maps") if ".so" in l}
ours = [m for m in maps if any(k in os.path.basename(m) for k in ("libkvplug", "libabsl", "libflatbuffers", "libhwy"))]
stray = [m for m in ours if not os.path.realpath(m).startswith(pkg + os.sep)]
assert not stray, f"loaded from outside the package: {stray}"
print("kvplug", kvplug.version_string(), "from", path, "with", len(ours), "bundled libraries mapped")
'
env -i PATH=/usr/bin:/bin HOME="$run" "$venv/bin/python" -c "$probe" "$pkg"
env -i PATH=/usr/bin:/bin HOME="$run" "$venv/bin/python" demo.py
echo "-- again with LD_LIBRARY_PATH=$shadow"
env -i PATH=/usr/bin:/bin HOME="$run" LD_LIBRARY_PATH="$shadow" "$venv/bin/python" -c "$probe" "$pkg"
env -i PATH=/usr/bin:/bin HOME="$run" LD_LIBRARY_PATH="$shadow" "$venv/bin/python" demo.py >/dev/null
echo "wheel test passed in $(( $(date +%s) - start )) s"
