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


def _python(code: str, library: Optional[str], pythonpath: pathlib.Path = PACKAGE_ROOT,
            ld_library_path: Optional[str] = None) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter with KVPLUG_LIBRARY = ``library`` (unset when None) and
    LD_LIBRARY_PATH = ``ld_library_path`` (unset when None: the caller's must not decide the test)."""
    env: Dict[str, str] = {k: v for k, v in os.environ.items() if k not in ("KVPLUG_LIBRARY", "LD_LIBRARY_PATH")}
    env["PYTHONPATH"] = str(pythonpath)
    if library is not None:
        env["KVPLUG_LIBRARY"] = library
    if ld_library_path is not None:
        env["LD_LIBRARY_PATH"] = ld_library_path
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def _package_copy(tmp_path: pathlib.Path, bundled: Optional[pathlib.Path]) -> pathlib.Path:
    """A copy of the package (as site-packages would hold it) with ``bundled`` linked in as the
    library a wheel ships next to the modules; returns the folder to put on PYTHONPATH."""
    copy = tmp_path / "site"
    shutil.copytree(PACKAGE_ROOT / "kvplug", copy / "kvplug", ignore=shutil.ignore_patterns("__pycache__"))
    if bundled is not None:
        (copy / "kvplug" / f"libkvplug.so.{kvplug.ABI_VERSION_MAJOR}").symlink_to(bundled)
    return copy


def _loader_path_with_a_kvplug(tmp_path: pathlib.Path, cc: str) -> str:
    """A directory holding a libkvplug.so.0 that the loader would find through LD_LIBRARY_PATH: a
    fake of another ABI major, so that loading it instead of the intended library fails loudly."""
    other = tmp_path / "other-build"
    other.mkdir()
    lib = _fake_library(other, cc, "uint32_t kvp_abi_version(void) { return 10203; }\n")
    os.rename(lib, other / f"libkvplug.so.{kvplug.ABI_VERSION_MAJOR}")
    (other / "libkvplug.so").symlink_to(f"libkvplug.so.{kvplug.ABI_VERSION_MAJOR}")
    return str(other)


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
    copy = _package_copy(tmp_path, pathlib.Path(os.environ["KVPLUG_LIBRARY"]).resolve())
    r = _python("import kvplug; print(kvplug.library_path()); print(kvplug.backends())", None, pythonpath=copy)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == str(copy / "kvplug" / f"libkvplug.so.{kvplug.ABI_VERSION_MAJOR}")
    assert "dense" in r.stdout


def test_the_loader_path_does_not_shadow_the_package_library(tmp_path: pathlib.Path, c_compiler: str) -> None:
    # A build on LD_LIBRARY_PATH (here a fake of another ABI major, which would fail if it were the
    # one loaded) does not replace the library the package ships.
    copy = _package_copy(tmp_path, pathlib.Path(os.environ["KVPLUG_LIBRARY"]).resolve())
    other = _loader_path_with_a_kvplug(tmp_path, c_compiler)
    r = _python("import kvplug; print(kvplug.library_path()); print(kvplug.backends())", None, pythonpath=copy,
                ld_library_path=other)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == str(copy / "kvplug" / f"libkvplug.so.{kvplug.ABI_VERSION_MAJOR}")
    # KVPLUG_LIBRARY still wins over the package's library.
    r = _python("import kvplug; kvplug.backends()", str(pathlib.Path(other) / "libkvplug.so"), pythonpath=copy)
    assert r.returncode != 0 and "ABI 1.2.3" in r.stderr and other in r.stderr


def test_a_broken_package_library_is_an_error_not_a_fallback(tmp_path: pathlib.Path) -> None:
    # The package's library exists but cannot be loaded: that is the error, even with a working
    # libkvplug on LD_LIBRARY_PATH.
    garbage = tmp_path / "not-elf.so"
    garbage.write_bytes(b"not a shared library")
    copy = _package_copy(tmp_path, garbage)
    real_dir = str(pathlib.Path(os.environ["KVPLUG_LIBRARY"]).resolve().parent)
    r = _python("import kvplug; kvplug.backends()", None, pythonpath=copy, ld_library_path=real_dir)
    assert r.returncode != 0
    assert "LibraryLoadError" in r.stderr and str(copy / "kvplug" / "libkvplug.so.0") in r.stderr


def test_the_loader_path_is_used_without_a_package_library(tmp_path: pathlib.Path) -> None:
    # A source checkout (no library in the package folder) finds a libkvplug on LD_LIBRARY_PATH.
    real_dir = str(pathlib.Path(os.environ["KVPLUG_LIBRARY"]).resolve().parent)
    r = _python("import kvplug; print(kvplug.library_path()); print(kvplug.backends())", None, ld_library_path=real_dir)
    assert r.returncode == 0, r.stderr
    assert "dense" in r.stdout


def test_nothing_found_lists_where_it_looked() -> None:
    r = _python("import ctypes.util; print(ctypes.util.find_library('kvplug'))", None)
    if r.stdout.strip() != "None":
        pytest.skip("a libkvplug is installed system-wide, so the search cannot come up empty here")
    r = _python("import kvplug; kvplug.backends()", None)
    assert r.returncode != 0
    assert "libkvplug.so not found; set KVPLUG_LIBRARY" in r.stderr and f"libkvplug.so.{kvplug.ABI_VERSION_MAJOR}" in r.stderr
