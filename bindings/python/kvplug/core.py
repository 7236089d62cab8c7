"""The handle classes of kvplug: Context, BlockManager, KvCache, Plan, Attention, Communicator.

Lifetime rules (why they are what they are):

* Each class owns one C handle. ``close()`` (or leaving a ``with`` block) gives the handle up; it is
  idempotent, and any later method call raises :class:`FailedPreconditionError` instead of passing
  a dangling pointer to C.
* The C objects point at each other: a cache, plan or attention created from a context keeps a
  pointer to it, and a cache built over caller tensors points into them. So each native handle
  holds references to what it depends on, and is destroyed only once nothing depends on it any
  more: closing a Context that a live KvCache still uses makes the Context unusable from Python at
  once, but frees the C context only after the cache is gone. NumPy views returned by
  :meth:`KvCache.layer_view` and :meth:`KvCache.state` likewise keep the cache's memory alive.
* Handles are not destroyed at interpreter exit (the OS reclaims the memory): a daemon thread still
  inside a kvplug call would otherwise crash on freed memory.
"""
from __future__ import annotations

import ctypes
import dataclasses
import enum
import json
import math
import threading
import weakref
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union, cast

import numpy as np
from numpy.typing import NDArray

from . import _dlpack, _lib
from ._lib import api, c_str, check
from .errors import FailedPreconditionError, InvalidArgumentError, NotSupportedError, OutOfRangeError

# ------------------------------------------------------------------------------------------------
# Small value types
# ------------------------------------------------------------------------------------------------

#: Cache dtypes by name, as kvp_dtype values.
DTYPES: Dict[str, int] = {
    "float32": _lib.KVP_DTYPE_FLOAT32,
    "float16": _lib.KVP_DTYPE_FLOAT16,
    "bfloat16": _lib.KVP_DTYPE_BFLOAT16,
    "fp8_e4m3": _lib.KVP_DTYPE_FP8_E4M3,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

#: KV cache layouts by name, as kvp_kv_layout values.
LAYOUTS: Dict[str, int] = {"kv_first": _lib.KVP_LAYOUT_KV_FIRST, "block_first": _lib.KVP_LAYOUT_BLOCK_FIRST}
_LAYOUT_NAMES = {v: k for k, v in LAYOUTS.items()}

#: Device types by name, as DLDeviceType values.
DEVICES: Dict[str, int] = {"cpu": _lib.kDLCPU, "cuda": _lib.kDLCUDA}

DTypeLike = Union[str, int, "np.dtype[Any]", type]
ArrayLike = Any  # anything np.asarray accepts
Config = Union[None, Dict[str, Any], str, bytes, bytearray, memoryview]


class AllocVerdict(enum.IntEnum):
    """kvp_alloc_verdict: can a new sequence be allocated now, later, or never?"""

    OK = _lib.KVP_ALLOC_OK
    LATER = _lib.KVP_ALLOC_LATER
    NEVER = _lib.KVP_ALLOC_NEVER


class BlockCopy(NamedTuple):
    """One block copy (kvp_block_copy): the unit of copy-on-write and swap plans. A plain tuple."""

    src: int
    dst: int


@dataclasses.dataclass(frozen=True)
class BlockManagerStats:
    """kvp_block_manager_stats: a snapshot of the block pool and the prefix cache."""

    num_device_blocks: int
    num_free_blocks: int
    num_cached_free_blocks: int
    num_used_blocks: int
    num_host_blocks: int
    num_free_host_blocks: int
    num_sequences: int
    num_swapped_sequences: int
    prefix_queried_blocks: int
    prefix_hit_blocks: int
    num_evictions: int


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """kvp_backend_info, with the masks also decoded into names."""

    name: str
    dtype_mask: int
    device_mask: int
    dtypes: Tuple[str, ...]
    device_types: Tuple[int, ...]
    head_sizes: Tuple[int, ...]
    supports_lse: bool
    needs_state_slots: bool


@dataclasses.dataclass(frozen=True)
class BackendDeviceInfo:
    """kvp_backend_device_info: what a backend offers on one device type in this build."""

    name: str
    device_type: int
    available: bool
    dtype_mask: int
    dtypes: Tuple[str, ...]
    head_sizes: Tuple[int, ...]
    supports_lse: bool
    supports_entropy: bool
    needs_state_slots: bool
    experimental: bool


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """kvp_cache_layout (ABI 0.5): where a sequence's K/V rows live in its page list for one step
    (:meth:`Attention.cache_layout`). Token-stream backends: ``seq_len`` = num_tokens and nothing
    compressed. attamba: ``[compressed_pages][window_pages from token page window_first_page]``;
    pass ``seq_len`` as the batch's seq_lens entry."""

    seq_len: int
    num_pages: int
    compressed_rows: int
    compressed_pages: int
    stable_rows: int
    window_first_page: int
    window_pages: int


# ------------------------------------------------------------------------------------------------
# Argument conversion. Raw pointers cross the ABI with counts the binding computes itself from the
# arrays, so C can never be told to read past the end of a Python buffer.
# ------------------------------------------------------------------------------------------------

_I32 = (-(1 << 31), (1 << 31) - 1)
_I64 = (-(1 << 63), (1 << 63) - 1)
_U64 = (0, (1 << 64) - 1)


def _int(value: Any, name: str, bounds: Tuple[int, int] = _I32) -> int:
    """A Python int within ``bounds``: ctypes would silently wrap an out-of-range one."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InvalidArgumentError(f"{name}={value!r} is not an integer")
    v = int(value)
    if not bounds[0] <= v <= bounds[1]:
        raise InvalidArgumentError(f"{name}={v} is out of range [{bounds[0]}, {bounds[1]}]")
    return v


def _seq_id(value: Any, name: str = "seq_id") -> int:
    return _int(value, name, _U64)


def _int_array(value: ArrayLike, dtype: Any, name: str, ndim: int) -> NDArray[Any]:
    """``value`` as a C-contiguous array of ``dtype`` (int32/int64/uint64) with ``ndim`` dimensions.

    Converts losslessly or raises: an int64 value that does not fit int32 is an error, not a wrap.
    """
    a = np.asarray(value)
    if a.dtype.kind not in "iu" and not (a.size == 0 and a.dtype.kind == "f"):  # [] parses as float64
        raise InvalidArgumentError(f"{name}: dtype {a.dtype} is not an integer type")
    if a.ndim != ndim:
        raise InvalidArgumentError(f"{name}: expected {ndim} dimension(s), got shape {a.shape}")
    if a.dtype != dtype and a.size:
        info = np.iinfo(dtype)
        lo, hi = a.min(), a.max()
        if lo < info.min or hi > info.max:
            raise InvalidArgumentError(f"{name}: values in [{lo}, {hi}] do not fit {np.dtype(dtype).name}")
    return np.ascontiguousarray(a, dtype=dtype)


def _ptr(a: Optional[NDArray[Any]], ctype: Any) -> Any:
    """A typed pointer to a contiguous array's data (None stays NULL)."""
    return None if a is None else a.ctypes.data_as(ctypes.POINTER(ctype))


def _copies(copies: Union[Iterable[Tuple[int, int]], NDArray[Any]]) -> Tuple[NDArray[np.int32], int]:
    """Block copies as an [n, 2] int32 array, laid out as kvp_block_copy[n] (src, dst pairs)."""
    if isinstance(copies, np.ndarray):
        a = copies
    else:
        pairs: List[Any] = list(copies)
        if len(pairs) == 2 and all(isinstance(x, (int, np.integer)) for x in pairs):
            pairs = [tuple(pairs)]  # one (src, dst) pair, e.g. what BlockManager.append returned
        a = np.asarray([tuple(c) for c in pairs], dtype=np.int64)
    if a.size == 0:
        a = np.zeros((0, 2), np.int64)
    arr = _int_array(a, np.int32, "copies", 2)
    if arr.shape[1] != 2:
        raise InvalidArgumentError(f"copies: expected (src, dst) pairs, got shape {arr.shape}")
    return arr, int(arr.shape[0])


def _dtype_code(dtype: DTypeLike, name: str = "dtype") -> int:
    """A kvp_dtype from a name ("float32", "bfloat16", ...), a NumPy dtype, or the enum value."""
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        return int(dtype)  # the library checks the range and names the value
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    as_np: Optional["np.dtype[Any]"]
    try:
        as_np = np.dtype(cast(Any, dtype))
    except TypeError:
        as_np = None
    if as_np is not None and as_np.name in DTYPES:
        return DTYPES[as_np.name]
    raise InvalidArgumentError(f"{name}={dtype!r} is not one of {sorted(DTYPES)}")


def _device_code(device: Union[str, int]) -> int:
    """A DLDeviceType from "cpu"/"cuda" or the enum value (the library checks the value)."""
    if isinstance(device, str):
        if device not in DEVICES:
            raise InvalidArgumentError(f"device={device!r} is not one of {sorted(DEVICES)}")
        return DEVICES[device]
    return _int(device, "device")


def _layout_code(layout: Union[str, int]) -> int:
    if isinstance(layout, str):
        if layout not in LAYOUTS:
            raise InvalidArgumentError(f"layout={layout!r} is not one of {sorted(LAYOUTS)}")
        return LAYOUTS[layout]
    return _int(layout, "layout")


def _config(config: Config) -> Tuple[int, Optional[Any], int]:
    """(kvp_config_format, buffer, size) of a config. The buffer must outlive the C call."""
    if config is None:
        return _lib.KVP_CONFIG_NONE, None, 0
    if isinstance(config, dict):
        data = json.dumps(config).encode("utf-8")
        fmt = _lib.KVP_CONFIG_JSON
    elif isinstance(config, str):
        data = config.encode("utf-8")
        fmt = _lib.KVP_CONFIG_JSON
    elif isinstance(config, (bytes, bytearray, memoryview)):
        data = bytes(config)
        fmt = _lib.KVP_CONFIG_BINARY
    else:
        raise TypeError(f"config: expected a dict or str (JSON), bytes (FlatBuffers binary) or None, "
                        f"got {type(config).__name__}")
    # An explicit size: JSON need not be NUL-terminated and binary may contain NULs.
    buf = ctypes.create_string_buffer(data, max(len(data), 1))
    return fmt, buf, len(data)


# ------------------------------------------------------------------------------------------------
# Native handles
# ------------------------------------------------------------------------------------------------


class _Native:
    """One C handle: destroyed by ``destroy`` when the last reference goes, after which (and only
    then) the handles in ``deps`` may go too."""

    __slots__ = ("ptr", "deps", "__weakref__")

    def __init__(self, ptr: int, destroy: Callable[[int], None], deps: Sequence[Any] = ()) -> None:
        self.ptr = ptr
        self.deps = tuple(deps)
        finalizer = weakref.finalize(self, destroy, ptr)
        finalizer.atexit = False  # see the module docstring


def _create(fn: Callable[..., int], destroy: Callable[[int], None], deps: Sequence[Any], *args: Any) -> _Native:
    """Call ``fn(*args, &out)`` and wrap the new handle; raises on failure (nothing to destroy then)."""
    out = ctypes.c_void_p()
    check(fn(*args, ctypes.byref(out)))
    if not out.value:
        raise FailedPreconditionError(f"{getattr(fn, '__name__', 'create')} returned KVP_OK but a NULL handle")
    return _Native(out.value, destroy, deps)


class _Handle:
    """Shared by the handle classes: close(), context management, the closed check."""

    _native: Optional[_Native] = None

    def _ptr(self) -> int:
        native = self._native
        if native is None:
            raise FailedPreconditionError(f"this {type(self).__name__} is closed")
        return native.ptr

    def _keep(self) -> _Native:
        """The native handle, for objects that must keep it alive (raises if closed)."""
        self._ptr()
        assert self._native is not None
        return self._native

    @property
    def closed(self) -> bool:
        """True after close()."""
        return self._native is None

    def close(self) -> None:
        """Give up the C handle. Idempotent. The C object is destroyed now unless another live
        object (a cache of this context, a NumPy view of this cache, ...) still depends on it."""
        self._native = None

    def __enter__(self) -> Any:
        self._ptr()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"handle=0x{self._ptr():x}"
        return f"<kvplug.{type(self).__name__} {state}>"


# ------------------------------------------------------------------------------------------------
# Library-level queries
# ------------------------------------------------------------------------------------------------


def abi_version() -> int:
    """kvp_abi_version(): major * 10000 + minor * 100 + patch of the loaded library."""
    return int(api().kvp_abi_version())


def version_string() -> str:
    """kvp_version_string(), e.g. ``"0.1.0 (cpu)"``."""
    return c_str(api().kvp_version_string())


def status_string(status: int) -> str:
    """kvp_status_string(): the name of a status code."""
    return c_str(api().kvp_status_string(_int(status, "status")))


def last_error() -> str:
    """kvp_last_error(): this thread's message for the last failed call ("" if none)."""
    return c_str(api().kvp_last_error())


def backends() -> List[str]:
    """The names of the registered attention backends (kvp_backend_count / kvp_backend_name)."""
    a = api()
    count = ctypes.c_int32()
    check(a.kvp_backend_count(ctypes.byref(count)))
    names = []
    for i in range(count.value):
        name = ctypes.c_char_p()
        check(a.kvp_backend_name(i, ctypes.byref(name)))
        names.append(c_str(name.value))
    return names


def backend_info(name: str) -> BackendInfo:
    """kvp_backend_info_get(): what backend ``name`` supports. NotFoundError for an unknown name."""
    info = _lib.kvp_backend_info()
    check(api().kvp_backend_info_get(name.encode("utf-8"), ctypes.byref(info)))
    return BackendInfo(
        name=c_str(info.name),
        dtype_mask=int(info.dtype_mask),
        device_mask=int(info.device_mask),
        dtypes=tuple(n for n, v in DTYPES.items() if info.dtype_mask & (1 << v)),
        device_types=tuple(d for d in range(32) if info.device_mask & (1 << d)),
        head_sizes=tuple(int(info.head_sizes[i]) for i in range(info.num_head_sizes)),
        supports_lse=bool(info.supports_lse),
        needs_state_slots=bool(info.needs_state_slots),
    )


def backend_device_info(name: str, device: Union[str, int] = "cpu") -> BackendDeviceInfo:
    """kvp_backend_device_info_get(): what backend ``name`` offers on ``device`` ("cpu", "cuda" or a
    DLDeviceType). A device this build lacks is reported with ``available=False``, not an error.
    NotFoundError for an unknown name."""
    info = _lib.kvp_backend_device_info()
    check(api().kvp_backend_device_info_get(name.encode("utf-8"), _device_code(device), ctypes.byref(info)))
    return BackendDeviceInfo(
        name=name,
        device_type=int(info.device_type),
        available=bool(info.available),
        dtype_mask=int(info.dtype_mask),
        dtypes=tuple(n for n, v in DTYPES.items() if info.dtype_mask & (1 << v)),
        head_sizes=tuple(int(info.head_sizes[i]) for i in range(info.num_head_sizes)),
        supports_lse=bool(info.supports_lse),
        supports_entropy=bool(info.supports_entropy),
        needs_state_slots=bool(info.needs_state_slots),
        experimental=bool(info.experimental),
    )


def check_config(backend: str, config: Config) -> None:
    """kvp_config_check(): raise InvalidConfigError (NotFoundError for an unknown backend) unless
    ``config`` is valid for ``backend``. A dict or str is JSON; bytes are a FlatBuffers binary."""
    fmt, buf, size = _config(config)
    check(api().kvp_config_check(backend.encode("utf-8"), fmt, buf, size))


# ------------------------------------------------------------------------------------------------
# Context
# ------------------------------------------------------------------------------------------------


class Context(_Handle):
    """A device and the stream work is launched on (kvp_context).

    ``device``: ``"cpu"`` (default) or ``"cuda"``, or a DLDeviceType value. ``num_threads``: CPU
    worker threads, 0 = all hardware threads. ``stream``: a ``cudaStream_t`` as an int (None = the
    default stream); ignored on the CPU. A CUDA context in a CPU-only build raises NotSupportedError.
    Thread safety: calls only read the context, except :meth:`set_stream`, which must not race.
    """

    def __init__(self, device: Union[str, int] = "cpu", device_id: int = 0, num_threads: int = 0,
                 stream: Optional[int] = None) -> None:
        device_type = _device_code(device)
        opts = _lib.kvp_context_options(device_type=device_type, device_id=_int(device_id, "device_id"),
                                        num_threads=_int(num_threads, "num_threads"),
                                        stream=_int(stream, "stream", _U64) if stream else None)
        a = api()
        self._native = _create(a.kvp_context_create, a.kvp_context_destroy, (), ctypes.byref(opts))
        self.device_type: int = device_type
        self.device_id: int = int(device_id)
        self.num_threads: int = int(num_threads)
        self._stream: Optional[int] = int(stream) if stream else None

    @property
    def stream(self) -> Optional[int]:
        """The stream kvplug launches on (None = default); also the one passed to ``__dlpack__``."""
        return self._stream

    def set_stream(self, stream: Optional[int]) -> None:
        """kvp_context_set_stream(): launch later work on ``stream`` (a cudaStream_t as int; None = default)."""
        value = _int(stream, "stream", _U64) if stream else None
        check(api().kvp_context_set_stream(self._ptr(), value))
        self._stream = value


# ------------------------------------------------------------------------------------------------
# Block manager
# ------------------------------------------------------------------------------------------------


class BlockManager(_Handle):
    """Host-side bookkeeping of a paged KV cache (kvp_block_manager): block tables, the prefix cache,
    copy-on-write after fork, swap plans. Needs no context. Not thread-safe (see kvplug.h).

    Sequence ids are the caller's unsigned 64-bit ints. Token ids are int32 array-likes.
    """

    def __init__(self, *, block_size: int, num_device_blocks: int, num_host_blocks: int = 0,
                 enable_prefix_caching: bool = False, watermark: float = 0.0, num_state_slots: int = 0,
                 hash_seed: int = 0) -> None:
        opts = _lib.kvp_block_manager_options(
            block_size=_int(block_size, "block_size"), num_device_blocks=_int(num_device_blocks, "num_device_blocks"),
            num_host_blocks=_int(num_host_blocks, "num_host_blocks"),
            enable_prefix_caching=1 if enable_prefix_caching else 0, watermark=float(watermark),
            num_state_slots=_int(num_state_slots, "num_state_slots"), hash_seed=_int(hash_seed, "hash_seed", _U64))
        a = api()
        self._native = _create(a.kvp_block_manager_create, a.kvp_block_manager_destroy, (), ctypes.byref(opts))
        self.block_size: int = int(block_size)
        self.num_device_blocks: int = int(num_device_blocks)
        self.num_host_blocks: int = int(num_host_blocks)
        self.enable_prefix_caching: bool = bool(enable_prefix_caching)

    @staticmethod
    def _tokens(token_ids: Optional[ArrayLike], num_tokens: Optional[int]) -> Tuple[Optional[NDArray[np.int32]], int]:
        """Token ids as int32 and their count. With ids, the count is theirs (C reads that many)."""
        if token_ids is None:
            if num_tokens is None:
                raise InvalidArgumentError("give token_ids or num_tokens")
            return None, _int(num_tokens, "num_tokens", _I64)
        if isinstance(token_ids, (int, np.integer)):
            token_ids = [token_ids]
        ids = _int_array(token_ids, np.int32, "token_ids", 1)
        if num_tokens is not None and int(num_tokens) != ids.shape[0]:
            raise InvalidArgumentError(f"num_tokens={num_tokens} but token_ids has {ids.shape[0]} entries")
        return ids, int(ids.shape[0])

    def can_allocate(self, token_ids: Optional[ArrayLike] = None, num_tokens: Optional[int] = None,
                     extra_key: int = 0) -> AllocVerdict:
        """Could a new sequence with this prompt be allocated now? Cached prefix blocks count as
        free when ``token_ids`` are given."""
        ids, n = self._tokens(token_ids, num_tokens)
        verdict = ctypes.c_int()
        check(api().kvp_block_manager_can_allocate(self._ptr(), _ptr(ids, ctypes.c_int32), n,
                                                   _int(extra_key, "extra_key", _U64), ctypes.byref(verdict)))
        return AllocVerdict(verdict.value)

    def allocate(self, seq_id: int, token_ids: Optional[ArrayLike] = None, num_tokens: Optional[int] = None,
                 extra_key: int = 0) -> int:
        """Create sequence ``seq_id`` for this prompt, reusing cached prefix blocks. Returns how many
        leading tokens already have K/V in the cache (a multiple of block_size, < the prompt length).
        ``token_ids`` may be omitted (give ``num_tokens``) only without prefix caching.
        AlreadyExistsError, NoFreeBlocksError."""
        ids, n = self._tokens(token_ids, num_tokens)
        cached = ctypes.c_int64()
        check(api().kvp_block_manager_allocate(self._ptr(), _seq_id(seq_id), _ptr(ids, ctypes.c_int32), n,
                                               _int(extra_key, "extra_key", _U64), ctypes.byref(cached)))
        return int(cached.value)

    def allocate_star(self, seq_id: int, token_ids: Optional[ArrayLike], *, context_len: int,
                      context_block_size: int, anchor_size: int, extra_key: int = 0,
                      num_tokens: Optional[int] = None) -> Tuple[NDArray[np.uint8], int]:
        """kvp_block_manager_allocate_star() (ABI 0.4): :meth:`allocate` with Star Attention keys for
        the context, so that a context block whose own tokens (at the same positions) and anchor are
        unchanged is reused even when blocks before it differ.

        Tokens ``[0, context_len)`` are context, cut into Star blocks of ``context_block_size`` (a
        multiple of ``block_size``); the anchor is the first ``anchor_size`` tokens (in
        [1, context_block_size]). Returns ``(cached_blocks, num_cached_tokens)``: ``cached_blocks``
        a uint8 array with one entry per block of the sequence (ceil(len / block_size)), 1 where its
        K/V is already cached (hits need not be leading: recompute the Star blocks with a 0, in
        increasing order, then :meth:`mark_computed` as usual), and the tokens in those blocks. The
        last token is never served from the cache. ``token_ids`` may be None (give ``num_tokens``)
        only without prefix caching. NotSupportedError if the library predates 0.4."""
        ids, n = self._tokens(token_ids, num_tokens)
        layout = _lib.kvp_star_layout(context_len=_int(context_len, "context_len", _I64),
                                      context_block_size=_int(context_block_size, "context_block_size"),
                                      anchor_size=_int(anchor_size, "anchor_size"))
        cached_blocks = np.zeros(-(-n // self.block_size) if self.block_size > 0 else 0, np.uint8)
        cached = ctypes.c_int64()
        check(api().kvp_block_manager_allocate_star(self._ptr(), _seq_id(seq_id), _ptr(ids, ctypes.c_int32), n,
                                                    _int(extra_key, "extra_key", _U64), ctypes.byref(layout),
                                                    _ptr(cached_blocks, ctypes.c_uint8), ctypes.byref(cached)))
        return cached_blocks, int(cached.value)

    def can_append(self, seq_id: int, num_tokens: int = 1) -> bool:
        """Could ``num_tokens`` more tokens be appended to ``seq_id`` now?"""
        out = ctypes.c_int32()
        check(api().kvp_block_manager_can_append(self._ptr(), _seq_id(seq_id), _int(num_tokens, "num_tokens", _I64),
                                                 ctypes.byref(out)))
        return bool(out.value)

    def append(self, seq_id: int, token_ids: Optional[ArrayLike] = None,
               num_tokens: Optional[int] = None) -> Optional[BlockCopy]:
        """Append tokens (an int, or an array-like of ids) to ``seq_id``. Returns the block copy to
        perform (:meth:`KvCache.copy_blocks`) before writing K/V when the last block was shared after
        a fork (copy-on-write), else None. NoFreeBlocksError leaves the sequence unchanged."""
        ids, n = self._tokens(token_ids, num_tokens)
        copy = _lib.kvp_block_copy()
        needed = ctypes.c_int32()
        check(api().kvp_block_manager_append(self._ptr(), _seq_id(seq_id), _ptr(ids, ctypes.c_int32), n,
                                             ctypes.byref(copy), ctypes.byref(needed)))
        return BlockCopy(int(copy.src), int(copy.dst)) if needed.value else None

    def mark_computed(self, seq_id: int, num_computed_tokens: int) -> None:
        """The K/V of the first ``num_computed_tokens`` tokens is written: publish its full blocks to
        the prefix cache. Call after each step."""
        check(api().kvp_block_manager_mark_computed(self._ptr(), _seq_id(seq_id),
                                                    _int(num_computed_tokens, "num_computed_tokens", _I64)))

    def fork(self, parent_id: int, child_id: int) -> None:
        """Create ``child_id`` sharing every block of ``parent_id`` (copy on write)."""
        check(api().kvp_block_manager_fork(self._ptr(), _seq_id(parent_id, "parent_id"),
                                           _seq_id(child_id, "child_id")))

    def free(self, seq_id: int) -> None:
        """Release ``seq_id``, its blocks and its state slot. NotFoundError if unknown."""
        check(api().kvp_block_manager_free(self._ptr(), _seq_id(seq_id)))

    def num_tokens(self, seq_id: int) -> int:
        """The number of tokens of ``seq_id``."""
        out = ctypes.c_int64()
        check(api().kvp_block_manager_num_tokens(self._ptr(), _seq_id(seq_id), ctypes.byref(out)))
        return int(out.value)

    def block_table(self, seq_id: int) -> NDArray[Any]:
        """The block table of ``seq_id`` as an int32 array."""
        a = api()
        ptr, sid = self._ptr(), _seq_id(seq_id)
        capacity = 64
        while True:
            out = np.empty(capacity, np.int32)
            n = ctypes.c_int32()
            status = a.kvp_block_manager_block_table(ptr, sid, _ptr(out, ctypes.c_int32), capacity, ctypes.byref(n))
            # Too small: the library said how many it needs (and changed nothing); ask again.
            if status == OutOfRangeError.code and n.value > capacity:
                capacity = n.value
                continue
            check(status)
            return out[: n.value].copy()

    def block_tables(self, seq_ids: ArrayLike, max_blocks_per_seq: Optional[int] = None
                     ) -> Tuple[NDArray[np.int32], NDArray[np.int32]]:
        """Batch block tables for a step: ``(table, seq_lens)`` with ``table`` int32
        [len(seq_ids), max_blocks_per_seq] padded with -1 and ``seq_lens`` int32 token counts.
        ``max_blocks_per_seq`` defaults to what the longest of these sequences needs."""
        ids = _int_array(seq_ids, np.uint64, "seq_ids", 1)
        if max_blocks_per_seq is None:
            longest = max((self.num_tokens(int(s)) for s in ids), default=0)
            max_blocks_per_seq = max(1, -(-longest // self.block_size))
        width = _int(max_blocks_per_seq, "max_blocks_per_seq")
        table = np.empty((ids.shape[0], max(width, 0)), np.int32)
        lens = np.empty(ids.shape[0], np.int32)
        check(api().kvp_block_manager_block_tables(self._ptr(), _ptr(ids, ctypes.c_uint64), ids.shape[0],
                                                   _ptr(table, ctypes.c_int32), width, _ptr(lens, ctypes.c_int32)))
        return table, lens

    def slot_mapping(self, seq_id: int, start: int, count: int) -> NDArray[Any]:
        """Cache slots (int64) of positions [start, start + count) of ``seq_id``."""
        n = _int(count, "count", _I64)
        if n < 0:
            raise InvalidArgumentError(f"count={n} must be >= 0")
        out = np.empty(n, np.int64)
        check(api().kvp_block_manager_slot_mapping(self._ptr(), _seq_id(seq_id), _int(start, "start", _I64), n,
                                                   _ptr(out, ctypes.c_int64)))
        return out

    def state_slot(self, seq_id: int) -> int:
        """The state slot of ``seq_id`` (-1 when the manager has none)."""
        out = ctypes.c_int32()
        check(api().kvp_block_manager_state_slot(self._ptr(), _seq_id(seq_id), ctypes.byref(out)))
        return int(out.value)

    def _swap(self, fn: Callable[..., int], seq_id: int) -> List[BlockCopy]:
        ptr, sid = self._ptr(), _seq_id(seq_id)
        capacity = 16
        while True:
            plan = (_lib.kvp_block_copy * capacity)()
            n = ctypes.c_int32()
            status = fn(ptr, sid, plan, capacity, ctypes.byref(n))
            if status == OutOfRangeError.code and n.value > capacity:  # too small; nothing changed
                capacity = n.value
                continue
            check(status)
            return [BlockCopy(int(plan[i].src), int(plan[i].dst)) for i in range(n.value)]

    def swap_out(self, seq_id: int) -> List[BlockCopy]:
        """Move ``seq_id`` to host blocks. Returns (device block, host block) copies to perform with
        :meth:`KvCache.swap_out` before the device blocks are reused."""
        return self._swap(api().kvp_block_manager_swap_out, seq_id)

    def swap_in(self, seq_id: int) -> List[BlockCopy]:
        """Bring ``seq_id`` back. Returns (host block, device block) copies for :meth:`KvCache.swap_in`."""
        return self._swap(api().kvp_block_manager_swap_in, seq_id)

    def is_swapped(self, seq_id: int) -> bool:
        """True if ``seq_id`` is swapped out."""
        out = ctypes.c_int32()
        check(api().kvp_block_manager_is_swapped(self._ptr(), _seq_id(seq_id), ctypes.byref(out)))
        return bool(out.value)

    def stats(self) -> BlockManagerStats:
        """kvp_block_manager_stats_get()."""
        s = _lib.kvp_block_manager_stats()
        check(api().kvp_block_manager_stats_get(self._ptr(), ctypes.byref(s)))
        return BlockManagerStats(**{f.name: int(getattr(s, f.name)) for f in dataclasses.fields(BlockManagerStats)})


# ------------------------------------------------------------------------------------------------
# KV cache
# ------------------------------------------------------------------------------------------------


class KvCache(_Handle):
    """Paged K/V per layer on the context's device, plus host swap pages and state slots (kvp_kv_cache).

    Layouts of one layer: ``"kv_first"`` [2, num_blocks, block_size, num_kv_heads, head_size] (vLLM)
    or ``"block_first"`` [num_blocks, 2, ...] (FlashInfer); index 0 of the "2" axis holds keys.
    ``dtype``: "float32", "float16", "bfloat16" (or a NumPy dtype). Pages start zero-filled.
    Not thread-safe for writes; attention runs reading it concurrently are fine.
    """

    def __init__(self, context: Context, *, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_size: int, dtype: DTypeLike = "float32", layout: Union[str, int] = "kv_first",
                 num_host_blocks: int = 0, num_state_slots: int = 0, state_bytes_per_layer: int = 0) -> None:
        opts = self._options(num_layers, num_blocks, block_size, num_kv_heads, head_size, dtype, layout,
                             num_host_blocks, num_state_slots, state_bytes_per_layer)
        a = api()
        self._native = _create(a.kvp_kv_cache_create, a.kvp_kv_cache_destroy, (context._keep(),),
                               context._ptr(), ctypes.byref(opts))
        self._describe(context, opts)

    @classmethod
    def from_tensors(cls, context: Context, tensors: Sequence[Any], *, layout: Union[str, int] = "kv_first",
                     num_host_blocks: int = 0, num_state_slots: int = 0, state_bytes_per_layer: int = 0) -> "KvCache":
        """A cache over the caller's tensors, one per layer, zero copy (kvp_kv_cache_create_from_tensors).

        Each tensor (any DLPack producer) has the layout's 5-d shape; num_blocks, block_size, heads,
        head size and dtype are read from the first. The cache keeps the tensors alive; writes
        through the cache show in them and the other way round.
        """
        tensors = list(tensors)
        if not tensors:
            raise InvalidArgumentError("tensors is empty: give one tensor per layer")
        borrowed = []
        for i, t in enumerate(tensors):
            b = _dlpack.borrow(t, f"tensors[{i}]", context.stream, writable=True)
            if b is None:
                raise InvalidArgumentError(f"tensors[{i}] is None")
            borrowed.append(b)
        first = borrowed[0].tensor
        if first.ndim != 5:
            raise InvalidArgumentError(f"tensors[0]: ndim={first.ndim}, expected 5 (the layout's shape)")
        shape = [int(first.shape[i]) for i in range(5)]
        lay = _layout_code(layout)
        num_blocks = shape[1] if lay == _lib.KVP_LAYOUT_KV_FIRST else shape[0]
        dtype = {(_lib.kDLFloat, 32): "float32", (_lib.kDLFloat, 16): "float16",
                 (_lib.kDLBfloat, 16): "bfloat16"}.get((int(first.dtype.code), int(first.dtype.bits)))
        if dtype is None:
            raise InvalidArgumentError(f"tensors[0]: DLPack dtype (code={first.dtype.code}, bits={first.dtype.bits}) "
                                       "is not float32, float16 or bfloat16")
        opts = cls._options(len(tensors), num_blocks, shape[2], shape[3], shape[4], dtype, lay, num_host_blocks,
                            num_state_slots, state_bytes_per_layer)
        # C reads an array of DLTensor structs: copy each (the shape/strides they point to stay
        # owned by the producers, kept alive through the capsules below).
        array = (_lib.DLTensor * len(borrowed))(*[b.tensor for b in borrowed])
        a = api()
        self = cls.__new__(cls)
        self._native = _create(a.kvp_kv_cache_create_from_tensors, a.kvp_kv_cache_destroy,
                               (context._keep(), borrowed, array), context._ptr(), ctypes.byref(opts), array,
                               len(borrowed))
        self._describe(context, opts)
        return self

    @staticmethod
    def _options(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                 dtype: DTypeLike, layout: Union[str, int], num_host_blocks: int, num_state_slots: int,
                 state_bytes_per_layer: int) -> _lib.kvp_kv_cache_options:
        return _lib.kvp_kv_cache_options(
            num_layers=_int(num_layers, "num_layers"), num_blocks=_int(num_blocks, "num_blocks"),
            block_size=_int(block_size, "block_size"), num_kv_heads=_int(num_kv_heads, "num_kv_heads"),
            head_size=_int(head_size, "head_size"), dtype=_dtype_code(dtype), layout=_layout_code(layout),
            num_host_blocks=_int(num_host_blocks, "num_host_blocks"),
            num_state_slots=_int(num_state_slots, "num_state_slots"),
            state_bytes_per_layer=_int(state_bytes_per_layer, "state_bytes_per_layer", _I64))

    def _describe(self, context: Context, o: _lib.kvp_kv_cache_options) -> None:
        self.context: Context = context
        self.num_layers: int = o.num_layers
        self.num_blocks: int = o.num_blocks
        self.block_size: int = o.block_size
        self.num_kv_heads: int = o.num_kv_heads
        self.head_size: int = o.head_size
        self.dtype: str = _DTYPE_NAMES[o.dtype]
        self.layout: str = _LAYOUT_NAMES[o.layout]
        self.num_host_blocks: int = o.num_host_blocks
        self.num_state_slots: int = o.num_state_slots
        self.state_bytes_per_layer: int = o.state_bytes_per_layer

    def layer_view(self, layer: int, host: bool = False) -> NDArray[Any]:
        """A NumPy view (no copy, writable) of ``layer``'s device pages, or its host swap pages with
        ``host=True``, in the cache's layout. CPU caches only.

        The view keeps the cache's memory alive, even past :meth:`close`. Its dtype is the cache's,
        except bfloat16, which NumPy lacks: those views are uint16 holding the raw bits (read the
        values with ``(v.astype(np.uint32) << 16).view(np.float32)``).
        """
        native = self._keep()
        t = _lib.DLTensor()
        check(api().kvp_kv_cache_layer_view(native.ptr, _int(layer, "layer"), 1 if host else 0, ctypes.byref(t)))
        view: NDArray[Any] = _dlpack.numpy_view(t, native, f"layer {layer}")
        return view

    def write(self, layer: int, key: Any, value: Any, slot_mapping: Any) -> None:
        """Write new keys and values ([num_tokens, num_kv_heads, head_size] DLPack tensors, float32/
        float16/bfloat16, converted to the cache dtype) of ``layer`` at ``slot_mapping`` (int64
        [num_tokens], a DLPack tensor or an int array-like; -1 skips a token)."""
        ptr, stream = self._ptr(), self.context.stream
        k = _dlpack.borrow(key, "key", stream)
        v = _dlpack.borrow(value, "value", stream)
        if slot_mapping is not None and not hasattr(slot_mapping, "__dlpack__"):
            slot_mapping = _int_array(slot_mapping, np.int64, "slot_mapping", 1)
        s = _dlpack.borrow(slot_mapping, "slot_mapping", stream)
        check(api().kvp_kv_cache_write(ptr, _int(layer, "layer"), _dlpack.pointer(k), _dlpack.pointer(v),
                                       _dlpack.pointer(s)))

    def _copy(self, fn: Callable[..., int], copies: Any) -> None:
        ptr = self._ptr()
        arr, n = _copies(copies)
        check(fn(ptr, _ptr(arr, _lib.kvp_block_copy), n))

    def copy_blocks(self, copies: Union[Iterable[Tuple[int, int]], NDArray[Any]]) -> None:
        """Copy blocks src -> dst in every layer: ``copies`` is (src, dst) pairs, e.g. BlockManager.append's."""
        self._copy(api().kvp_kv_cache_copy_blocks, copies)

    def swap_out(self, copies: Union[Iterable[Tuple[int, int]], NDArray[Any]]) -> None:
        """Perform a swap-out plan (device block -> host block) in every layer."""
        self._copy(api().kvp_kv_cache_swap_out, copies)

    def swap_in(self, copies: Union[Iterable[Tuple[int, int]], NDArray[Any]]) -> None:
        """Perform a swap-in plan (host block -> device block) in every layer."""
        self._copy(api().kvp_kv_cache_swap_in, copies)

    def state(self, layer: int, slot: int) -> NDArray[Any]:
        """The bytes of state slot ``slot`` of ``layer`` as a writable uint8 NumPy view (CPU caches),
        kept valid by the view itself like :meth:`layer_view`."""
        native = self._keep()
        data = ctypes.c_void_p()
        size = ctypes.c_int64()
        check(api().kvp_kv_cache_state(native.ptr, _int(layer, "layer"), _int(slot, "slot"), ctypes.byref(data),
                                       ctypes.byref(size)))
        if self.context.device_type != _lib.kDLCPU:
            raise NotSupportedError("state(): NumPy views need a CPU cache")
        view: NDArray[np.uint8] = _dlpack.bytes_view(data.value or 0, size.value, native)
        return view

    def copy_state(self, src_slot: int, dst_slot: int) -> None:
        """Copy state slot ``src_slot`` to ``dst_slot`` in every layer (after a fork)."""
        check(api().kvp_kv_cache_copy_state(self._ptr(), _int(src_slot, "src_slot"), _int(dst_slot, "dst_slot")))


# ------------------------------------------------------------------------------------------------
# Plan
# ------------------------------------------------------------------------------------------------


class Plan(_Handle):
    """The host-side description of one batch step (kvp_plan), built once per step by :meth:`update`
    and read by every layer's attention calls. Capacities are fixed at creation (no allocation later)."""

    def __init__(self, context: Context, *, max_num_seqs: int, max_num_tokens: int, max_num_blocks: int) -> None:
        opts = _lib.kvp_plan_options(max_num_seqs=_int(max_num_seqs, "max_num_seqs"),
                                     max_num_tokens=_int(max_num_tokens, "max_num_tokens"),
                                     max_num_blocks=_int(max_num_blocks, "max_num_blocks"))
        a = api()
        self._native = _create(a.kvp_plan_create, a.kvp_plan_destroy, (context._keep(),), context._ptr(),
                               ctypes.byref(opts))
        self.context: Context = context
        self.max_num_seqs, self.max_num_tokens, self.max_num_blocks = (
            int(max_num_seqs), int(max_num_tokens), int(max_num_blocks))
        #: Sequences and query tokens of the last successful update (0 after a failed one).
        self.num_seqs: int = 0
        self.num_tokens: int = 0

    def attach(self, attention: "Attention") -> None:
        """kvp_plan_attach(): allocate (once) the plan-side buffers ``attention``'s step planner needs
        and plan for it at every :meth:`update`, so its runs never allocate (attach before capturing
        runs in a CUDA graph). Both must share a context. The plan keeps what it needs itself, so
        ``attention`` may be closed afterwards."""
        if not isinstance(attention, Attention):
            raise TypeError(f"attention: expected a kvplug.Attention, got {type(attention).__name__}")
        check(api().kvp_plan_attach(self._ptr(), attention._ptr()))

    def update(self, query_start_loc: ArrayLike, seq_lens: ArrayLike, *, block_size: int,
               block_table: Optional[ArrayLike] = None, kv_indptr: Optional[ArrayLike] = None,
               kv_indices: Optional[ArrayLike] = None, slot_mapping: Optional[ArrayLike] = None,
               state_slots: Optional[ArrayLike] = None, context_lens: Optional[ArrayLike] = None,
               query_pos_starts: Optional[ArrayLike] = None) -> None:
        """kvp_plan_update() from NumPy int arrays (converted to contiguous int32/int64).

        ``query_start_loc`` [num_seqs + 1] from 0; ``seq_lens`` [num_seqs] (K/V length including this
        step's tokens); the block table either dense (``block_table`` [num_seqs, stride], vLLM) or CSR
        (``kv_indptr`` [num_seqs + 1] and ``kv_indices``, FlashInfer); optional ``slot_mapping``
        [num_tokens] int64 (for :meth:`Attention.write_kv`) and ``state_slots`` [num_seqs].
        Since ABI 0.4, optional ``context_lens`` [num_seqs] (positions below it are the sequence's
        context: Star Attention's phase 1; other backends ignore it) and ``query_pos_starts``
        [num_seqs] (the global position of each sequence's first token of this step; default
        ``seq_lens - q_len``; needed by Star shards that hold only part of the keys).
        The array lengths are checked here, since C only gets pointers. On failure the plan is empty
        (whichever side found the problem: a stale plan must never serve the next step).
        """
        self.num_seqs = self.num_tokens = 0
        ptr = self._ptr()
        try:
            batch, keep = self._batch(query_start_loc, seq_lens, block_size, block_table, kv_indptr, kv_indices,
                                      slot_mapping, state_slots, context_lens, query_pos_starts)
        except BaseException:
            api().kvp_plan_update(ptr, None)  # a NULL batch fails and empties the plan, as kvplug.h says
            raise
        check(api().kvp_plan_update(ptr, ctypes.byref(batch)))
        del keep  # the arrays the batch points into, referenced until the call returned
        self.num_seqs, self.num_tokens = int(batch.num_seqs), int(batch.query_start_loc[batch.num_seqs])

    @staticmethod
    def _batch(query_start_loc: ArrayLike, seq_lens: ArrayLike, block_size: int, block_table: Optional[ArrayLike],
               kv_indptr: Optional[ArrayLike], kv_indices: Optional[ArrayLike], slot_mapping: Optional[ArrayLike],
               state_slots: Optional[ArrayLike], context_lens: Optional[ArrayLike] = None,
               query_pos_starts: Optional[ArrayLike] = None) -> Tuple[_lib.kvp_batch, List[Any]]:
        """The kvp_batch of :meth:`update` and the arrays it points into, all lengths checked."""
        qsl = _int_array(query_start_loc, np.int32, "query_start_loc", 1)
        lens = _int_array(seq_lens, np.int32, "seq_lens", 1)
        n = int(lens.shape[0])
        if qsl.shape[0] != n + 1:
            raise InvalidArgumentError(f"query_start_loc has {qsl.shape[0]} entries; seq_lens has {n}, so it needs "
                                       f"{n + 1}")
        batch = _lib.kvp_batch(num_seqs=_int(n, "num_seqs"), block_size=_int(block_size, "block_size"),
                               query_start_loc=_ptr(qsl, ctypes.c_int32), seq_lens=_ptr(lens, ctypes.c_int32))
        table = indptr = indices = slots = states = None
        if block_table is not None:
            if kv_indptr is not None or kv_indices is not None:
                raise InvalidArgumentError("give block_table or kv_indptr/kv_indices, not both")
            table = _int_array(block_table, np.int32, "block_table", 2)
            if table.shape[0] != n:
                raise InvalidArgumentError(f"block_table has {table.shape[0]} rows for {n} sequences")
            batch.block_table = _ptr(table, ctypes.c_int32)
            batch.block_table_stride = int(table.shape[1])
        else:
            if kv_indptr is None or kv_indices is None:
                raise InvalidArgumentError("no block table: give block_table, or kv_indptr and kv_indices")
            indptr = _int_array(kv_indptr, np.int32, "kv_indptr", 1)
            indices = _int_array(kv_indices, np.int32, "kv_indices", 1)
            if indptr.shape[0] != n + 1:
                raise InvalidArgumentError(f"kv_indptr has {indptr.shape[0]} entries for {n} sequences (needs {n + 1})")
            if indptr.size and (indptr.min() < 0 or indptr.max() > indices.shape[0]):
                raise InvalidArgumentError(f"kv_indptr holds values in [{indptr.min()}, {indptr.max()}] but kv_indices "
                                           f"has {indices.shape[0]} entries")
            batch.kv_indptr = _ptr(indptr, ctypes.c_int32)
            batch.kv_indices = _ptr(indices, ctypes.c_int32)
        if slot_mapping is not None:
            slots = _int_array(slot_mapping, np.int64, "slot_mapping", 1)
            if slots.shape[0] != int(qsl[-1]):
                raise InvalidArgumentError(f"slot_mapping has {slots.shape[0]} entries but query_start_loc[-1]="
                                           f"{int(qsl[-1])} tokens")
            batch.slot_mapping = _ptr(slots, ctypes.c_int64)
        if state_slots is not None:
            states = _int_array(state_slots, np.int32, "state_slots", 1)
            if states.shape[0] != n:
                raise InvalidArgumentError(f"state_slots has {states.shape[0]} entries for {n} sequences")
            batch.state_slots = _ptr(states, ctypes.c_int32)
        ctx_lens = pos_starts = None
        if context_lens is not None:
            ctx_lens = _int_array(context_lens, np.int32, "context_lens", 1)
            if ctx_lens.shape[0] != n:
                raise InvalidArgumentError(f"context_lens has {ctx_lens.shape[0]} entries for {n} sequences")
            batch.context_lens = _ptr(ctx_lens, ctypes.c_int32)
        if query_pos_starts is not None:
            pos_starts = _int_array(query_pos_starts, np.int32, "query_pos_starts", 1)
            if pos_starts.shape[0] != n:
                raise InvalidArgumentError(f"query_pos_starts has {pos_starts.shape[0]} entries for {n} sequences")
            batch.query_pos_starts = _ptr(pos_starts, ctypes.c_int32)
        if ctx_lens is None and pos_starts is None:
            # Without the 0.4 fields the batch is a 0.3 one: libraries of ABI 0.3 accept it too.
            batch.struct_size = _lib.KVP_BATCH_SIZE_0_3
        return batch, [qsl, lens, table, indptr, indices, slots, states, ctx_lens, pos_starts]


# ------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------


class Attention(_Handle):
    """An attention backend instance (kvp_attention): ``backend`` by name ("dense", ...), head
    geometry, the cache dtype it reads, the softmax scale (0 = 1/sqrt(head_size)) and an optional
    config: a dict or JSON str (e.g. ``{"backend_config_type": "DenseConfig", "backend_config":
    {"window_left": 128}}``) or FlatBuffers binary bytes. Immutable; runs from several threads are
    safe if they write to different outputs.
    """

    def __init__(self, context: Context, backend: str = "dense", *, num_q_heads: int, num_kv_heads: int,
                 head_size: int, kv_dtype: DTypeLike = "float32", sm_scale: float = 0.0,
                 config: Config = None) -> None:
        fmt, buf, size = _config(config)
        name = backend.encode("utf-8")
        scale = float(sm_scale)
        opts = _lib.kvp_attention_options(
            backend=name, num_q_heads=_int(num_q_heads, "num_q_heads"), num_kv_heads=_int(num_kv_heads, "num_kv_heads"),
            head_size=_int(head_size, "head_size"), kv_dtype=_dtype_code(kv_dtype, "kv_dtype"), sm_scale=scale,
            config_format=fmt, config=ctypes.cast(buf, ctypes.c_void_p) if buf is not None else None,
            config_size=size)
        a = api()
        self._native = _create(a.kvp_attention_create, a.kvp_attention_destroy, (context._keep(),), context._ptr(),
                               ctypes.byref(opts))
        del buf, name  # read during the call only
        self.context: Context = context
        self.backend: str = backend
        self.num_q_heads, self.num_kv_heads, self.head_size = int(num_q_heads), int(num_kv_heads), int(head_size)
        self.kv_dtype: str = _DTYPE_NAMES.get(opts.kv_dtype, str(opts.kv_dtype))
        self.sm_scale: float = scale if scale > 0 else 1.0 / math.sqrt(self.head_size)

    def write_kv(self, plan: Plan, cache: KvCache, layer: int, key: Any, value: Any) -> None:
        """Write this step's keys/values ([num_tokens, num_kv_heads, head_size]) of ``layer`` through
        the backend at the plan's slot_mapping."""
        ptr, p, c = self._ptr(), plan._ptr(), cache._ptr()
        stream = self.context.stream
        k = _dlpack.borrow(key, "key", stream)
        v = _dlpack.borrow(value, "value", stream)
        check(api().kvp_attention_write_kv(ptr, p, c, _int(layer, "layer"), _dlpack.pointer(k), _dlpack.pointer(v)))

    @property
    def state_bytes(self) -> int:
        """kvp_attention_state_bytes(): bytes of per-sequence state per layer this backend keeps in a
        cache's state slots (0 for stateless backends such as dense); create caches with
        ``state_bytes_per_layer`` at least this."""
        out = ctypes.c_int64()
        check(api().kvp_attention_state_bytes(self._ptr(), ctypes.byref(out)))
        return int(out.value)

    def cache_layout(self, block_size: int, num_tokens: int, query_pos_start: int = 0) -> CacheLayout:
        """kvp_attention_cache_layout() (ABI 0.5): the page-list layout of a sequence of ``num_tokens``
        tokens (after the step) for a step starting at position ``query_pos_start``."""
        out = _lib.kvp_cache_layout()
        check(api().kvp_attention_cache_layout(self._ptr(), _int(block_size, "block_size"),
                                               _int(num_tokens, "num_tokens"),
                                               _int(query_pos_start, "query_pos_start"), ctypes.byref(out)))
        return CacheLayout(**{name: int(getattr(out, name)) for name, _ in _lib.kvp_cache_layout._fields_[1:]})

    def ssm(self, plan: Plan, cache: KvCache, layer: int, x: Any, out: Any, *, conv_weight: Any, a_log: Any,
            which: int = 0, conv_bias: Any = None, dt_bias: Any = None, d_skip: Any = None,
            norm_weight: Any = None) -> Any:
        """kvp_attention_ssm() (ABI 0.5): the backend's sequence-state operator over the plan's tokens
        (attamba: the chunk-local Mamba-2 block of the key SSM, ``which=0``, or the value SSM, 1),
        with its state in ``cache``'s state slots (the plan needs ``state_slots`` and
        ``query_pos_starts``). ``x`` is the C argument ``in``: in_proj's output [T, 2 d_inner + 2 G N
        + heads]; ``conv_weight`` [conv_dim, conv_width]; ``a_log`` and the optional ``dt_bias``,
        ``d_skip`` [heads]; optional ``conv_bias`` [conv_dim], ``norm_weight`` [d_inner]; ``out``
        [T, d_inner]. float32 on the cache's device. Writes ``out`` in place and returns it.
        NotSupportedError for backends without an SSM."""
        ptr, p, c = self._ptr(), plan._ptr(), cache._ptr()
        stream = self.context.stream
        # Borrowed views must stay referenced until the call returns (they own the DLTensors).
        views = {name: _dlpack.borrow(t, name, stream) for name, t in (
            ("in", x), ("conv_weight", conv_weight), ("conv_bias", conv_bias), ("dt_bias", dt_bias),
            ("a_log", a_log), ("d_skip", d_skip), ("norm_weight", norm_weight))}
        o = _dlpack.borrow(out, "out", stream, writable=True)
        args = _lib.kvp_ssm_args(which=_int(which, "which"), out=_dlpack.pointer(o),
                                 **{name: _dlpack.pointer(v) for name, v in views.items()})
        check(api().kvp_attention_ssm(ptr, p, c, _int(layer, "layer"), ctypes.byref(args)))
        del views, o
        return out

    def run(self, plan: Plan, cache: KvCache, layer: int, query: Any, out: Any, lse: Any = None,
            entropy: Any = None, entropy_summary: Any = None) -> Any:
        """Causal attention of this step's queries over ``layer`` of ``cache`` (which must already hold
        this step's K/V). ``query``/``out``: [num_tokens, num_q_heads, head_size], same dtype;
        ``lse`` (optional) [num_tokens, num_q_heads] float32 receives the natural log-sum-exp;
        ``entropy`` (optional, same shape, float32; backends with ``supports_entropy``) the attention
        entropy of each row in nats; ``entropy_summary`` (optional, ABI 0.4, [num_q_heads, 6] float32
        contiguous, ``supports_entropy``) a per-head summary of this run's rows, computed on the run's
        device (no synchronization): the columns of :data:`ENTROPY_SUMMARY_FIELDS`, i.e. rows that saw
        a key, their mean entropy, informative rows (>= 2 keys), their mean H / log(keys), rows in the
        collapse band (H <= E_max / 4) and in the overload band (H >= 3 E_max / 4). Writes the outputs
        in place (zero copy) and returns ``out``."""
        ptr, p, c = self._ptr(), plan._ptr(), cache._ptr()
        stream = self.context.stream
        q = _dlpack.borrow(query, "query", stream)
        o = _dlpack.borrow(out, "out", stream, writable=True)
        l_ = _dlpack.borrow(lse, "lse", stream, writable=True)
        layer = _int(layer, "layer")
        if entropy is None and entropy_summary is None:  # kvp_attention_run: what every 0.x library has
            check(api().kvp_attention_run(ptr, p, c, layer, _dlpack.pointer(q), _dlpack.pointer(o),
                                          _dlpack.pointer(l_)))
            return out
        e = _dlpack.borrow(entropy, "entropy", stream, writable=True)
        s = _dlpack.borrow(entropy_summary, "entropy_summary", stream, writable=True)
        outputs = _lib.kvp_attention_outputs(out=_dlpack.pointer(o), lse=_dlpack.pointer(l_),
                                             entropy=_dlpack.pointer(e), entropy_summary=_dlpack.pointer(s))
        if entropy_summary is None:
            # The 0.3-sized struct: libraries of ABI 0.3 accept it too (they refuse a larger struct_size).
            outputs.struct_size = _lib.KVP_ATTENTION_OUTPUTS_SIZE_0_3
        check(api().kvp_attention_run_v2(ptr, p, c, layer, _dlpack.pointer(q), ctypes.byref(outputs)))
        return out


# ------------------------------------------------------------------------------------------------
# Merging partial attention states
# ------------------------------------------------------------------------------------------------


def merge_states(context: Context, partial_out: Any, partial_lse: Any, out: Any, lse: Any = None,
                 partial_entropy: Any = None, entropy: Any = None) -> Any:
    """kvp_attention_merge_states(): merge S partial attention states of the same queries over
    disjoint key sets into one, exactly and stably (a partial with lse = -inf is empty).

    ``partial_out`` [S, T, H, D] float32/float16/bfloat16, ``partial_lse`` [S, T, H] float32 (natural
    log; FlashInfer's base-2 values times ln 2), ``out`` [T, H, D]; optional ``lse`` [T, H] float32,
    and ``entropy`` [T, H] float32, which needs ``partial_entropy`` [S, T, H]. All on the context's
    device; outputs must not overlap each other or the inputs. Writes in place and returns ``out``."""
    if not isinstance(context, Context):
        raise TypeError(f"context: expected a kvplug.Context, got {type(context).__name__}")
    ptr, stream = context._ptr(), context.stream
    po = _dlpack.borrow(partial_out, "partial_out", stream)
    pl = _dlpack.borrow(partial_lse, "partial_lse", stream)
    pe = _dlpack.borrow(partial_entropy, "partial_entropy", stream)
    o = _dlpack.borrow(out, "out", stream, writable=True)
    l_ = _dlpack.borrow(lse, "lse", stream, writable=True)
    e = _dlpack.borrow(entropy, "entropy", stream, writable=True)
    args = _lib.kvp_merge_states_args(partial_out=_dlpack.pointer(po), partial_lse=_dlpack.pointer(pl),
                                      partial_entropy=_dlpack.pointer(pe), out=_dlpack.pointer(o),
                                      lse=_dlpack.pointer(l_), entropy=_dlpack.pointer(e))
    check(api().kvp_attention_merge_states(ptr, ctypes.byref(args)))
    return out


# ------------------------------------------------------------------------------------------------
# Communicators (ABI 0.4)
# ------------------------------------------------------------------------------------------------

#: Communicator kinds by name, as kvp_comm_kind values.
COMM_KINDS: Dict[str, int] = {"in_process": _lib.KVP_COMM_IN_PROCESS, "nccl": _lib.KVP_COMM_NCCL}


def nccl_unique_id() -> bytes:
    """kvp_comm_nccl_unique_id(): NCCL's unique id for a new communicator (128 bytes), made on the
    rank that creates it; hand it to every rank (as bytes: pickle, a file, a socket) and pass it to
    ``Communicator(..., kind="nccl", nccl_unique_id=...)``. NotSupportedError without NCCL."""
    buf = (ctypes.c_uint8 * _lib.KVP_NCCL_UNIQUE_ID_BYTES)()
    check(api().kvp_comm_nccl_unique_id(buf))
    return bytes(buf)


class Communicator(_Handle):
    """A communicator (kvp_comm, ABI 0.4) that merges partial attention states held by several
    shards, exactly (Star Attention's phase 2): each rank contributes ``(out [T, H, D], lse [T, H])``
    over the keys it holds and every rank receives the merge over all of them, in place.

    ``kind="in_process"``: one handle for all ``num_ranks`` ranks of this process (one context); each
    rank calls :meth:`merge_attention` with its partial, in any order, from any thread; the call that
    completes the round writes the result into every rank's tensors. The binding keeps the earlier
    ranks' tensors alive until then (do not read them before the round completes).
    ``kind="nccl"``: one handle per rank (``rank``, ``nccl_unique_id`` from :func:`nccl_unique_id`);
    creation is collective, and so is every merge (all ranks with the same T; ``validate_each_call``
    checks it at the price of a synchronization). Leave NVLink multicast off (NCCL_NVLS_ENABLE=0).

    ``max_num_tokens``, ``num_heads`` (query heads) and ``head_size`` size the scratch once;
    ``out_dtype`` is the partial outputs' dtype (float32, float16 or bfloat16).
    """

    def __init__(self, context: Context, *, num_ranks: int, max_num_tokens: int, num_heads: int, head_size: int,
                 out_dtype: DTypeLike = "float32", kind: Union[str, int] = "in_process", rank: int = 0,
                 nccl_unique_id: Optional[Union[bytes, bytearray, memoryview]] = None,
                 validate_each_call: bool = False) -> None:
        if not isinstance(context, Context):
            raise TypeError(f"context: expected a kvplug.Context, got {type(context).__name__}")
        if isinstance(kind, str):
            if kind not in COMM_KINDS:
                raise InvalidArgumentError(f"kind={kind!r} is not one of {sorted(COMM_KINDS)}")
            kind_code = COMM_KINDS[kind]
        else:
            kind_code = _int(kind, "kind")
        uid = None
        if nccl_unique_id is not None:
            raw = bytes(nccl_unique_id)
            if len(raw) != _lib.KVP_NCCL_UNIQUE_ID_BYTES:
                raise InvalidArgumentError(f"nccl_unique_id has {len(raw)} bytes; NCCL ids have "
                                           f"{_lib.KVP_NCCL_UNIQUE_ID_BYTES}")
            uid = (ctypes.c_uint8 * len(raw)).from_buffer_copy(raw)
        opts = _lib.kvp_comm_options(
            kind=kind_code, num_ranks=_int(num_ranks, "num_ranks"), rank=_int(rank, "rank"),
            nccl_unique_id=ctypes.cast(uid, ctypes.POINTER(ctypes.c_uint8)) if uid is not None else None,
            max_num_tokens=_int(max_num_tokens, "max_num_tokens"), num_heads=_int(num_heads, "num_heads"),
            head_size=_int(head_size, "head_size"), out_dtype=_dtype_code(out_dtype, "out_dtype"),
            validate_each_call=1 if validate_each_call else 0)
        a = api()
        self._native = _create(a.kvp_comm_create, a.kvp_comm_destroy, (context._keep(),), context._ptr(),
                               ctypes.byref(opts))
        del uid  # read during the call only
        self.context: Context = context
        self.kind: str = {v: k for k, v in COMM_KINDS.items()}.get(kind_code, str(kind_code))
        self.num_ranks, self.rank = int(num_ranks), int(rank)
        self.max_num_tokens, self.num_heads, self.head_size = int(max_num_tokens), int(num_heads), int(head_size)
        self.out_dtype: str = _DTYPE_NAMES.get(opts.out_dtype, str(opts.out_dtype))
        # The tensors of the in-process round in progress, alive until the round completes.
        self._round: List[Any] = []
        self._lock = threading.Lock()

    def merge_attention(self, rank: int, out: Any, lse: Any) -> Any:
        """kvp_comm_merge_attention(): contribute ``rank``'s partial (``out`` [T, H, D] contiguous, the
        communicator's dtype; ``lse`` [T, H] float32, natural log, -inf for rows that saw no key) and
        receive the merge over all ranks in place, when the round completes (in-process: at the last
        rank's call; NCCL: in this call, on the context's stream). Returns ``out``.
        FailedPreconditionError if ``rank`` already contributed to the round in progress."""
        ptr = self._ptr()
        stream = self.context.stream
        o = _dlpack.borrow(out, "out", stream, writable=True)
        l_ = _dlpack.borrow(lse, "lse", stream, writable=True)
        a = api()
        with self._lock:
            check(a.kvp_comm_merge_attention(ptr, _int(rank, "rank"), _dlpack.pointer(o), _dlpack.pointer(l_)))
            if self.kind == "in_process":
                n = ctypes.c_int32()
                check(a.kvp_comm_pending(ptr, ctypes.byref(n)))
                if n.value == 0:
                    self._round.clear()  # the round completed: every rank's tensors are written
                else:
                    self._round.append((o, l_, out, lse))
        return out

    @property
    def pending(self) -> int:
        """kvp_comm_pending(): the ranks that contributed to the in-process round in progress (0 when
        none is open)."""
        n = ctypes.c_int32()
        check(api().kvp_comm_pending(self._ptr(), ctypes.byref(n)))
        return int(n.value)

    def close(self) -> None:
        """Give up the handle. The tensors of an unfinished in-process round are released after it."""
        native = self._native
        super().close()
        if native is not None and self._round:
            # C may still point at them until the comm is destroyed: keep them as long as the handle.
            native.deps = native.deps + (tuple(self._round),)
            self._round = []


def star_config(context_block_size: int, anchor_block_size: Optional[int] = None, *, num_shards: int = 1,
                shard_rank: int = 0, append_shard: int = -1) -> Dict[str, Any]:
    """The JSON config (a dict) of the ``"star"`` backend: Star Attention with context blocks of
    ``context_block_size`` tokens and an anchor of ``anchor_block_size`` (default: one block);
    context block k lives on shard k % num_shards; ``append_shard`` (-1: the last) stores the query
    and generated K/V."""
    anchor = context_block_size if anchor_block_size is None else anchor_block_size
    return {"backend_config_type": "StarConfig",
            "backend_config": {"context_block_size": int(context_block_size), "anchor_block_size": int(anchor),
                               "num_shards": int(num_shards), "shard_rank": int(shard_rank),
                               "append_shard": int(append_shard)}}


#: The columns of an entropy summary ([num_q_heads, 6], ``Attention.run(entropy_summary=...)``).
ENTROPY_SUMMARY_FIELDS: Tuple[str, ...] = _lib.ENTROPY_SUMMARY_FIELDS


def entropy_config(temperature: Optional[ArrayLike] = None) -> Dict[str, Any]:
    """The JSON config (a dict) of the ``"entropy"`` backend (entropy-guided attention, arXiv
    2501.03489): logits q.k / (t[h, p] sqrt(d)) with ``temperature`` t a [num_q_heads, T] table
    (per head and absolute query position; T = 1: per head only; positions >= T use the last
    entry), given as a 2-D array or already flattened row-major. None or empty: t = 1 (dense with
    telemetry). The library checks it (InvalidConfigError for a zero, negative or non-finite t;
    InvalidArgumentError at creation for a length that is not a multiple of num_q_heads)."""
    values: List[float] = []
    if temperature is not None:
        t = np.asarray(temperature, dtype=np.float64)
        if t.ndim > 2:
            raise InvalidArgumentError(f"temperature: expected a [num_q_heads, T] table or a flat list, got shape "
                                       f"{t.shape}")
        values = [float(x) for x in t.reshape(-1)]
    return {"backend_config_type": "EntropyConfig", "backend_config": {"temperature": values}}


#: RoPE styles of :func:`kv_shift_config` by name, as the schema's RopeStyle enum names.
ROPE_STYLES: Dict[str, str] = {"neox": "NeoX", "gptj": "GPTJ"}


def kv_shift_config(alpha_k: ArrayLike, alpha_v: ArrayLike, rope_theta: float = 0.0, rotary_dim: int = 0,
                    rope_style: str = "neox") -> Dict[str, Any]:
    """The JSON config (a dict) of the ``"kv_shift"`` backend (KV shifting attention, arXiv
    2411.19574): per KV head h, K^_i = a1[h] K_i + a2[h] K_{i-1} and V^_i = b1[h] V_i + b2[h] V_{i-1}
    (K_{-1} = V_{-1} = 0), fused into the paged write. ``alpha_k``/``alpha_v``: a [num_kv_heads, 2]
    table of (current, previous) weights, or already flat ``[a1[0], a2[0], a1[1], ...]``.
    ``rope_theta`` > 0 rotates the mixed keys in the write (``rotary_dim`` leading dims, 0 = the
    head size; ``rope_style`` "neox" (rotate-half, Llama) or "gptj" (interleaved pairs)): hand
    write_kv PRE-RoPE keys and rotate the queries yourself. The backend keeps state: caches need
    state slots (``Attention.state_bytes`` per layer) and every batch ``state_slots``. The library
    checks the values (InvalidConfigError: non-finite or odd-length tables, negative theta, odd
    rotary_dim; InvalidArgumentError at creation: a length other than num_kv_heads * 2, a
    rotary_dim beyond the head size)."""
    tables = {}
    for name, value in (("alpha_k", alpha_k), ("alpha_v", alpha_v)):
        a = np.asarray(value, dtype=np.float64)
        if a.ndim > 2 or (a.ndim == 2 and a.shape[1] != 2):
            raise InvalidArgumentError(f"{name}: expected a [num_kv_heads, 2] table (current, previous) or a flat "
                                       f"list, got shape {a.shape}")
        tables[name] = [float(x) for x in a.reshape(-1)]
    style = ROPE_STYLES.get(str(rope_style).lower()) if isinstance(rope_style, str) else None
    if style is None:
        raise InvalidArgumentError(f"rope_style={rope_style!r} is not one of {sorted(ROPE_STYLES)}")
    return {"backend_config_type": "KvShiftConfig",
            "backend_config": {"alpha_k": tables["alpha_k"], "alpha_v": tables["alpha_v"],
                               "rope_theta": float(rope_theta), "rotary_dim": _int(rotary_dim, "rotary_dim"),
                               "rope_style": style}}


#: attamba chunk offsets of :func:`attamba_config` by name, as the schema's ChunkOffsets enum names.
CHUNK_OFFSETS: Dict[str, str] = {"cyclic": "Cyclic", "uniform": "Uniform"}


def attamba_config(chunk_size: int = 8, window: int = 0, *, state_size: int = 16, conv_width: int = 4,
                   layer_index: int = 0, num_layers: int = 1, chunk_offsets: str = "cyclic", ssm_heads: int = 0,
                   ssm_head_dim: int = 0, ssm_groups: int = 1, norm_eps: float = 1e-5) -> Dict[str, Any]:
    """The JSON config (a dict) of the experimental ``"attamba"`` backend (ABI 0.5; Attamba, arXiv
    2411.17685): a query at t sees the chunk ends before it (position 0 and j*P + P-1 - off, P =
    ``chunk_size``, off set by ``layer_index``/``num_layers`` and ``chunk_offsets`` "cyclic" or
    "uniform") and the last ``window`` tokens exactly. ``ssm_heads`` > 0 lets kvplug run the
    SSMs (:meth:`Attention.ssm`) with ``ssm_head_dim``, ``ssm_groups``, ``state_size``,
    ``conv_width`` and ``norm_eps``; their state lives in state slots (``Attention.state_bytes``).
    The library checks the ranges (InvalidConfigError / InvalidArgumentError)."""
    style = CHUNK_OFFSETS.get(str(chunk_offsets).lower()) if isinstance(chunk_offsets, str) else None
    if style is None:
        raise InvalidArgumentError(f"chunk_offsets={chunk_offsets!r} is not one of {sorted(CHUNK_OFFSETS)}")
    ints = dict(chunk_size=chunk_size, window=window, state_size=state_size, conv_width=conv_width,
                layer_index=layer_index, num_layers=num_layers, ssm_heads=ssm_heads, ssm_head_dim=ssm_head_dim,
                ssm_groups=ssm_groups)
    body: Dict[str, Any] = {k: _int(v, k) for k, v in ints.items()}
    body.update(chunk_offsets=style, norm_eps=float(norm_eps))
    return {"backend_config_type": "AttambaConfig", "backend_config": body}
