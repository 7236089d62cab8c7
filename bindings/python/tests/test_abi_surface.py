"""The binding's ctypes declarations against kvplug.h: every entry point declared with the header's
argument and return types, every struct mirrored field by field, and (with a C compiler) the same
sizes and offsets as the C compiler gives them."""
from __future__ import annotations

import ctypes
import json
import pathlib
import re
import subprocess
from typing import Any, Dict, List, Tuple

import pytest

import kvplug
from kvplug import _lib

from conftest import HEADER, REPO_ROOT

HEADER_TEXT = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)  # comments hold commas and parens


def _declarations() -> List[Tuple[str, str, List[str]]]:
    """(name, return type, [parameter declarations]) of every KVP_API function, in header order."""
    out = []
    for m in re.finditer(r"KVP_API\s+([^;(]*?)\s*\b(kvp_\w+)\s*\(([^)]*)\)\s*;", HEADER_TEXT):
        params = [p.strip() for p in m.group(3).replace("\n", " ").split(",")]
        out.append((m.group(2), m.group(1).strip(), [] if params == ["void"] else params))
    return out


def _structs() -> Dict[str, List[Tuple[str, str]]]:
    """{struct name: [(field type, field name)]} of the header's typedef'd structs with bodies."""
    out = {}
    for m in re.finditer(r"typedef struct (\w+) \{(.*?)\} \1;", HEADER_TEXT, flags=re.S):
        fields = []
        for decl in m.group(2).split(";"):
            decl = " ".join(decl.split())
            if decl:
                m_field = re.match(r"(.*?)\s*\b(\w+)$", decl)
                assert m_field, decl
                fields.append((m_field.group(1), m_field.group(2)))
        out[m.group(1)] = fields
    return out


_HANDLES = {"kvp_context", "kvp_block_manager", "kvp_kv_cache", "kvp_plan", "kvp_attention", "kvp_comm"}
_SCALARS = {"uint8_t": ctypes.c_uint8, "int32_t": ctypes.c_int32, "int64_t": ctypes.c_int64, "uint32_t": ctypes.c_uint32,
            "uint64_t": ctypes.c_uint64, "size_t": ctypes.c_size_t, "double": ctypes.c_double,
            "float": ctypes.c_float, "kvp_status": ctypes.c_int, "kvp_alloc_verdict": ctypes.c_int}


def _ctype(decl: str) -> Any:
    """The ctypes type a C type (or parameter declaration, name included) must be declared as."""
    decl = re.sub(r"\bconst\b", "", decl)
    m = re.match(r"\s*(\w+)\s*(\**)\s*(\w+)?\s*$", decl.replace("*", " * ").replace("  ", " ").replace(" *", "*"))
    assert m, decl
    base, stars = m.group(1), m.group(2)
    if base == "void":
        return {"": None, "*": ctypes.c_void_p, "**": ctypes.POINTER(ctypes.c_void_p)}[stars]
    if base == "char":
        return {"*": ctypes.c_char_p, "**": ctypes.POINTER(ctypes.c_char_p)}[stars]
    if base in _HANDLES:  # opaque: a handle is a void*, an out-handle a void**
        return {"*": ctypes.c_void_p, "**": ctypes.POINTER(ctypes.c_void_p)}[stars]
    t = _SCALARS.get(base) or getattr(_lib, base)
    for _ in stars:
        t = ctypes.POINTER(t)
    return t


def test_every_header_entry_point_is_declared_in_header_order() -> None:
    names = [name for name, _, _ in _declarations()]
    assert len(names) >= 40, "the header parse found too few functions"
    assert list(_lib.ENTRY_POINTS) == names
    assert set(kvplug.ENTRY_POINTS) == set(names)


@pytest.mark.parametrize("name,ret,params", _declarations(), ids=[d[0] for d in _declarations()])
def test_entry_point_types_match_the_header(name: str, ret: str, params: List[str]) -> None:
    proto = {n: (r, a) for n, r, a in _lib.PROTOTYPES}
    restype, argtypes = proto[name]
    assert restype is _ctype(ret), f"{name} returns {ret}"
    assert list(argtypes) == [_ctype(p) for p in params], f"{name}({', '.join(params)})"
    # And on the loaded library: a missing argtypes would make ctypes guess.
    if not _lib.api().has(name):
        assert name in _lib.OPTIONAL_ENTRY_POINTS
        pytest.skip(f"{_lib.api().path} lacks {name} (added in ABI {_lib.OPTIONAL_ENTRY_POINTS[name]})")
    fn = getattr(_lib.api().cdll, name)
    assert fn.restype is restype and list(fn.argtypes) == list(argtypes)


@pytest.mark.parametrize("struct", sorted(_structs()))
def test_struct_fields_match_the_header(struct: str) -> None:
    fields = _structs()[struct]
    mirror = getattr(_lib, struct)
    assert [n for n, _ in mirror._fields_] == [n for _, n in fields]
    assert [t for _, t in mirror._fields_] == [_ctype(t) for t, _ in fields]
    if fields[0][1] == "struct_size":  # set automatically to the struct's size
        assert mirror().struct_size == ctypes.sizeof(mirror)


def _dlpack_include() -> List[str]:
    """-I flags for dlpack/dlpack.h: the build's CMake cache says where it was found."""
    flags = [f"-I{REPO_ROOT / 'abi' / 'include'}"]
    lib = pathlib.Path(_lib.api().path).resolve()
    for cache in (lib.parent.parent / "CMakeCache.txt", REPO_ROOT / "build" / "CMakeCache.txt"):
        if cache.exists():
            m = re.search(r"^DLPACK_INCLUDE_DIR:PATH=(.*)$", cache.read_text(), flags=re.M)
            if m:
                flags.append(f"-I{m.group(1)}")
            break
    return flags


def test_struct_layouts_match_the_c_compiler(tmp_path: pathlib.Path, c_compiler: str) -> None:
    structs = {name: [n for _, n in fields] for name, fields in _structs().items()}
    structs.update({"DLDevice": ["device_type", "device_id"], "DLDataType": ["code", "bits", "lanes"],
                    "DLTensor": [n for n, _ in _lib.DLTensor._fields_],
                    "DLManagedTensor": ["dl_tensor", "manager_ctx", "deleter"]})
    lines = ['#include <stddef.h>', '#include <stdio.h>', '#include <kvplug/kvplug.h>', 'int main(void) {',
             'printf("{");']
    for i, (s, fields) in enumerate(sorted(structs.items())):
        offs = ", ".join(f'offsetof({s}, {f})' for f in fields)
        fmt = ", ".join("%zu" for _ in fields)
        sep = "," if i else ""
        lines.append(f'printf("{sep}\\"{s}\\": [%zu, [{fmt}]]", sizeof({s}), {offs});')
    lines += ['printf("}\\n");', "return 0; }"]
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    subprocess.run([c_compiler, "-std=c99", *_dlpack_include(), str(src), "-o", str(exe)], check=True)
    measured = json.loads(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout)
    for s, (size, offsets) in measured.items():
        mirror = getattr(_lib, s)
        assert ctypes.sizeof(mirror) == size, s
        assert [getattr(mirror, f).offset for f in structs[s]] == offsets, s


def test_enum_values_match_the_header() -> None:
    for name in ["KVP_DTYPE_FLOAT32", "KVP_DTYPE_FLOAT16", "KVP_DTYPE_BFLOAT16", "KVP_DTYPE_FP8_E4M3",
                 "KVP_ALLOC_OK", "KVP_ALLOC_LATER", "KVP_ALLOC_NEVER", "KVP_LAYOUT_KV_FIRST",
                 "KVP_LAYOUT_BLOCK_FIRST", "KVP_CONFIG_NONE", "KVP_CONFIG_BINARY", "KVP_CONFIG_JSON",
                 "KVP_COMM_IN_PROCESS", "KVP_COMM_NCCL"]:
        m = re.search(rf"\b{name}\s*=\s*(\d+)", HEADER_TEXT)
        assert m and int(m.group(1)) == getattr(_lib, name), name
    m = re.search(r"#define KVP_NCCL_UNIQUE_ID_BYTES (\d+)", HEADER_TEXT)
    assert m and int(m.group(1)) == _lib.KVP_NCCL_UNIQUE_ID_BYTES
    from kvplug import errors

    for code, name in errors.STATUS_NAMES.items():
        m = re.search(rf"\b{name}\s*=\s*(\d+)", HEADER_TEXT)
        assert m and int(m.group(1)) == code, name
    major = re.search(r"#define KVP_ABI_VERSION_MAJOR (\d+)", HEADER_TEXT)
    assert major and int(major.group(1)) == kvplug.ABI_VERSION_MAJOR
    minor = re.search(r"#define KVP_ABI_VERSION_MINOR (\d+)", HEADER_TEXT)
    assert minor and int(minor.group(1)) == kvplug.ABI_VERSION_MINOR, "the binding mirrors an older header"


def test_abi_0_4_additions_are_mirrored() -> None:
    """The 0.4 fields and entry points by name (the generic checks above cover them; this one says
    what broke if the header's 0.4 section changes), and the 0.3-sized batch the binding sends
    when the 0.4 fields are unused."""
    structs = _structs()
    assert [n for _, n in structs["kvp_batch"]][-2:] == ["context_lens", "query_pos_starts"]
    assert "kvp_comm_options" in structs and "kvp_star_layout" in structs
    for name in ("kvp_comm_nccl_unique_id", "kvp_comm_create", "kvp_comm_destroy", "kvp_comm_merge_attention",
                 "kvp_comm_pending", "kvp_block_manager_allocate_star"):
        assert name in _lib.ENTRY_POINTS and name in _lib.OPTIONAL_ENTRY_POINTS
    # Only 0.4 and 0.5 additions may be optional: everything older must be in every library this loads.
    assert set(_lib.OPTIONAL_ENTRY_POINTS.values()) == {"0.4", "0.5"}
    assert _lib.KVP_BATCH_SIZE_0_3 == _lib.kvp_batch.context_lens.offset
    assert _lib.KVP_BATCH_SIZE_0_3 == _lib.kvp_batch.state_slots.offset + ctypes.sizeof(ctypes.c_void_p)
    # kvp_attention_outputs gained entropy_summary, last; without it the 0.3-sized struct is sent.
    assert [n for _, n in structs["kvp_attention_outputs"]] == ["struct_size", "out", "lse", "entropy",
                                                               "entropy_summary"]
    assert [t for t, _ in structs["kvp_attention_outputs"]][-1] == "DLTensor*"
    assert _lib.KVP_ATTENTION_OUTPUTS_SIZE_0_3 == _lib.kvp_attention_outputs.entropy_summary.offset
    assert _lib.KVP_ATTENTION_OUTPUTS_SIZE_0_3 == (_lib.kvp_attention_outputs.entropy.offset
                                                   + ctypes.sizeof(ctypes.c_void_p))
    assert _lib.ctypes.sizeof(_lib.kvp_attention_outputs) == (_lib.KVP_ATTENTION_OUTPUTS_SIZE_0_3
                                                              + ctypes.sizeof(ctypes.c_void_p))
    # The summary's columns, in telemetry.h's order (the header's comment lists them the same way).
    assert _lib.ENTROPY_SUMMARY_FIELDS == kvplug.ENTROPY_SUMMARY_FIELDS == (
        "rows", "mean_entropy", "informative_rows", "mean_normalized_entropy", "collapse_rows", "overload_rows")
    assert re.search(r"entropy_summary;.*\[num_q_heads, 6\]", HEADER.read_text().replace("\n", " "))


def test_abi_0_5_additions_are_mirrored() -> None:
    """The 0.5 structs and entry points by name, in the header's order, and optional (a 0.4 library
    still loads)."""
    structs = _structs()
    assert [n for _, n in structs["kvp_cache_layout"]] == [
        "struct_size", "seq_len", "num_pages", "compressed_rows", "compressed_pages", "stable_rows",
        "window_first_page", "window_pages"]
    assert [n for _, n in structs["kvp_ssm_args"]] == [
        "struct_size", "which", "in", "conv_weight", "conv_bias", "dt_bias", "a_log", "d_skip", "norm_weight", "out"]
    names = list(_lib.ENTRY_POINTS)
    i = names.index("kvp_attention_state_bytes")
    assert names[i + 1:i + 3] == ["kvp_attention_cache_layout", "kvp_attention_ssm"]
    assert {n for n, v in _lib.OPTIONAL_ENTRY_POINTS.items() if v == "0.5"} == {"kvp_attention_cache_layout",
                                                                                 "kvp_attention_ssm"}
    assert kvplug.ABI_VERSION_MINOR == 5
