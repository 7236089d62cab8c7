"""Full-size engine soak (issue 15): the run of tests_engine/test_soak.py with 1,000 requests by
default, every backend in one model, through a pool far too small for them; exits non-zero if any
check fails and prints its figures as JSON. ``--attamba``: the soak's attamba variant (the windowed
dense layer becomes an attamba layer with a small pool of its own pages; recompute only, no prefix
caching), as tests_engine/test_soak.py runs it at 40 requests.

  PYTHONPATH=bindings/python KVPLUG_LIBRARY=$PWD/build/abi/libkvplug.so \
    python bench/engine_soak.py [--requests 1000] [--seed 15] [--attamba] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1] / "bindings" / "python" / "tests_engine"))

import conftest  # noqa: E402,F401  (the package path, the library, one torch thread)
import test_soak  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=test_soak.SEED)
    ap.add_argument("--attamba", action="store_true", help="the variant with an attamba layer")
    ap.add_argument("--json", type=pathlib.Path, help="also write the figures here")
    a = ap.parse_args()
    t0 = time.perf_counter()
    figures = test_soak.run_soak(a.requests, a.seed, attamba=a.attamba)
    figures["total_s"] = round(time.perf_counter() - t0, 2)
    text = json.dumps(figures, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
