"""The exceptions of kvplug: one class per ``kvp_status`` code, all derived from :class:`KvplugError`.

A failed C call raises the class of its status code with ``.message`` set to ``kvp_last_error()``
(which names the entry point, the offending argument and its value). Errors the binding detects
before calling C (a closed handle, an array of the wrong length) raise the same classes, with a
message of the binding's own, so callers catch one hierarchy whichever side found the problem.
"""
from __future__ import annotations

from typing import Dict, Optional, Type

# Status codes of kvplug.h. Pinned by the ABI: they never change meaning.
KVP_OK = 0
KVP_ERR_INVALID_ARGUMENT = 1
KVP_ERR_OUT_OF_MEMORY = 2
KVP_ERR_NOT_SUPPORTED = 3
KVP_ERR_OUT_OF_RANGE = 4
KVP_ERR_INTERNAL = 5
KVP_ERR_INVALID_CONFIG = 6
KVP_ERR_NOT_FOUND = 7
KVP_ERR_ALREADY_EXISTS = 8
KVP_ERR_NO_FREE_BLOCKS = 9
KVP_ERR_FAILED_PRECONDITION = 10
KVP_ERR_DEVICE = 11

# The names kvp_status_string() returns; kept here too so that errors raised before the library is
# loaded (or by the binding itself) carry the same names.
STATUS_NAMES: Dict[int, str] = {
    KVP_OK: "KVP_OK",
    KVP_ERR_INVALID_ARGUMENT: "KVP_ERR_INVALID_ARGUMENT",
    KVP_ERR_OUT_OF_MEMORY: "KVP_ERR_OUT_OF_MEMORY",
    KVP_ERR_NOT_SUPPORTED: "KVP_ERR_NOT_SUPPORTED",
    KVP_ERR_OUT_OF_RANGE: "KVP_ERR_OUT_OF_RANGE",
    KVP_ERR_INTERNAL: "KVP_ERR_INTERNAL",
    KVP_ERR_INVALID_CONFIG: "KVP_ERR_INVALID_CONFIG",
    KVP_ERR_NOT_FOUND: "KVP_ERR_NOT_FOUND",
    KVP_ERR_ALREADY_EXISTS: "KVP_ERR_ALREADY_EXISTS",
    KVP_ERR_NO_FREE_BLOCKS: "KVP_ERR_NO_FREE_BLOCKS",
    KVP_ERR_FAILED_PRECONDITION: "KVP_ERR_FAILED_PRECONDITION",
    KVP_ERR_DEVICE: "KVP_ERR_DEVICE",
}


class KvplugError(Exception):
    """Base of every kvplug error.

    Attributes:
        status: the ``kvp_status`` code (an int; see ``STATUS_NAMES``).
        status_name: its name, e.g. ``"KVP_ERR_INVALID_ARGUMENT"``.
        message: ``kvp_last_error()`` for a failed C call, else the binding's own explanation.
    """

    #: The status code this class stands for (subclasses override it).
    code: int = KVP_ERR_INTERNAL

    def __init__(self, message: str, status: Optional[int] = None, status_name: Optional[str] = None) -> None:
        self.status: int = self.code if status is None else int(status)
        self.status_name: str = status_name or STATUS_NAMES.get(self.status, "KVP_UNKNOWN_STATUS")
        self.message: str = message
        super().__init__(f"{self.status_name}: {message}")


class InvalidArgumentError(KvplugError):
    """A NULL, a bad value, a tensor of the wrong shape/dtype/device (KVP_ERR_INVALID_ARGUMENT)."""

    code = KVP_ERR_INVALID_ARGUMENT


class OutOfMemoryError(KvplugError):
    """A host or device allocation failed, or would be too large (KVP_ERR_OUT_OF_MEMORY)."""

    code = KVP_ERR_OUT_OF_MEMORY


class NotSupportedError(KvplugError):
    """Valid, but not implemented by this build, backend or device (KVP_ERR_NOT_SUPPORTED)."""

    code = KVP_ERR_NOT_SUPPORTED


class OutOfRangeError(KvplugError):
    """An index (layer, block, slot, position) or capacity past its bound (KVP_ERR_OUT_OF_RANGE)."""

    code = KVP_ERR_OUT_OF_RANGE


class InternalError(KvplugError):
    """A bug in kvplug; please report it with the message (KVP_ERR_INTERNAL)."""

    code = KVP_ERR_INTERNAL


class InvalidConfigError(KvplugError):
    """A backend config that fails parsing or verification (KVP_ERR_INVALID_CONFIG)."""

    code = KVP_ERR_INVALID_CONFIG


class NotFoundError(KvplugError):
    """An unknown backend name or sequence id (KVP_ERR_NOT_FOUND)."""

    code = KVP_ERR_NOT_FOUND


class AlreadyExistsError(KvplugError):
    """A sequence id that is already in use (KVP_ERR_ALREADY_EXISTS)."""

    code = KVP_ERR_ALREADY_EXISTS


class NoFreeBlocksError(KvplugError):
    """The block pool cannot satisfy the request now (KVP_ERR_NO_FREE_BLOCKS)."""

    code = KVP_ERR_NO_FREE_BLOCKS


class FailedPreconditionError(KvplugError):
    """The object is not in a state that allows the call, e.g. a closed handle (KVP_ERR_FAILED_PRECONDITION)."""

    code = KVP_ERR_FAILED_PRECONDITION


class DeviceError(KvplugError):
    """A CUDA/NCCL call failed (KVP_ERR_DEVICE)."""

    code = KVP_ERR_DEVICE


class LibraryLoadError(KvplugError, ImportError):
    """libkvplug.so could not be found or loaded, or its ABI major version is not this binding's.

    Also an ImportError, since it means the native part of the package is unusable.
    """

    code = KVP_ERR_NOT_SUPPORTED


ERROR_CLASSES: Dict[int, Type[KvplugError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        OutOfMemoryError,
        NotSupportedError,
        OutOfRangeError,
        InternalError,
        InvalidConfigError,
        NotFoundError,
        AlreadyExistsError,
        NoFreeBlocksError,
        FailedPreconditionError,
        DeviceError,
    )
}


def error_for_status(status: int, message: str, status_name: Optional[str] = None) -> KvplugError:
    """The exception instance for a failed ``kvp_status``; an unknown code gives a plain KvplugError."""
    cls = ERROR_CLASSES.get(int(status), KvplugError)
    return cls(message, status=status, status_name=status_name)


__all__ = [
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
    "ERROR_CLASSES",
    "STATUS_NAMES",
    "error_for_status",
]
