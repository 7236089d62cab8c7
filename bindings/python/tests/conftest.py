"""Test setup: which library, shared fixtures, and the record of entry points called.

The tests use the library named by KVPLUG_LIBRARY (CI sets it to <build>/abi/libkvplug.so); when it
is unset they default to this checkout's build/abi/libkvplug.so (repo root = parents[3] of this
file: tests -> python -> bindings -> repo).
"""
from __future__ import annotations

import functools
import os
import pathlib
import shutil
import sys
from typing import Any, Dict, Iterator, List, Set

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
HEADER = REPO_ROOT / "abi" / "include" / "kvplug" / "kvplug.h"

os.environ.setdefault("KVPLUG_LIBRARY", str(REPO_ROOT / "build" / "abi" / "libkvplug.so"))
# The package itself, whether or not it was pip-installed.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import kvplug  # noqa: E402
from kvplug import _lib  # noqa: E402

# Every entry point the suite calls, counted through wrappers around the ctypes functions, so that
# test_zz_coverage.py can assert the suite exercised the whole ABI.
CALLED: Dict[str, int] = {}


def _install_call_recorder() -> None:
    api = _lib.load()
    for name in _lib.ENTRY_POINTS:
        fn = getattr(api, name)

        @functools.wraps(fn)
        def wrapper(*args: Any, _fn: Any = fn, _name: str = name) -> Any:
            CALLED[_name] = CALLED.get(_name, 0) + 1
            return _fn(*args)

        setattr(api, name, wrapper)


_install_call_recorder()

# Files whose tests all have to run for the coverage check to mean anything.
ALL_TEST_FILES: Set[str] = {p.name for p in pathlib.Path(__file__).parent.glob("test_*.py")}
SELECTED_FILES: Set[str] = set()
DESELECTED: List[Any] = []


def pytest_collection_modifyitems(session: Any, config: Any, items: List[Any]) -> None:
    # The coverage check runs last, after everything that calls the library.
    items.sort(key=lambda item: item.get_closest_marker("run_last") is not None)


def pytest_deselected(items: List[Any]) -> None:
    DESELECTED.extend(items)


def pytest_collection_finish(session: Any) -> None:
    SELECTED_FILES.update(pathlib.Path(str(item.fspath)).name for item in session.items)


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "run_last: run after every other test (the entry-point coverage check)")


@pytest.fixture
def ctx() -> Iterator[kvplug.Context]:
    """A CPU context with two worker threads (CI machines are small)."""
    with kvplug.Context(num_threads=2) as c:
        yield c


@pytest.fixture(scope="session")
def c_compiler() -> str:
    """A C compiler for the tests that build C helpers, or a skip saying there is none."""
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    pytest.skip("no C compiler (cc, gcc, clang or $CC) to build the C-side helper")
    raise AssertionError  # unreachable
