"""kvplug: paged-KV attention backends and a KV block manager, from Python.

A ctypes binding of ``libkvplug.so``'s C ABI (``kvplug.h``). Tensors cross it through DLPack, zero
copy: NumPy arrays, PyTorch tensors or anything else with ``__dlpack__``.

The library is found, on first use, at ``$KVPLUG_LIBRARY``, else in this package's folder, else on
the system (``ctypes.util.find_library("kvplug")``, then ``libkvplug.so.0``); its ABI major version
must be this binding's (``ABI_VERSION_MAJOR``), or :class:`LibraryLoadError` is raised.

Quick start::

    import numpy as np, kvplug
    with kvplug.Context() as ctx:
        cache = kvplug.KvCache(ctx, num_layers=1, num_blocks=8, block_size=16, num_kv_heads=2, head_size=64)
        attn = kvplug.Attention(ctx, "dense", num_q_heads=4, num_kv_heads=2, head_size=64)
        plan = kvplug.Plan(ctx, max_num_seqs=4, max_num_tokens=64, max_num_blocks=8)

Since ABI 0.4: ``Plan.update(..., context_lens=, query_pos_starts=)``, the ``"star"`` backend
(:func:`star_config`), :class:`Communicator` (:func:`nccl_unique_id`),
``BlockManager.allocate_star``, the ``"entropy"`` backend (:func:`entropy_config`) and
``Attention.run(..., entropy_summary=)`` (columns :data:`ENTROPY_SUMMARY_FIELDS`), the ``"kv_shift"``
backend (:func:`kv_shift_config`; it keeps per-sequence state: caches with state slots).

Since ABI 0.5: :meth:`Attention.cache_layout` (:class:`CacheLayout`), :meth:`Attention.ssm`, the
experimental ``"attamba"`` backend (:func:`attamba_config`).
"""
from __future__ import annotations

from ._lib import ABI_VERSION_MAJOR, ABI_VERSION_MINOR, ENTRY_POINTS
from ._lib import load as load_library
from .core import (
    CHUNK_OFFSETS,
    COMM_KINDS,
    DEVICES,
    DTYPES,
    ENTROPY_SUMMARY_FIELDS,
    LAYOUTS,
    ROPE_STYLES,
    AllocVerdict,
    Attention,
    BackendDeviceInfo,
    BackendInfo,
    BlockCopy,
    BlockManager,
    BlockManagerStats,
    CacheLayout,
    Communicator,
    Context,
    KvCache,
    Plan,
    abi_version,
    attamba_config,
    backend_device_info,
    backend_info,
    backends,
    check_config,
    entropy_config,
    kv_shift_config,
    last_error,
    merge_states,
    nccl_unique_id,
    star_config,
    status_string,
    version_string,
)
from .errors import (
    AlreadyExistsError,
    DeviceError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    InvalidConfigError,
    KvplugError,
    LibraryLoadError,
    NoFreeBlocksError,
    NotFoundError,
    NotSupportedError,
    OutOfMemoryError,
    OutOfRangeError,
)


def library_path() -> str:
    """The path libkvplug was loaded from (loading it if needed)."""
    from ._lib import api

    return api().path


__version__ = "0.1.0"

__all__ = [
    "ABI_VERSION_MAJOR",
    "ABI_VERSION_MINOR",
    "ENTRY_POINTS",
    "CHUNK_OFFSETS",
    "COMM_KINDS",
    "DEVICES",
    "DTYPES",
    "ENTROPY_SUMMARY_FIELDS",
    "LAYOUTS",
    "ROPE_STYLES",
    "AllocVerdict",
    "Attention",
    "BackendDeviceInfo",
    "BackendInfo",
    "BlockCopy",
    "BlockManager",
    "BlockManagerStats",
    "CacheLayout",
    "Communicator",
    "Context",
    "KvCache",
    "Plan",
    "abi_version",
    "attamba_config",
    "backend_device_info",
    "backend_info",
    "backends",
    "check_config",
    "entropy_config",
    "kv_shift_config",
    "last_error",
    "library_path",
    "load_library",
    "merge_states",
    "nccl_unique_id",
    "star_config",
    "status_string",
    "version_string",
    "KvplugError",
    "InvalidArgumentError",
    "OutOfMemoryError",
    "NotSupportedError",
    "OutOfRangeError",
    "InternalError",
    "InvalidConfigError",
    "NotFoundError",
    "AlreadyExistsError",
    "NoFreeBlocksError",
    "FailedPreconditionError",
    "DeviceError",
    "LibraryLoadError",
]
