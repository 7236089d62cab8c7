"""Finding and loading libkvplug: KVPLUG_LIBRARY, the package folder, lazy loading, and the ABI
major-version check (against fake libraries built here, in subprocesses, since a process loads
kvplug once)."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
from typing import Dict, Optional

import pytest

import kvplug
from kvplug import _lib

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python(code: str, library: Optional[str], pythonpath: pathlib.Path = PACKAGE_ROOT) -> subprocess.CompletedProcess:
    env: Dict[str, str] = {k: v for k, v in os.environ.items() if k != "KVPLUG_LIBRARY"}
    env["PYTHONPATH"] = str(pythonpath)
    if library is not None:
        env["KVPLUG_LIBRARY"] = library
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def _fake_library(tmp_path: pathlib.Path, cc: str, body: str) -> str:
    src = tmp_path / "fake.c"
    src.write_text("#include <stdint.h>\n" + body)
    lib = tmp_path / "libfake.so"
    subprocess.run([cc, "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    return str(lib)


def test_loaded_library_and_versions() -> None:
    assert pathlib.Path(kvplug.library_path()).resolve() == pathlib.Path(os.environ["KVPLUG_LIBRARY"]).resolve()
    v = kvplug.abi_version()
    assert v // 10000 == kvplug.ABI_VERSION_MAJOR and v // 100 % 100 >= kvplug.ABI_VERSION_MINOR
    assert kvplug.version_string().startswith(f"{v // 10000}.{v // 100 % 100}.{v % 100}")


def test_check_abi_version() -> None:
    _lib.check_abi_version(kvplug.ABI_VERSION_MAJOR * 10000 + 99 * 100 + 3, "lib")  # newer minor: fine
    with pytest.raises(kvplug.LibraryLoadError, match=r"ABI 1\.2\.3 but this Python binding was written for ABI major 0"):
        _lib.check_abi_version(10203, "libkvplug.so.1")
    assert issubclass(kvplug.LibraryLoadError, ImportError) and issubclass(kvplug.LibraryLoadError, kvplug.KvplugError)


def test_a_second_library_is_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(kvplug.LibraryLoadError, match="already loaded"):
        kvplug.load_library(str(tmp_path / "other.so"))
    assert kvplug.load_library(os.environ["KVPLUG_LIBRARY"]) is _lib.api()  # the same one is fine


def test_wrong_abi_major_is_a_clear_error(tmp_path: pathlib.Path, c_compiler: str) -> None:
    lib = _fake_library(tmp_path, c_compiler, "uint32_t kvp_abi_version(void) { return 10203; }\n")
    r = _python("import kvplug; kvplug.backends()", lib)
    assert r.returncode != 0
    assert "LibraryLoadError" in r.stderr and "ABI 1.2.3" in r.stderr and "ABI major 0" in r.stderr


def test_missing_entry_points_and_non_kvplug_libraries(tmp_path: pathlib.Path, c_compiler: str) -> None:
    old = _fake_library(tmp_path, c_compiler, "uint32_t kvp_abi_version(void) { return 99; }\n")
    r = _python("import kvplug; kvplug.backends()", old)
    assert r.returncode != 0 and "lacks the entry point kvp_version_string" in r.stderr
    other = tmp_path / "other"
    other.mkdir()
    foreign = _fake_library(other, c_compiler, "int something_else(void) { return 1; }\n")
    r = _python("import kvplug; kvplug.backends()", foreign)
    assert r.returncode != 0 and "not a kvplug library" in r.stderr


def test_bad_path_fails_on_first_use_not_on_import(tmp_path: pathlib.Path) -> None:
    missing = str(tmp_path / "nope" / "libkvplug.so")
    r = _python("import kvplug\nprint('imported')\ntry:\n    kvplug.Context()\nexcept kvplug.LibraryLoadError as e:\n"
                "    print('load error:', e.status_name, e.message)\n", missing)
    assert r.returncode == 0, r.stderr
    assert "imported" in r.stdout and "load error: KVP_ERR_NOT_SUPPORTED cannot load" in r.stdout and missing in r.stdout


def test_library_in_the_package_folder_is_found(tmp_path: pathlib.Path) -> None:
    # A copy of the package with the library next to its modules, as a wheel would ship it.
    copy = tmp_path / "site"
    shutil.copytree(PACKAGE_ROOT / "kvplug", copy / "kvplug", ignore=shutil.ignore_patterns("__pycache__"))
    real = pathlib.Path(os.environ["KVPLUG_LIBRARY"]).resolve()
    (copy / "kvplug" / f"libkvplug.so.{kvplug.ABI_VERSION_MAJOR}").symlink_to(real)
    r = _python("import kvplug; print(kvplug.library_path()); print(kvplug.backends())", None, pythonpath=copy)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == str(copy / "kvplug" / f"libkvplug.so.{kvplug.ABI_VERSION_MAJOR}")
    assert "dense" in r.stdout


def test_nothing_found_lists_where_it_looked() -> None:
    import ctypes.util

    if ctypes.util.find_library("kvplug"):
        pytest.skip("a libkvplug is installed system-wide, so the search cannot come up empty here")
    r = _python("import kvplug; kvplug.backends()", None)
    assert r.returncode != 0
    assert "libkvplug.so not found; set KVPLUG_LIBRARY" in r.stderr and f"libkvplug.so.{kvplug.ABI_VERSION_MAJOR}" in r.stderr
