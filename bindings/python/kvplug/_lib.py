"""Loading libkvplug.so and declaring its C ABI (``abi/include/kvplug/kvplug.h``) for ctypes.

Every entry point of the header is declared here with its exact argtypes and restype, and every
struct is mirrored field for field in header order, so ctypes converts and checks arguments instead
of guessing (a guessed ``int`` return would truncate pointers; a guessed argument would be passed
with the wrong width). ``tests/test_abi_surface.py`` parses the header and checks this table
against it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from ctypes import (
    CFUNCTYPE,
    POINTER,
    c_char_p,
    c_double,
    c_float,
    c_int,
    c_int32,
    c_int64,
    c_size_t,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
)
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import LibraryLoadError, NotSupportedError, error_for_status

#: The ABI major version this binding was written for (KVP_ABI_VERSION_MAJOR of kvplug.h).
ABI_VERSION_MAJOR = 0
#: The minor version whose header this binding mirrors (newer minors only add things).
ABI_VERSION_MINOR = 5

# ------------------------------------------------------------------------------------------------
# DLPack (dlpack/dlpack.h). DLTensor's layout is the same in DLPack 0.x and 1.x.
# ------------------------------------------------------------------------------------------------

kDLCPU = 1
kDLCUDA = 2
kDLCUDAHost = 3
kDLROCM = 10

kDLInt = 0
kDLUInt = 1
kDLFloat = 2
kDLBfloat = 4

# DLManagedTensorVersioned.flags bits (DLPack >= 1.0).
DLPACK_FLAG_BITMASK_READ_ONLY = 1 << 0
DLPACK_FLAG_BITMASK_IS_COPIED = 1 << 1


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", c_int), ("device_id", c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", c_uint8), ("bits", c_uint8), ("lanes", c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", c_void_p),
        ("device", DLDevice),
        ("ndim", c_int32),
        ("dtype", DLDataType),
        ("shape", POINTER(c_int64)),
        ("strides", POINTER(c_int64)),
        ("byte_offset", c_uint64),
    ]


class DLManagedTensor(ctypes.Structure):
    pass


DLManagedTensor._fields_ = [
    ("dl_tensor", DLTensor),
    ("manager_ctx", c_void_p),
    ("deleter", CFUNCTYPE(None, POINTER(DLManagedTensor))),
]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", c_uint32), ("minor", c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    pass


DLManagedTensorVersioned._fields_ = [
    ("version", DLPackVersion),
    ("manager_ctx", c_void_p),
    ("deleter", CFUNCTYPE(None, POINTER(DLManagedTensorVersioned))),
    ("flags", c_uint64),
    ("dl_tensor", DLTensor),
]

# ------------------------------------------------------------------------------------------------
# kvplug structs, in header order. Structs that begin with struct_size set it on construction, so a
# caller can never forget it (the library reads only struct_size bytes of the caller's struct).
# ------------------------------------------------------------------------------------------------


class _Sized(ctypes.Structure):
    """A struct whose first field is ``struct_size``, set to ``sizeof`` the struct on construction."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "struct_size" not in kwargs:
            self.struct_size = ctypes.sizeof(type(self))


class kvp_backend_info(_Sized):
    _fields_ = [
        ("struct_size", c_size_t),
        ("name", c_char_p),
        ("dtype_mask", c_uint32),
        ("device_mask", c_uint32),
        ("head_sizes", POINTER(c_int32)),
        ("num_head_sizes", c_int32),
        ("supports_lse", c_int32),
        ("needs_state_slots", c_int32),
    ]


class kvp_backend_device_info(_Sized):  # since ABI 0.3
    _fields_ = [
        ("struct_size", c_size_t),
        ("device_type", c_int32),
        ("available", c_int32),
        ("dtype_mask", c_uint32),
        ("head_sizes", POINTER(c_int32)),
        ("num_head_sizes", c_int32),
        ("supports_lse", c_int32),
        ("supports_entropy", c_int32),
        ("needs_state_slots", c_int32),
        ("experimental", c_int32),
    ]


class kvp_context_options(_Sized):
    _fields_ = [
        ("struct_size", c_size_t),
        ("device_type", c_int32),
        ("device_id", c_int32),
        ("num_threads", c_int32),
        ("stream", c_void_p),
    ]


class kvp_block_manager_options(_Sized):
    _fields_ = [
        ("struct_size", c_size_t),
        ("block_size", c_int32),
        ("num_device_blocks", c_int32),
        ("num_host_blocks", c_int32),
        ("enable_prefix_caching", c_int32),
        ("watermark", c_double),
        ("num_state_slots", c_int32),
        ("hash_seed", c_uint64),
    ]


class kvp_block_copy(ctypes.Structure):
    _fields_ = [("src", c_int32), ("dst", c_int32)]


class kvp_block_manager_stats(_Sized):
    _fields_ = [
        ("struct_size", c_size_t),
        ("num_device_blocks", c_int32),
        ("num_free_blocks", c_int32),
        ("num_cached_free_blocks", c_int32),
        ("num_used_blocks", c_int32),
        ("num_host_blocks", c_int32),
        ("num_free_host_blocks", c_int32),
        ("num_sequences", c_int32),
        ("num_swapped_sequences", c_int32),
        ("prefix_queried_blocks", c_int64),
        ("prefix_hit_blocks", c_int64),
        ("num_evictions", c_int64),
    ]


class kvp_kv_cache_options(_Sized):
    _fields_ = [
        ("struct_size", c_size_t),
        ("num_layers", c_int32),
        ("num_blocks", c_int32),
        ("block_size", c_int32),
        ("num_kv_heads", c_int32),
        ("head_size", c_int32),
        ("dtype", c_int32),
        ("layout", c_int32),
        ("num_host_blocks", c_int32),
        ("num_state_slots", c_int32),
        ("state_bytes_per_layer", c_int64),
        # Since ABI 0.2: per-layer fp8 scales (NULL = 1.0).
        ("k_scales", POINTER(c_float)),
        ("v_scales", POINTER(c_float)),
    ]


class kvp_plan_options(_Sized):
    _fields_ = [
        ("struct_size", c_size_t),
        ("max_num_seqs", c_int32),
        ("max_num_tokens", c_int32),
        ("max_num_blocks", c_int32),
    ]


class kvp_batch(_Sized):
    _fields_ = [
        ("struct_size", c_size_t),
        ("num_seqs", c_int32),
        ("block_size", c_int32),
        ("query_start_loc", POINTER(c_int32)),
        ("seq_lens", POINTER(c_int32)),
        ("block_table", POINTER(c_int32)),
        ("block_table_stride", c_int32),
        ("kv_indptr", POINTER(c_int32)),
        ("kv_indices", POINTER(c_int32)),
        ("slot_mapping", POINTER(c_int64)),
        ("state_slots", POINTER(c_int32)),
        # Since ABI 0.4 (optional; NULL keeps the 0.3 meaning).
        ("context_lens", POINTER(c_int32)),
        ("query_pos_starts", POINTER(c_int32)),
    ]


#: sizeof(kvp_batch) as ABI 0.3 declared it: a batch without the 0.4 fields is sent with this size,
#: so that it also works with 0.3 libraries (which reject a struct_size larger than they know).
KVP_BATCH_SIZE_0_3 = kvp_batch.context_lens.offset


class kvp_attention_options(_Sized):
    _fields_ = [
        ("struct_size", c_size_t),
        ("backend", c_char_p),
        ("num_q_heads", c_int32),
        ("num_kv_heads", c_int32),
        ("head_size", c_int32),
        ("kv_dtype", c_int32),
        ("sm_scale", c_float),
        ("config_format", c_int32),
        ("config", c_void_p),
        ("config_size", c_size_t),
    ]


class kvp_attention_outputs(_Sized):  # since ABI 0.3
    _fields_ = [
        ("struct_size", c_size_t),
        ("out", POINTER(DLTensor)),
        ("lse", POINTER(DLTensor)),
        ("entropy", POINTER(DLTensor)),
        # Since ABI 0.4: the per-head entropy summary [num_q_heads, 6] (kvp_attention_outputs.entropy_summary).
        ("entropy_summary", POINTER(DLTensor)),
    ]


#: sizeof(kvp_attention_outputs) as ABI 0.3 declared it: outputs without an entropy summary are sent
#: with this size, so that runs with entropy also work with 0.3 libraries.
KVP_ATTENTION_OUTPUTS_SIZE_0_3 = kvp_attention_outputs.entropy_summary.offset

#: The fields of one head's row of kvp_attention_outputs.entropy_summary, in order (telemetry.h).
ENTROPY_SUMMARY_FIELDS = ("rows", "mean_entropy", "informative_rows", "mean_normalized_entropy", "collapse_rows",
                          "overload_rows")


class kvp_merge_states_args(_Sized):  # since ABI 0.3
    _fields_ = [
        ("struct_size", c_size_t),
        ("partial_out", POINTER(DLTensor)),
        ("partial_lse", POINTER(DLTensor)),
        ("partial_entropy", POINTER(DLTensor)),
        ("out", POINTER(DLTensor)),
        ("lse", POINTER(DLTensor)),
        ("entropy", POINTER(DLTensor)),
    ]


class kvp_comm_options(_Sized):  # since ABI 0.4
    _fields_ = [
        ("struct_size", c_size_t),
        ("kind", c_int32),
        ("num_ranks", c_int32),
        ("rank", c_int32),
        ("nccl_unique_id", POINTER(c_uint8)),
        ("max_num_tokens", c_int32),
        ("num_heads", c_int32),
        ("head_size", c_int32),
        ("out_dtype", c_int32),
        ("validate_each_call", c_int32),
    ]


class kvp_star_layout(_Sized):  # since ABI 0.4
    _fields_ = [
        ("struct_size", c_size_t),
        ("context_len", c_int64),
        ("context_block_size", c_int32),
        ("anchor_size", c_int32),
    ]


class kvp_cache_layout(_Sized):  # since ABI 0.5
    _fields_ = [
        ("struct_size", c_size_t),
        ("seq_len", c_int32),
        ("num_pages", c_int32),
        ("compressed_rows", c_int32),
        ("compressed_pages", c_int32),
        ("stable_rows", c_int32),
        ("window_first_page", c_int32),
        ("window_pages", c_int32),
    ]


class kvp_ssm_args(_Sized):  # since ABI 0.5
    _fields_ = [
        ("struct_size", c_size_t),
        ("which", c_int32),
        ("in", POINTER(DLTensor)),
        ("conv_weight", POINTER(DLTensor)),
        ("conv_bias", POINTER(DLTensor)),
        ("dt_bias", POINTER(DLTensor)),
        ("a_log", POINTER(DLTensor)),
        ("d_skip", POINTER(DLTensor)),
        ("norm_weight", POINTER(DLTensor)),
        ("out", POINTER(DLTensor)),
    ]


# Enum values of kvplug.h.
KVP_DTYPE_FLOAT32 = 0
KVP_DTYPE_FLOAT16 = 1
KVP_DTYPE_BFLOAT16 = 2
KVP_DTYPE_FP8_E4M3 = 3
KVP_ALLOC_OK = 0
KVP_ALLOC_LATER = 1
KVP_ALLOC_NEVER = 2
KVP_LAYOUT_KV_FIRST = 0
KVP_LAYOUT_BLOCK_FIRST = 1
KVP_CONFIG_NONE = 0
KVP_CONFIG_BINARY = 1
KVP_CONFIG_JSON = 2
KVP_COMM_IN_PROCESS = 1  # since ABI 0.4
KVP_COMM_NCCL = 2
KVP_NCCL_UNIQUE_ID_BYTES = 128

# ------------------------------------------------------------------------------------------------
# Entry points: (name, restype, argtypes), in header order. Enums cross the ABI as C ints
# (kvp_status, kvp_alloc_verdict); opaque handles as void pointers.
# ------------------------------------------------------------------------------------------------

_status = c_int
_handle = c_void_p
_out_handle = POINTER(c_void_p)
_copies = POINTER(kvp_block_copy)
_tensor = POINTER(DLTensor)

PROTOTYPES: List[Tuple[str, Any, Sequence[Any]]] = [
    ("kvp_abi_version", c_uint32, []),
    ("kvp_version_string", c_char_p, []),
    ("kvp_status_string", c_char_p, [c_int]),
    ("kvp_last_error", c_char_p, []),
    ("kvp_backend_count", _status, [POINTER(c_int32)]),
    ("kvp_backend_name", _status, [c_int32, POINTER(c_char_p)]),
    ("kvp_backend_info_get", _status, [c_char_p, POINTER(kvp_backend_info)]),
    ("kvp_backend_device_info_get", _status, [c_char_p, c_int32, POINTER(kvp_backend_device_info)]),
    ("kvp_context_create", _status, [POINTER(kvp_context_options), _out_handle]),
    ("kvp_context_destroy", None, [_handle]),
    ("kvp_context_set_stream", _status, [_handle, c_void_p]),
    ("kvp_block_manager_create", _status, [POINTER(kvp_block_manager_options), _out_handle]),
    ("kvp_block_manager_destroy", None, [_handle]),
    ("kvp_block_manager_can_allocate", _status, [_handle, POINTER(c_int32), c_int64, c_uint64, POINTER(c_int)]),
    ("kvp_block_manager_allocate", _status, [_handle, c_uint64, POINTER(c_int32), c_int64, c_uint64, POINTER(c_int64)]),
    ("kvp_block_manager_can_append", _status, [_handle, c_uint64, c_int64, POINTER(c_int32)]),
    ("kvp_block_manager_append", _status, [_handle, c_uint64, POINTER(c_int32), c_int64, _copies, POINTER(c_int32)]),
    ("kvp_block_manager_mark_computed", _status, [_handle, c_uint64, c_int64]),
    ("kvp_block_manager_fork", _status, [_handle, c_uint64, c_uint64]),
    ("kvp_block_manager_free", _status, [_handle, c_uint64]),
    ("kvp_block_manager_num_tokens", _status, [_handle, c_uint64, POINTER(c_int64)]),
    ("kvp_block_manager_block_table", _status, [_handle, c_uint64, POINTER(c_int32), c_int32, POINTER(c_int32)]),
    ("kvp_block_manager_block_tables", _status,
     [_handle, POINTER(c_uint64), c_int32, POINTER(c_int32), c_int32, POINTER(c_int32)]),
    ("kvp_block_manager_slot_mapping", _status, [_handle, c_uint64, c_int64, c_int64, POINTER(c_int64)]),
    ("kvp_block_manager_state_slot", _status, [_handle, c_uint64, POINTER(c_int32)]),
    ("kvp_block_manager_swap_out", _status, [_handle, c_uint64, _copies, c_int32, POINTER(c_int32)]),
    ("kvp_block_manager_swap_in", _status, [_handle, c_uint64, _copies, c_int32, POINTER(c_int32)]),
    ("kvp_block_manager_is_swapped", _status, [_handle, c_uint64, POINTER(c_int32)]),
    ("kvp_block_manager_stats_get", _status, [_handle, POINTER(kvp_block_manager_stats)]),
    ("kvp_kv_cache_create", _status, [_handle, POINTER(kvp_kv_cache_options), _out_handle]),
    ("kvp_kv_cache_create_from_tensors", _status,
     [_handle, POINTER(kvp_kv_cache_options), _tensor, c_int32, _out_handle]),
    ("kvp_kv_cache_destroy", None, [_handle]),
    ("kvp_kv_cache_layer_view", _status, [_handle, c_int32, c_int32, _tensor]),
    ("kvp_kv_cache_write", _status, [_handle, c_int32, _tensor, _tensor, _tensor]),
    ("kvp_kv_cache_copy_blocks", _status, [_handle, _copies, c_int32]),
    ("kvp_kv_cache_swap_out", _status, [_handle, _copies, c_int32]),
    ("kvp_kv_cache_swap_in", _status, [_handle, _copies, c_int32]),
    ("kvp_kv_cache_state", _status, [_handle, c_int32, c_int32, POINTER(c_void_p), POINTER(c_int64)]),
    ("kvp_kv_cache_copy_state", _status, [_handle, c_int32, c_int32]),
    ("kvp_plan_create", _status, [_handle, POINTER(kvp_plan_options), _out_handle]),
    ("kvp_plan_destroy", None, [_handle]),
    ("kvp_plan_update", _status, [_handle, POINTER(kvp_batch)]),
    ("kvp_plan_attach", _status, [_handle, _handle]),
    ("kvp_attention_create", _status, [_handle, POINTER(kvp_attention_options), _out_handle]),
    ("kvp_attention_destroy", None, [_handle]),
    ("kvp_config_check", _status, [c_char_p, c_int32, c_void_p, c_size_t]),
    ("kvp_attention_write_kv", _status, [_handle, _handle, _handle, c_int32, _tensor, _tensor]),
    ("kvp_attention_run", _status, [_handle, _handle, _handle, c_int32, _tensor, _tensor, _tensor]),
    ("kvp_attention_run_v2", _status, [_handle, _handle, _handle, c_int32, _tensor, POINTER(kvp_attention_outputs)]),
    ("kvp_attention_merge_states", _status, [_handle, POINTER(kvp_merge_states_args)]),
    ("kvp_attention_state_bytes", _status, [_handle, POINTER(c_int64)]),
    # Since ABI 0.5 (declared before the 0.4 communicators: header order).
    ("kvp_attention_cache_layout", _status, [_handle, c_int32, c_int32, c_int32, POINTER(kvp_cache_layout)]),
    ("kvp_attention_ssm", _status, [_handle, _handle, _handle, c_int32, POINTER(kvp_ssm_args)]),
    # Since ABI 0.4.
    ("kvp_comm_nccl_unique_id", _status, [POINTER(c_uint8)]),
    ("kvp_comm_create", _status, [_handle, POINTER(kvp_comm_options), _out_handle]),
    ("kvp_comm_destroy", None, [_handle]),
    ("kvp_comm_merge_attention", _status, [_handle, c_int32, _tensor, _tensor]),
    ("kvp_comm_pending", _status, [_handle, POINTER(c_int32)]),
    ("kvp_block_manager_allocate_star", _status,
     [_handle, c_uint64, POINTER(c_int32), c_int64, c_uint64, POINTER(kvp_star_layout), POINTER(c_uint8),
      POINTER(c_int64)]),
]

ENTRY_POINTS: Tuple[str, ...] = tuple(name for name, _, _ in PROTOTYPES)

#: Entry points a library of an older minor (or a build in progress) may lack, with the ABI version
#: that added them. Loading does not require them; calling a missing one raises NotSupportedError
#: (see :meth:`Api.has`). Every other entry point must be present.
OPTIONAL_ENTRY_POINTS: Dict[str, str] = {
    "kvp_comm_nccl_unique_id": "0.4",
    "kvp_comm_create": "0.4",
    "kvp_comm_destroy": "0.4",
    "kvp_comm_merge_attention": "0.4",
    "kvp_comm_pending": "0.4",
    "kvp_block_manager_allocate_star": "0.4",
    "kvp_attention_cache_layout": "0.5",
    "kvp_attention_ssm": "0.5",
}


def _missing_entry_point(name: str, path: str) -> Any:
    """A stand-in for an optional entry point that the library lacks: raises NotSupportedError."""

    def missing(*args: Any) -> Any:
        raise NotSupportedError(f"{path} has no entry point {name} (added in kvplug ABI "
                                f"{OPTIONAL_ENTRY_POINTS[name]}): update libkvplug")

    missing.__name__ = name
    return missing


class Api:
    """The loaded library: one attribute per entry point (a ctypes function with argtypes/restype set).

    ``path`` is where it was loaded from and ``version`` its ``kvp_abi_version()``.
    """

    path: str
    version: int
    cdll: ctypes.CDLL

    def __init__(self, cdll: ctypes.CDLL, path: str) -> None:
        self.cdll = cdll
        self.path = path
        #: Optional entry points (OPTIONAL_ENTRY_POINTS) this library lacks.
        self.missing: Tuple[str, ...] = ()
        missing: List[str] = []
        for name, restype, argtypes in PROTOTYPES:
            try:
                fn = getattr(cdll, name)
            except AttributeError as e:
                if name in OPTIONAL_ENTRY_POINTS:
                    missing.append(name)
                    setattr(self, name, _missing_entry_point(name, path))
                    continue
                raise LibraryLoadError(f"{path} lacks the entry point {name}: not a kvplug library of ABI "
                                       f"{ABI_VERSION_MAJOR}.3 or newer") from e
            fn.restype = restype
            fn.argtypes = list(argtypes)
            setattr(self, name, fn)
        self.missing = tuple(missing)
        self.version = int(self.kvp_abi_version())

    def has(self, name: str) -> bool:
        """Whether the library exports entry point ``name`` (False for optional ones it lacks)."""
        return name in ENTRY_POINTS and name not in self.missing

    def __getattr__(self, name: str) -> Any:  # only reached for names not set above
        raise AttributeError(f"kvplug has no entry point {name!r}")


def check_abi_version(version: int, path: str) -> None:
    """Raise LibraryLoadError unless ``version`` (a kvp_abi_version() value) has this binding's major."""
    major, minor, patch = version // 10000, version // 100 % 100, version % 100
    if major != ABI_VERSION_MAJOR:
        raise LibraryLoadError(
            f"{path} has kvplug ABI {major}.{minor}.{patch} but this Python binding was written for ABI "
            f"major {ABI_VERSION_MAJOR}: install the binding that matches the library (or point "
            f"KVPLUG_LIBRARY at a libkvplug.so.{ABI_VERSION_MAJOR})")


def _abi_version_only(path: str) -> Tuple[ctypes.CDLL, int]:
    """dlopen ``path`` and read kvp_abi_version() before anything else: a library of another major
    version may not have (or may have changed) the other entry points."""
    try:
        cdll = ctypes.CDLL(path)
    except OSError as e:
        raise LibraryLoadError(f"cannot load {path}: {e}") from e
    try:
        fn = cdll.kvp_abi_version
    except AttributeError as e:
        raise LibraryLoadError(f"{path} has no kvp_abi_version(): not a kvplug library") from e
    fn.restype = c_uint32
    fn.argtypes = []
    return cdll, int(fn())


def bundled_library() -> Optional[str]:
    """The library installed in the package folder (a wheel ships ``libkvplug.so.0`` next to the
    modules), or None when the package has none (a source checkout)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for name in (f"libkvplug.so.{ABI_VERSION_MAJOR}", "libkvplug.so"):
        path = os.path.join(here, name)
        if os.path.exists(path):
            return path
    return None


def candidate_paths() -> List[str]:
    """Where :func:`load` looks, in order: ``$KVPLUG_LIBRARY`` alone when it is set; else the library
    in the package folder alone when there is one (a library on the loader's path, LD_LIBRARY_PATH
    or the system's, never replaces the one the package ships); else the loader's path
    (``ctypes.util.find_library``, then the soname)."""
    env = os.environ.get("KVPLUG_LIBRARY")
    if env:
        return [env]
    bundled = bundled_library()
    if bundled is not None:
        return [bundled]
    out: List[str] = []
    found = ctypes.util.find_library("kvplug")
    if found:
        out.append(found)
    out.append(f"libkvplug.so.{ABI_VERSION_MAJOR}")
    return out


_lock = threading.Lock()
_api: Optional[Api] = None


def load(path: Optional[str] = None) -> Api:
    """Load libkvplug (once per process) and check its ABI major version.

    ``path`` overrides the search of :func:`candidate_paths`. Raises LibraryLoadError when no
    candidate loads or the library's ABI major is not ``ABI_VERSION_MAJOR``. Loading again with
    another path after a successful load is refused (two copies of the library would not share
    handles).
    """
    global _api
    with _lock:
        if _api is not None:
            if path is not None and os.path.realpath(path) != os.path.realpath(_api.path):
                raise LibraryLoadError(f"kvplug is already loaded from {_api.path}; cannot load {path} too")
            return _api
        explicit = path if path is not None else os.environ.get("KVPLUG_LIBRARY") or None
        if explicit is None:
            explicit = bundled_library()
        if explicit is not None:
            # An explicit path, or the package's own library, is never second-guessed: its failure
            # is the error (falling back to another libkvplug on the loader's path would hide it).
            cdll, version = _abi_version_only(explicit)
            check_abi_version(version, explicit)
            _api = Api(cdll, explicit)
            return _api
        tried: List[str] = []
        for candidate in candidate_paths():
            try:
                cdll, version = _abi_version_only(candidate)
            except LibraryLoadError as e:
                tried.append(e.message)
                continue
            check_abi_version(version, candidate)  # a wrong version is an error, not a reason to go on
            _api = Api(cdll, candidate)
            return _api
        raise LibraryLoadError("libkvplug.so not found; set KVPLUG_LIBRARY to its path. Tried:\n  " +
                               "\n  ".join(tried))


def api() -> Api:
    """The loaded library, loading it on first use."""
    return _api if _api is not None else load()


def check(status: int) -> None:
    """Raise the KvplugError subclass of a failed status, with kvp_last_error() as its message.

    Must run right after the failing call on the same thread: the message is thread-local and the
    next kvplug call replaces it.
    """
    if status != 0:
        a = api()
        message = a.kvp_last_error().decode("utf-8", "replace")
        name = a.kvp_status_string(status).decode("ascii", "replace")
        raise error_for_status(status, message, name)


def c_str(b: Optional[bytes]) -> str:
    """A C string (static storage) as Python text."""
    return "" if b is None else b.decode("utf-8", "replace")


__all__: List[str] = []  # internal module
