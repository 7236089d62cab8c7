"""Engine tests: the library from KVPLUG_LIBRARY (default: this checkout's build/abi/libkvplug.so),
the package from the source tree. Helpers live in engine_helpers.py (a module name of its own, so
this suite and the binding's tests/ can be collected together)."""
from __future__ import annotations

import os
import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
os.environ.setdefault("KVPLUG_LIBRARY", str(REPO_ROOT / "build" / "abi" / "libkvplug.so"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the kvplug package
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # engine_helpers

import torch  # noqa: E402  (the engine needs it: run_engine_tests.sh installs it)

import kvplug  # noqa: E402

kvplug.load_library()  # up front: a missing or mismatched library fails here, once, clearly
torch.set_num_threads(1)
