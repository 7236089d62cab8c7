"""Status codes to exceptions: the hierarchy, and each class raised by a real failing call where this
CPU-only build can produce one (DEVICE needs a failing CUDA call and INTERNAL a kvplug bug, so those
two are checked through the mapping only)."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

import kvplug
from kvplug import _lib, errors


def test_every_status_code_has_its_class_and_name() -> None:
    assert sorted(errors.ERROR_CLASSES) == list(range(1, 12))
    for code, cls in errors.ERROR_CLASSES.items():
        assert issubclass(cls, kvplug.KvplugError)
        # The Python-side names are the library's own.
        assert errors.STATUS_NAMES[code] == kvplug.status_string(code)
        e = errors.error_for_status(code, "msg")
        assert type(e) is cls and e.status == code and e.status_name == kvplug.status_string(code)
        assert e.message == "msg" and kvplug.status_string(code) in str(e)
    assert errors.ERROR_CLASSES[errors.KVP_ERR_DEVICE] is kvplug.DeviceError
    assert errors.ERROR_CLASSES[errors.KVP_ERR_INTERNAL] is kvplug.InternalError


def test_unknown_status_is_a_plain_kvplug_error() -> None:
    e = errors.error_for_status(99, "future code")
    assert type(e) is kvplug.KvplugError and e.status == 99
    assert e.status_name == "KVP_UNKNOWN_STATUS" == kvplug.status_string(99)


def test_error_carries_status_and_last_error() -> None:
    with kvplug.BlockManager(block_size=4, num_device_blocks=4) as bm:
        bm.allocate(1, num_tokens=3)
        with pytest.raises(kvplug.AlreadyExistsError) as info:
            bm.allocate(1, num_tokens=3)
        e = info.value
        assert e.status == errors.KVP_ERR_ALREADY_EXISTS
        assert e.status_name == "KVP_ERR_ALREADY_EXISTS"
        assert e.message == kvplug.last_error()  # still this thread's last failure
        assert e.message.startswith("kvp_block_manager_allocate")  # names the entry point


def test_invalid_argument(ctx: kvplug.Context) -> None:
    with pytest.raises(kvplug.InvalidArgumentError, match="block_size"):
        kvplug.BlockManager(block_size=0, num_device_blocks=4)
    with pytest.raises(kvplug.InvalidArgumentError, match="num_threads"):
        kvplug.Context(num_threads=-1)


def test_out_of_memory(ctx: kvplug.Context) -> None:
    # ~1e24 bytes: refused before any allocation is tried, so the test is deterministic and cheap.
    with pytest.raises(kvplug.OutOfMemoryError, match="too large"):
        kvplug.KvCache(ctx, num_layers=1024, num_blocks=2**31 - 1, block_size=65536, num_kv_heads=1024,
                       head_size=1024)


def test_not_supported_cuda_context_in_cpu_build() -> None:
    if "cpu" not in kvplug.version_string():
        pytest.skip(f"this library is a CUDA build ({kvplug.version_string()}): CUDA contexts are supported")
    with pytest.raises(kvplug.NotSupportedError, match="without CUDA"):
        kvplug.Context("cuda")


def test_not_supported_struct_from_a_newer_header() -> None:
    # A struct_size larger than the library knows means a newer header: refused, not misread.
    opts = _lib.kvp_context_options()
    opts.struct_size = ctypes.sizeof(opts) + 8
    out = ctypes.c_void_p()
    big = (ctypes.c_char * (ctypes.sizeof(opts) + 8)).from_buffer_copy(bytes(opts) + bytes(8))
    status = _lib.api().kvp_context_create(ctypes.cast(big, ctypes.POINTER(_lib.kvp_context_options)),
                                           ctypes.byref(out))
    with pytest.raises(kvplug.NotSupportedError, match="struct_size"):
        _lib.check(status)
    assert out.value is None  # output untouched on failure


def test_out_of_range(ctx: kvplug.Context) -> None:
    cache = kvplug.KvCache(ctx, num_layers=2, num_blocks=2, block_size=4, num_kv_heads=1, head_size=32)
    with pytest.raises(kvplug.OutOfRangeError, match="layer=2"):
        cache.layer_view(2)
    name = ctypes.c_char_p()
    with pytest.raises(kvplug.OutOfRangeError, match="index"):
        _lib.check(_lib.api().kvp_backend_name(len(kvplug.backends()), ctypes.byref(name)))


def test_invalid_config() -> None:
    with pytest.raises(kvplug.InvalidConfigError):
        kvplug.check_config("dense", {"backend_config_type": "DenseConfig", "backend_config": {"window": 3}})


def test_not_found() -> None:
    with pytest.raises(kvplug.NotFoundError, match="no_such_backend"):
        kvplug.backend_info("no_such_backend")
    with kvplug.BlockManager(block_size=4, num_device_blocks=4) as bm, pytest.raises(kvplug.NotFoundError):
        bm.free(12345)


def test_no_free_blocks_changes_nothing() -> None:
    with kvplug.BlockManager(block_size=4, num_device_blocks=4) as bm:
        bm.allocate(1, num_tokens=12)  # 3 of 4 blocks
        before = bm.stats()
        with pytest.raises(kvplug.NoFreeBlocksError):
            bm.allocate(2, num_tokens=8)
        assert bm.stats() == before
        assert bm.can_allocate(num_tokens=8) == kvplug.AllocVerdict.LATER
        assert bm.can_allocate(num_tokens=17) == kvplug.AllocVerdict.NEVER


def test_failed_precondition_from_the_library() -> None:
    with kvplug.BlockManager(block_size=4, num_device_blocks=4, num_host_blocks=4) as bm:
        bm.allocate(1, num_tokens=5)
        bm.swap_out(1)
        with pytest.raises(kvplug.FailedPreconditionError, match="swapped"):
            bm.mark_computed(1, 4)


def test_binding_side_errors_use_the_same_classes() -> None:
    with kvplug.BlockManager(block_size=4, num_device_blocks=4) as bm:
        with pytest.raises(kvplug.InvalidArgumentError, match="seq_id"):
            bm.free(-1)  # ctypes would wrap it to 2**64 - 1
        with pytest.raises(kvplug.InvalidArgumentError, match="do not fit int32"):
            bm.allocate(1, np.array([2**40], np.int64))
        with pytest.raises(kvplug.InvalidArgumentError, match="num_tokens=5 but token_ids has 2"):
            bm.allocate(1, [1, 2], num_tokens=5)  # C would read 5 ids from a 2-id buffer
    e = kvplug.FailedPreconditionError("closed")
    assert e.status == errors.KVP_ERR_FAILED_PRECONDITION and e.status_name == "KVP_ERR_FAILED_PRECONDITION"
