#!/usr/bin/env bash
# Fetches FlashInfer's header-only kernels for the CUDA engine's sm_90 prefill path: the pinned
# pure-Python wheel flashinfer-python==0.7.2.post1 (Apache-2.0) through pip, checked against its
# sha256, and only the folders the build reads unpacked (include, cutlass/include,
# cutlass/tools/util/include, cccl) into ${KVP_FLASHINFER_CACHE:-~/.cache/kvplug}, outside the
# repository. Prints the flashinfer/data root (pass it as -DKVP_FLASHINFER_ROOT, or leave the
# default, which is this path). Idempotent; exits non-zero (and the build goes on without
# FlashInfer) when the wheel cannot be fetched.
set -euo pipefail
version=0.7.2.post1
sha256=bfdc18b9e1e4d8d0730fe4343dc0e284cd0c160086de80f99888bc4867922d49
dest=${KVP_FLASHINFER_CACHE:-$HOME/.cache/kvplug}/flashinfer-$version
root=$dest/flashinfer/data
if [ ! -f "$dest/.complete" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps "flashinfer-python==$version" -d "$tmp" >&2
  whl=$(ls "$tmp"/flashinfer_python-"$version"-*.whl)
  echo "$sha256  $whl" | sha256sum -c --quiet - >&2
  rm -rf "$dest" && mkdir -p "$dest"
  python3 - "$whl" "$dest" <<'PY'
import sys, zipfile
keep = ("flashinfer/data/include/", "flashinfer/data/cutlass/include/",
        "flashinfer/data/cutlass/tools/util/include/", "flashinfer/data/cccl/")
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith(keep) or n.endswith("LICENSE")])
PY
  touch "$dest/.complete"
fi
echo "$root"
