//! Errors: every failing kvplug call becomes an [`Error`] holding the status code and the message
//! `kvp_last_error()` gave right after the failure (it is thread-local and overwritten by the next
//! call, so it is copied at once).
use std::ffi::CStr;
use std::fmt;

use kvplug_sys as sys;

/// The status codes of `kvp_status`. Values are pinned by the header; a code this binding does not
/// know (a newer library may add some in a minor version) is kept as `Unknown`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Status {
    Ok,
    InvalidArgument,
    OutOfMemory,
    NotSupported,
    OutOfRange,
    Internal,
    InvalidConfig,
    NotFound,
    AlreadyExists,
    NoFreeBlocks,
    FailedPrecondition,
    Device,
    Unknown(u32),
}

impl Status {
    pub fn from_raw(s: sys::kvp_status) -> Status {
        match s {
            sys::KVP_OK => Status::Ok,
            sys::KVP_ERR_INVALID_ARGUMENT => Status::InvalidArgument,
            sys::KVP_ERR_OUT_OF_MEMORY => Status::OutOfMemory,
            sys::KVP_ERR_NOT_SUPPORTED => Status::NotSupported,
            sys::KVP_ERR_OUT_OF_RANGE => Status::OutOfRange,
            sys::KVP_ERR_INTERNAL => Status::Internal,
            sys::KVP_ERR_INVALID_CONFIG => Status::InvalidConfig,
            sys::KVP_ERR_NOT_FOUND => Status::NotFound,
            sys::KVP_ERR_ALREADY_EXISTS => Status::AlreadyExists,
            sys::KVP_ERR_NO_FREE_BLOCKS => Status::NoFreeBlocks,
            sys::KVP_ERR_FAILED_PRECONDITION => Status::FailedPrecondition,
            sys::KVP_ERR_DEVICE => Status::Device,
            other => Status::Unknown(other),
        }
    }

    pub fn to_raw(self) -> sys::kvp_status {
        match self {
            Status::Ok => sys::KVP_OK,
            Status::InvalidArgument => sys::KVP_ERR_INVALID_ARGUMENT,
            Status::OutOfMemory => sys::KVP_ERR_OUT_OF_MEMORY,
            Status::NotSupported => sys::KVP_ERR_NOT_SUPPORTED,
            Status::OutOfRange => sys::KVP_ERR_OUT_OF_RANGE,
            Status::Internal => sys::KVP_ERR_INTERNAL,
            Status::InvalidConfig => sys::KVP_ERR_INVALID_CONFIG,
            Status::NotFound => sys::KVP_ERR_NOT_FOUND,
            Status::AlreadyExists => sys::KVP_ERR_ALREADY_EXISTS,
            Status::NoFreeBlocks => sys::KVP_ERR_NO_FREE_BLOCKS,
            Status::FailedPrecondition => sys::KVP_ERR_FAILED_PRECONDITION,
            Status::Device => sys::KVP_ERR_DEVICE,
            Status::Unknown(v) => v,
        }
    }

    /// The library's name of the code ("KVP_ERR_NOT_FOUND"; "KVP_UNKNOWN_STATUS" for others).
    pub fn name(self) -> &'static str {
        // SAFETY: kvp_status_string accepts any value and returns static, NUL-terminated storage,
        // never NULL (header).
        let s = unsafe { CStr::from_ptr(sys::kvp_status_string(self.to_raw())) };
        s.to_str().unwrap_or("KVP_UNKNOWN_STATUS")
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A failed kvplug call: its status and message. The message names the function and the offending
/// argument and value. Checks this binding makes before calling (slice lengths against shapes, for
/// the memory safety of the call) report `InvalidArgument` with a message of the same form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub code: Status,
    pub message: String,
}

impl Error {
    pub fn code(&self) -> Status {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// An error found by this binding, before any C call.
    pub(crate) fn binding(code: Status, message: impl Into<String>) -> Error {
        Error { code, message: message.into() }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Error {
        Error::binding(Status::InvalidArgument, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.name(), self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// This thread's last error message.
pub fn last_error() -> String {
    // SAFETY: never NULL, valid until the next kvplug call on this thread; copied at once.
    unsafe { CStr::from_ptr(sys::kvp_last_error()) }.to_string_lossy().into_owned()
}

/// Turns a status into a Result, reading kvp_last_error() at once on failure. Must be called right
/// after the failing call, on the same thread (nothing in between calls kvplug).
pub(crate) fn check(status: sys::kvp_status) -> Result<()> {
    if status == sys::KVP_OK {
        Ok(())
    } else {
        Err(Error { code: Status::from_raw(status), message: last_error() })
    }
}

/// A length or count as the C API's int32_t, or InvalidArgument naming `what`.
pub(crate) fn to_i32(value: usize, what: &str) -> Result<i32> {
    i32::try_from(value).map_err(|_| Error::invalid(format!("{what}={value} does not fit in int32_t")))
}

pub(crate) fn to_i64(value: usize, what: &str) -> Result<i64> {
    i64::try_from(value).map_err(|_| Error::invalid(format!("{what}={value} does not fit in int64_t")))
}
