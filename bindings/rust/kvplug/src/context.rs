//! The context: a device and the stream work is launched on. Every cache, plan and attention
//! borrows the context it was made with (`KvCache<'ctx>` ...), so none can outlive it.
use std::ffi::c_void;
use std::ptr::{self, NonNull};

use kvplug_sys as sys;

use crate::error::{check, Result};

/// Devices a context can be made for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceType {
    Cpu,
    Cuda,
}

impl DeviceType {
    pub(crate) fn dl(self) -> sys::DLDeviceType {
        match self {
            DeviceType::Cpu => sys::kDLCPU,
            DeviceType::Cuda => sys::kDLCUDA,
        }
    }
}

/// `kvp_context_options` without the stream (see [`Context::with_stream`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContextOptions {
    pub device: DeviceType,
    /// CUDA ordinal; 0 for the CPU.
    pub device_id: i32,
    /// CPU worker threads for CPU backends; 0 = all hardware threads.
    pub num_threads: i32,
}

impl Default for ContextOptions {
    fn default() -> Self {
        ContextOptions { device: DeviceType::Cpu, device_id: 0, num_threads: 0 }
    }
}

/// A kvplug context (`kvp_context`). Destroyed on drop.
#[derive(Debug)]
pub struct Context {
    raw: NonNull<sys::kvp_context>,
    device: DeviceType,
    device_id: i32,
}

// SAFETY (Send): a context is not tied to the thread that made it: it holds a device ordinal, a
// stream handle (usable from any thread) and a CPU thread pool whose destructor joins its workers
// from whichever thread drops it.
unsafe impl Send for Context {}
// SAFETY (Sync): the header says every call taking a context only reads it, except
// kvp_context_set_stream, which must not race with other calls using the context. Here set_stream
// takes `&mut self`, so it cannot run while any `&Context` is in use (caches, plans and attention
// handles all hold such a borrow). Concurrent reads are safe; concurrent CPU runs on one context
// share its thread pool, which serializes them internally (one parallel-for at a time).
unsafe impl Sync for Context {}

impl Context {
    /// A CPU context using all hardware threads.
    pub fn new() -> Result<Context> {
        Context::with_options(&ContextOptions::default())
    }

    pub fn with_options(options: &ContextOptions) -> Result<Context> {
        // SAFETY: a NULL stream is always valid (the default stream; ignored on the CPU).
        unsafe { Context::with_stream(options, ptr::null_mut()) }
    }

    /// A context launching on `stream` (a `cudaStream_t` for CUDA; ignored on the CPU).
    ///
    /// # Safety
    /// `stream` must be NULL or a stream of `options.device_id` that stays valid for the context's
    /// lifetime (kvplug launches on it without checking it).
    pub unsafe fn with_stream(options: &ContextOptions, stream: *mut c_void) -> Result<Context> {
        crate::check_version()?;
        let mut o: sys::kvp_context_options = sys::Zeroed::zeroed();
        o.struct_size = std::mem::size_of::<sys::kvp_context_options>();
        o.device_type = options.device.dl() as i32;
        o.device_id = options.device_id;
        o.num_threads = options.num_threads;
        o.stream = stream;
        let mut raw = ptr::null_mut();
        // SAFETY: `o` is a complete options struct; `raw` is a valid out pointer.
        check(unsafe { sys::kvp_context_create(&o, &mut raw) })?;
        Ok(Context {
            raw: NonNull::new(raw).expect("kvp_context_create returned OK and NULL"),
            device: options.device,
            device_id: options.device_id,
        })
    }

    /// Changes the stream later work launches on.
    ///
    /// # Safety
    /// As for [`Context::with_stream`]. `&mut self` guarantees no other call on this context runs
    /// meanwhile (the header's requirement).
    pub unsafe fn set_stream(&mut self, stream: *mut c_void) -> Result<()> {
        // SAFETY: exclusive access (&mut self); the stream is the caller's responsibility.
        check(unsafe { sys::kvp_context_set_stream(self.raw.as_ptr(), stream) })
    }

    pub fn device(&self) -> DeviceType {
        self.device
    }

    pub fn device_id(&self) -> i32 {
        self.device_id
    }

    /// The raw handle, for interop with C code. It stays owned by `self`.
    pub fn as_raw(&self) -> *const sys::kvp_context {
        self.raw.as_ptr()
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: created by kvp_context_create, destroyed once; no borrower is left (every handle
        // made with it borrows it for its whole life).
        unsafe { sys::kvp_context_destroy(self.raw.as_ptr()) }
    }
}
