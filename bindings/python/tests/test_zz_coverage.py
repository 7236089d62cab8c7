"""Runs last: the suite as a whole called every entry point of kvplug.h through the binding."""
from __future__ import annotations

import gc

import pytest

from kvplug import _lib

from conftest import ALL_TEST_FILES, CALLED, DESELECTED, SELECTED_FILES


@pytest.mark.run_last
def test_every_entry_point_was_called() -> None:
    if SELECTED_FILES != ALL_TEST_FILES or DESELECTED:
        pytest.skip("only meaningful when the whole suite runs (some test files or tests were not selected)")
    gc.collect()  # handles the tests dropped are destroyed now: the destroy functions count too
    # Optional (0.4) entry points the library under test lacks are stand-ins: their tests skip.
    missing = [name for name in _lib.ENTRY_POINTS if not CALLED.get(name) and _lib.api().has(name)]
    assert not missing, f"entry points no test called: {missing}"
