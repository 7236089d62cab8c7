"""DLPack interop details: legacy and 1.0 capsules, read-only and copied exports, stream passing
for device tensors, and that borrowed capsules are released after each call."""
from __future__ import annotations

import ctypes
import sys
from typing import Any, List, Optional, Tuple

import numpy as np
import pytest

import kvplug
from kvplug import _lib

_PyCapsule_New = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)(
    ("PyCapsule_New", ctypes.pythonapi))


class FakeProducer:
    """A DLPack producer over a NumPy array's memory that claims whatever device, capsule kind and
    flags a test needs. ``streams`` records the stream argument of each ``__dlpack__`` call. With
    ``old_protocol`` it rejects ``max_version`` like producers from before DLPack 1.0."""

    def __init__(self, arr: np.ndarray, device: Tuple[int, int] = (1, 0), versioned: bool = False,
                 version: Tuple[int, int] = (1, 0), flags: int = 0, name: Optional[bytes] = None,
                 old_protocol: bool = False) -> None:
        self.arr, self.device, self.old_protocol = arr, device, old_protocol
        self.streams: List[Optional[int]] = []
        self._shape = (ctypes.c_int64 * arr.ndim)(*arr.shape)
        self._strides = (ctypes.c_int64 * arr.ndim)(*(s // arr.itemsize for s in arr.strides))
        code = {"f": _lib.kDLFloat, "i": _lib.kDLInt, "u": _lib.kDLUInt}[arr.dtype.kind]
        t = _lib.DLTensor(data=arr.ctypes.data, device=_lib.DLDevice(*device), ndim=arr.ndim,
                          dtype=_lib.DLDataType(code, arr.itemsize * 8, 1), shape=self._shape,
                          strides=self._strides, byte_offset=0)
        if versioned:
            self.managed: Any = _lib.DLManagedTensorVersioned(version=_lib.DLPackVersion(*version), flags=flags,
                                                              dl_tensor=t)
        else:
            self.managed = _lib.DLManagedTensor(dl_tensor=t)  # no deleter: the memory is self.arr's
        self.name = name or (b"dltensor_versioned" if versioned else b"dltensor")  # must outlive the capsule

    def __dlpack_device__(self) -> Tuple[int, int]:
        return self.device

    def __dlpack__(self, stream: Optional[int] = None, **kwargs: Any) -> Any:
        if self.old_protocol and "max_version" in kwargs:
            raise TypeError("__dlpack__() got an unexpected keyword argument 'max_version'")
        self.streams.append(stream)
        return _PyCapsule_New(ctypes.addressof(self.managed), self.name, None)


def _cache(ctx: kvplug.Context) -> kvplug.KvCache:
    return kvplug.KvCache(ctx, num_layers=1, num_blocks=2, block_size=4, num_kv_heads=2, head_size=32)


def test_legacy_capsule_from_an_old_producer_writes_zero_copy(ctx: kvplug.Context) -> None:
    cache = _cache(ctx)
    k = np.random.default_rng(0).standard_normal((3, 2, 32)).astype(np.float32)
    fk = FakeProducer(k, old_protocol=True)
    fv = FakeProducer(k * 2, versioned=True)
    cache.write(0, fk, fv, np.array([1, 2, 3]))
    assert fk.streams == [None] and fv.streams == [None]  # host memory: stream must be None
    view = cache.layer_view(0)
    assert np.array_equal(view[0, 0, 1:4], k) and np.array_equal(view[1, 0, 1:4], k * 2)


def test_cuda_tensor_in_a_cpu_context_is_refused_and_gets_the_context_stream(ctx: kvplug.Context) -> None:
    # The fake claims kDLCUDA over host memory: the library must reject it on the device check,
    # before it reads a byte. The binding must have asked the producer for the context's stream.
    cache = _cache(ctx)
    k = np.zeros((1, 2, 32), np.float32)
    fake = FakeProducer(k, device=(_lib.kDLCUDA, 0))
    with pytest.raises(kvplug.InvalidArgumentError, match=r"key: device \(type=2, id=0\)"):
        cache.write(0, fake, k, [0])
    assert fake.streams == [1]  # the NULL (default) stream is the legacy default stream, spelled 1
    ctx.set_stream(0xABC)
    with pytest.raises(kvplug.InvalidArgumentError, match="device"):
        cache.write(0, k, fake, [0])
    assert fake.streams == [1, 0xABC]
    assert not cache.layer_view(0).any()


def test_cuda_host_memory_is_accepted_on_the_cpu(ctx: kvplug.Context) -> None:
    cache = _cache(ctx)
    k = np.full((1, 2, 32), 5.0, np.float32)
    pinned = FakeProducer(k, device=(_lib.kDLCUDAHost, 0))
    cache.write(0, pinned, k, [7])
    assert pinned.streams == [None] and (cache.layer_view(0)[:, 1, 3] == 5.0).all()


def test_capsule_errors(ctx: kvplug.Context) -> None:
    cache = _cache(ctx)
    k = np.zeros((1, 2, 32), np.float32)
    with pytest.raises(kvplug.InvalidArgumentError, match="used_dltensor"):
        cache.write(0, FakeProducer(k, name=b"used_dltensor"), k, [0])
    with pytest.raises(kvplug.NotSupportedError, match="DLPack version 2.0"):
        cache.write(0, FakeProducer(k, versioned=True, version=(2, 0)), k, [0])
    attn = kvplug.Attention(ctx, num_q_heads=2, num_kv_heads=2, head_size=32)
    plan = kvplug.Plan(ctx, max_num_seqs=1, max_num_tokens=1, max_num_blocks=1)
    plan.update([0, 1], [1], block_size=4, block_table=[[0]])
    q = np.ones((1, 2, 32), np.float32)
    copied = FakeProducer(np.zeros_like(q), versioned=True, flags=_lib.DLPACK_FLAG_BITMASK_IS_COPIED)
    with pytest.raises(kvplug.InvalidArgumentError, match="copy"):
        attn.run(plan, cache, 0, q, copied)  # results written to a copy would be lost
    readonly = FakeProducer(np.zeros_like(q), versioned=True, flags=_lib.DLPACK_FLAG_BITMASK_READ_ONLY)
    with pytest.raises(kvplug.InvalidArgumentError, match="read-only"):
        attn.run(plan, cache, 0, q, readonly)
    out = np.zeros_like(q)
    attn.run(plan, cache, 0, FakeProducer(q, versioned=True, flags=_lib.DLPACK_FLAG_BITMASK_READ_ONLY), out)
    assert np.array_equal(out, np.zeros_like(q))  # a read-only query is fine; the cache holds zeros


def test_borrowed_capsules_are_released_after_the_call(ctx: kvplug.Context) -> None:
    # NumPy's capsule holds a reference to its array until the capsule's destructor runs; the
    # binding borrows (never consumes) it, so the reference must be gone once the call returns.
    cache = _cache(ctx)
    k = np.zeros((2, 2, 32), np.float32)
    slots = np.array([0, 1], np.int64)
    before = (sys.getrefcount(k), sys.getrefcount(slots))
    for _ in range(3):
        cache.write(0, k, k, slots)
    with pytest.raises(kvplug.InvalidArgumentError):
        cache.write(0, k, k[:1], slots)  # failures release them too
    assert (sys.getrefcount(k), sys.getrefcount(slots)) == before


def test_non_dlpack_objects_are_a_type_error(ctx: kvplug.Context) -> None:
    cache = _cache(ctx)
    with pytest.raises(TypeError, match="key: expected a DLPack tensor"):
        cache.write(0, memoryview(b"x" * 256), np.zeros((1, 2, 32), np.float32), [0])


class OldNumPy(np.ndarray):
    """Behaves like NumPy < 2.1: no max_version, and read-only arrays refused (legacy capsules
    cannot say "read-only")."""

    def __dlpack__(self, stream: Optional[int] = None, **kwargs: Any) -> Any:
        if kwargs:
            raise TypeError("__dlpack__() got an unexpected keyword argument")
        if not self.flags.writeable:
            raise BufferError("Cannot export readonly array since signalling readonly is unsupported by DLPack.")
        return np.asarray(self).__dlpack__()  # host memory: stream is None


def test_read_only_arrays_of_an_old_numpy(ctx: kvplug.Context) -> None:
    cache = _cache(ctx)
    base = np.random.default_rng(1).standard_normal((4, 2, 32)).astype(np.float32)
    k = base[::2].view(OldNumPy)  # strided, read-only: described from __array_interface__ instead
    k.flags.writeable = False
    cache.write(0, k, k, [0, 1])
    assert np.array_equal(cache.layer_view(0)[0, 0, :2], base[::2])
    attn = kvplug.Attention(ctx, num_q_heads=2, num_kv_heads=2, head_size=32)
    plan = kvplug.Plan(ctx, max_num_seqs=1, max_num_tokens=2, max_num_blocks=1)
    plan.update([0, 2], [2], block_size=4, block_table=[[0]])
    frozen = np.zeros((2, 2, 32), np.float32).view(OldNumPy)
    frozen.flags.writeable = False
    with pytest.raises(kvplug.InvalidArgumentError, match="read-only"):
        attn.run(plan, cache, 0, k, frozen)
    byteswapped = np.zeros((2, 2, 32), ">f4")
    with pytest.raises(kvplug.InvalidArgumentError, match="cannot export"):
        attn.run(plan, cache, 0, byteswapped, np.zeros((2, 2, 32), np.float32))
