"""Tensors in through DLPack, zero copy.

Any object with ``__dlpack__`` (NumPy arrays, PyTorch/JAX/CuPy tensors) is accepted. The binding
asks the producer for a capsule, takes the ``DLManagedTensor*`` out of it and hands
``&managed->dl_tensor`` to C. It never renames the capsule to ``used_dltensor``: the binding only
borrows the tensor, so the capsule keeps ownership and its destructor calls the producer's deleter
once the last reference goes. Callers hold the capsule (and so the memory) for as long as C may
read the pointer: the duration of a call, or the life of a cache built over the caller's tensors.
"""
from __future__ import annotations

import ctypes
import sys
from typing import Any, Dict, List, Optional, Tuple

from . import _lib
from .errors import InvalidArgumentError, NotSupportedError

# Private function objects (not ctypes.pythonapi.X itself) so that setting argtypes here cannot
# clash with another library that declares the same CPython functions differently.
_PyCapsule_GetName = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
_PyCapsule_GetPointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi))

_LEGACY = b"dltensor"
_VERSIONED = b"dltensor_versioned"
_VERSIONED_OFFSET = _lib.DLManagedTensorVersioned.dl_tensor.offset  # where dl_tensor sits in it

# Devices whose memory the host reads directly: the DLPack protocol says stream must be None there.
_HOST_DEVICES = (_lib.kDLCPU, _lib.kDLCUDAHost)


class Borrowed:
    """A DLTensor borrowed from a producer: ``ptr`` points at it, ``capsule`` keeps it alive.

    ``readonly`` is True when the producer flagged the memory read-only (DLPack >= 1.0 capsules).
    """

    __slots__ = ("ptr", "capsule", "source", "readonly")

    def __init__(self, ptr: "ctypes._Pointer[_lib.DLTensor]", capsule: Any, source: Any, readonly: bool) -> None:
        self.ptr = ptr
        self.capsule = capsule
        self.source = source
        self.readonly = readonly

    @property
    def tensor(self) -> _lib.DLTensor:
        return self.ptr.contents


def _stream_for(device_type: int, stream: Optional[int]) -> Optional[int]:
    """The ``stream`` argument of ``__dlpack__`` for a tensor on ``device_type``.

    Host memory: None (required). CUDA/ROCm: the stream kvplug will launch on, so the producer
    makes its pending work visible there; the context's NULL (default) stream is the legacy
    default stream, which the protocol spells 1 (0 is disallowed as ambiguous).
    """
    if device_type in _HOST_DEVICES:
        return None
    return stream if stream else 1


def borrow(obj: Any, name: str, stream: Optional[int] = None, writable: bool = False) -> Optional[Borrowed]:
    """Borrow ``obj``'s DLTensor for a C call; None stays None (C reports a required one as NULL).

    ``stream``: the CUDA stream the library uses (the context's). ``writable``: the call writes to
    the tensor, so a read-only or copied export is refused (the write would be lost or illegal).
    """
    if obj is None:
        return None
    if not hasattr(obj, "__dlpack__"):
        raise TypeError(f"{name}: expected a DLPack tensor (an object with __dlpack__, e.g. a NumPy array), "
                        f"got {type(obj).__name__}")
    device_type = _lib.kDLCPU
    if hasattr(obj, "__dlpack_device__"):
        device_type = int(obj.__dlpack_device__()[0])
    s = _stream_for(device_type, stream)
    try:
        try:
            # Ask for a DLPack 1.0 capsule first: it can carry read-only arrays (NumPy refuses to
            # export those as legacy capsules) and tells whether the producer copied.
            capsule = obj.__dlpack__(stream=s, max_version=(1, 0))
        except TypeError:
            capsule = obj.__dlpack__(stream=s)  # a producer from before DLPack 1.0: no max_version
    except BufferError as e:
        flags = getattr(obj, "flags", None)
        if flags is not None and not flags.writeable and hasattr(obj, "__array_interface__"):
            # A read-only NumPy array on a NumPy without DLPack 1.0 (< 2.1): legacy capsules cannot
            # say "read-only", so NumPy refuses. Describe the memory from the array interface instead.
            if writable:
                raise InvalidArgumentError(f"{name}: the tensor is read-only but kvplug writes to it") from e
            return _from_array_interface(obj, name)
        raise InvalidArgumentError(f"{name}: the producer cannot export it through DLPack: {e}") from e
    cname = _PyCapsule_GetName(capsule)
    if cname == _VERSIONED:
        address = _PyCapsule_GetPointer(capsule, _VERSIONED)
        managed = _lib.DLManagedTensorVersioned.from_address(address)
        if managed.version.major != 1:
            raise NotSupportedError(f"{name}: DLPack version {managed.version.major}.{managed.version.minor} "
                                    "is not 1.x")
        flags = int(managed.flags)
        tensor_address = address + _VERSIONED_OFFSET
        readonly = bool(flags & _lib.DLPACK_FLAG_BITMASK_READ_ONLY)
        if writable and flags & _lib.DLPACK_FLAG_BITMASK_IS_COPIED:
            raise InvalidArgumentError(f"{name}: the producer exported a copy; results written to it would be lost")
    elif cname == _LEGACY:
        tensor_address = _PyCapsule_GetPointer(capsule, _LEGACY)  # dl_tensor is DLManagedTensor's first field
        readonly = False
    else:
        raise InvalidArgumentError(f"{name}: __dlpack__ returned a capsule named {cname!r}, not a DLPack tensor "
                                   "(already consumed?)")
    if writable and readonly:
        raise InvalidArgumentError(f"{name}: the tensor is read-only but kvplug writes to it")
    ptr = ctypes.cast(ctypes.c_void_p(tensor_address), ctypes.POINTER(_lib.DLTensor))
    return Borrowed(ptr, capsule, obj, readonly)


# NumPy typestr (native byte order) -> DLPack (code, bits) for the array-interface fallback.
_FROM_TYPESTR = {"f4": (_lib.kDLFloat, 32), "f2": (_lib.kDLFloat, 16), "f8": (_lib.kDLFloat, 64),
                 "i8": (_lib.kDLInt, 64), "i4": (_lib.kDLInt, 32), "u2": (_lib.kDLUInt, 16), "u1": (_lib.kDLUInt, 8)}


class _InterfaceTensor:
    """Owns a DLTensor built from ``__array_interface__`` and what it points into."""

    __slots__ = ("tensor", "shape", "strides", "source")

    def __init__(self, obj: Any, name: str) -> None:
        ai = obj.__array_interface__
        typestr = ai["typestr"]
        native = "<" if sys.byteorder == "little" else ">"
        if typestr[0] not in (native, "|") or typestr[1:] not in _FROM_TYPESTR:
            raise InvalidArgumentError(f"{name}: NumPy type {typestr} has no DLPack equivalent kvplug reads")
        code, bits = _FROM_TYPESTR[typestr[1:]]
        shape = tuple(int(x) for x in ai["shape"])
        itemsize = bits // 8
        strides = ai.get("strides") or None
        if strides and any(int(x) % itemsize for x in strides):
            raise InvalidArgumentError(f"{name}: byte strides {strides} are not multiples of the {itemsize}-byte "
                                       "element size (DLPack counts strides in elements)")
        self.shape = (ctypes.c_int64 * max(len(shape), 1))(*shape)
        self.strides = (ctypes.c_int64 * max(len(shape), 1))(*(int(x) // itemsize for x in strides)) if strides else None
        self.source = obj
        self.tensor = _lib.DLTensor(data=int(ai["data"][0]), device=_lib.DLDevice(_lib.kDLCPU, 0), ndim=len(shape),
                                    dtype=_lib.DLDataType(code, bits, 1), shape=self.shape,
                                    strides=self.strides, byte_offset=0)


def _from_array_interface(obj: Any, name: str) -> Borrowed:
    owner = _InterfaceTensor(obj, name)
    return Borrowed(ctypes.pointer(owner.tensor), owner, obj, True)


def pointer(b: Optional[Borrowed]) -> Optional["ctypes._Pointer[_lib.DLTensor]"]:
    """The ``DLTensor*`` to pass to C (None becomes NULL)."""
    return None if b is None else b.ptr


# NumPy dtype strings of the DLPack dtypes kvplug hands out. bfloat16 has no NumPy dtype: its bits
# come back as uint16 (shift left by 16 and view as float32 to read the values).
_TYPESTR = {
    (_lib.kDLFloat, 32): "<f4",
    (_lib.kDLFloat, 16): "<f2",
    (_lib.kDLBfloat, 16): "<u2",
    (_lib.kDLUInt, 8): "|u1",
    (_lib.kDLInt, 64): "<i8",
    (_lib.kDLInt, 32): "<i4",
}


class _HostMemory:
    """The base of a NumPy view over kvplug memory: its ``__array_interface__`` describes the memory,
    and ``owner`` keeps the native object holding it alive as long as any view exists."""

    __slots__ = ("__array_interface__", "owner")

    def __init__(self, interface: Dict[str, Any], owner: Any) -> None:
        self.__array_interface__ = interface
        self.owner = owner


def numpy_view(t: _lib.DLTensor, owner: Any, what: str) -> Any:
    """A writable NumPy array over a host DLTensor that kvplug owns (no copy), kept valid by ``owner``."""
    import numpy as np

    if t.device.device_type not in _HOST_DEVICES:
        raise NotSupportedError(f"{what} lives on device type {t.device.device_type}: NumPy views need host memory "
                                "(use DLPack with a GPU array library instead)")
    key = (int(t.dtype.code), int(t.dtype.bits))
    if key not in _TYPESTR or t.dtype.lanes != 1:
        raise NotSupportedError(f"{what}: DLPack dtype (code={key[0]}, bits={key[1]}, lanes={t.dtype.lanes}) "
                                "has no NumPy equivalent")
    typestr = _TYPESTR[key]
    itemsize = int(t.dtype.bits) // 8
    shape = tuple(int(t.shape[i]) for i in range(t.ndim))
    if t.strides:
        strides: Optional[Tuple[int, ...]] = tuple(int(t.strides[i]) * itemsize for i in range(t.ndim))
    else:
        strides = None  # compact row-major
    interface = {
        "version": 3,
        "shape": shape,
        "typestr": typestr,
        "data": (int(t.data or 0) + int(t.byte_offset), False),
        "strides": strides,
    }
    return np.asarray(_HostMemory(interface, owner))


def bytes_view(address: int, num_bytes: int, owner: Any) -> Any:
    """A writable uint8 NumPy array over ``num_bytes`` host bytes at ``address``, kept valid by ``owner``."""
    import numpy as np

    interface = {"version": 3, "shape": (int(num_bytes),), "typestr": "|u1", "data": (int(address or 0), False),
                 "strides": None}
    return np.asarray(_HostMemory(interface, owner))


__all__: List[str] = []  # internal module
