//! Safe Rust wrappers of kvplug (`libkvplug.so`): paged-KV attention backends and a KV block
//! manager behind a stable C ABI.
//!
//! ```no_run
//! use kvplug::*;
//! let ctx = Context::new()?;                                             // CPU, all cores
//! let mut bm = BlockManager::new(&BlockManagerOptions::new(16, 1024))?;
//! let mut cache = KvCache::new(&ctx, &KvCacheOptions::new(32, 1024, 16, 8, 128, KvDtype::BF16))?;
//! let attn = Attention::new(&ctx, &AttentionOptions::new("dense", 32, 8, 128, KvDtype::BF16))?;
//! let mut plan = Plan::new(&ctx, &PlanOptions { max_num_seqs: 256, max_num_tokens: 8192, max_num_blocks: 65536 })?;
//! # Ok::<(), kvplug::Error>(())
//! ```
//!
//! Handles: [`Context`], [`BlockManager`], [`KvCache`], [`Plan`], [`Attention`], [`Comm`]; each destroys its
//! C handle on drop. Caches, plans and attention instances borrow their context, so none can
//! outlive it:
//!
//! ```compile_fail,E0597
//! let cache = {
//!     let ctx = kvplug::Context::new().unwrap();
//!     kvplug::KvCache::new(&ctx, &kvplug::KvCacheOptions::new(1, 4, 16, 1, 64, kvplug::KvDtype::F32)).unwrap()
//! }; // error[E0597]: `ctx` does not live long enough
//! ```
//!
//! A cache over caller tensors keeps them borrowed; they cannot be read or dropped meanwhile:
//!
//! ```compile_fail,E0502
//! use kvplug::*;
//! let ctx = Context::new().unwrap();
//! let o = KvCacheOptions::new(1, 4, 16, 1, 64, KvDtype::F32);
//! let mut pages = vec![0f32; 2 * 4 * 16 * 64];
//! let cache = KvCache::from_tensors(&ctx, &o, vec![TensorMut::f32(&mut pages, &o.layer_shape()).unwrap()]).unwrap();
//! let first = pages[0]; // error[E0502]: `pages` is also borrowed as mutable (by the cache)
//! drop(cache);
//! ```
//!
//! (Stable rustdoc does not check the error codes, and a `compile_fail` example passes on any
//! error; `tests/lifetimes.rs` holds the same two programs without the offending line, which build
//! and run.)
//!
//! Since ABI 0.3: [`Attention::run_with`] takes an [`AttentionOutputs`] (out, optional lse and
//! per-row entropy), [`Plan::attach`] builds an attention's step work at each `update`,
//! [`merge_states`] combines partial states over disjoint key sets, [`Attention::state_bytes`] and
//! [`backend_device_info`] report what a backend needs and offers per device.
//!
//! Since ABI 0.4: [`Batch`] takes optional `context_lens` and `query_pos_starts` (Star Attention's
//! phases and shards; the "star" backend is registered), [`Comm`] merges the partial states of
//! several shards ([`Comm::merge_all`] for a whole in-process round), and
//! [`BlockManager::allocate_star`] reuses Star context blocks from the prefix cache even after a
//! changed middle block. [`AttentionOutputs::entropy_summary`] receives a per-head summary of a
//! run's attention entropies ([`HeadEntropy`]), and the "entropy" backend (entropy-guided
//! attention: a temperature per query head and position) is registered.
//!
//! Since ABI 0.5: [`Attention::cache_layout`] ([`CacheLayout`]: where a sequence's rows live in its
//! page list) and [`Attention::ssm`] ([`SsmArgs`]: a backend's sequence-state operator); the
//! experimental "attamba" backend is registered.
//!
//! Errors are [`Error`]`{ code: `[`Status`]`, message }`, the message being `kvp_last_error()` at
//! the failure. Thread safety follows the header: what it allows concurrently takes `&self`, the
//! rest `&mut self`; each `Send`/`Sync` impl states its reason.
//!
//! Linking: the build script of `kvplug-sys` links `libkvplug` from `KVPLUG_LIB_DIR` when it is set,
//! else where `pkg-config kvplug` says (an installed kvplug; `PKG_CONFIG_PATH=PREFIX/lib/pkgconfig`
//! for a private prefix), else from the repository's `build/abi`; this crate's tests and examples get
//! an rpath to it. Binaries of other crates need the library on their loader path (rpath or
//! `LD_LIBRARY_PATH`).

mod attention;
mod block_manager;
mod comm;
mod context;
mod error;
mod kv_cache;
mod plan;
mod tensor;

use std::ffi::CStr;

pub use kvplug_sys as sys;

pub use attention::{
    config_check, merge_states, Attention, AttentionOptions, AttentionOutputs, CacheLayout, Config, HeadEntropy,
    SsmArgs, ENTROPY_SUMMARY_FIELDS,
};
pub use block_manager::{
    AllocVerdict, BlockCopy, BlockManager, BlockManagerOptions, BlockManagerStats, StarAllocation, StarLayout,
};
pub use comm::{nccl_unique_id, Comm, CommKind, CommOptions, PartialState, NCCL_UNIQUE_ID_BYTES};
pub use context::{Context, ContextOptions, DeviceType};
pub use error::{last_error, Error, Result, Status};
pub use kv_cache::{KvCache, KvCacheOptions, KvDtype, KvLayout, LayerView};
pub use plan::{Batch, BlockTable, Plan, PlanOptions};
pub use tensor::{DType, TensorMut, TensorRef, MAX_NDIM};

use error::check;

/// The ABI version this binding was written against (the header's), as (major, minor, patch).
pub const BINDING_ABI_VERSION: (u32, u32, u32) =
    (sys::KVP_ABI_VERSION_MAJOR, sys::KVP_ABI_VERSION_MINOR, sys::KVP_ABI_VERSION_PATCH);

/// The ABI version of the loaded library, as (major, minor, patch).
pub fn abi_version() -> (u32, u32, u32) {
    // SAFETY: never fails.
    let v = unsafe { sys::kvp_abi_version() };
    (v / 10000, v / 100 % 100, v % 100)
}

/// Whether a library of ABI `lib` (major, minor, patch) serves this binding: the same major version
/// (only a major bump changes what exists), and a minor version at least the binding's (the options
/// structs this binding passes carry its struct_size, which an older library refuses).
pub(crate) fn version_compatible(lib: (u32, u32, u32)) -> Result<()> {
    let (major, minor, _) = BINDING_ABI_VERSION;
    if lib.0 != major || lib.1 < minor {
        return Err(Error::binding(
            Status::NotSupported,
            format!(
                "check_version: libkvplug has ABI {}.{}.{} but this binding needs {major}.x with x >= {minor}",
                lib.0, lib.1, lib.2
            ),
        ));
    }
    Ok(())
}

/// Checks the loaded library's ABI version against the binding's. `Context` and `BlockManager`
/// constructors call it (every other handle needs a context).
pub fn check_version() -> Result<()> {
    version_compatible(abi_version())
}

/// Library version and build flavour, e.g. "0.1.0 (cpu)".
pub fn version_string() -> &'static str {
    // SAFETY: static storage, NUL-terminated (header).
    unsafe { CStr::from_ptr(sys::kvp_version_string()) }.to_str().unwrap_or("?")
}

fn static_str(p: *const std::ffi::c_char) -> &'static str {
    if p.is_null() {
        return "";
    }
    // SAFETY: the library's names are static, NUL-terminated storage (header).
    unsafe { CStr::from_ptr(p) }.to_str().unwrap_or("?")
}

/// Names of the registered attention backends.
pub fn backend_names() -> Result<Vec<&'static str>> {
    let mut count = 0;
    // SAFETY: valid out pointer.
    check(unsafe { sys::kvp_backend_count(&mut count) })?;
    (0..count)
        .map(|i| {
            let mut name = std::ptr::null();
            // SAFETY: index in range; valid out pointer.
            check(unsafe { sys::kvp_backend_name(i, &mut name) })?;
            Ok(static_str(name))
        })
        .collect()
}

/// What a backend supports (`kvp_backend_info`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendInfo {
    pub name: &'static str,
    /// Bit `1 << kvp_dtype` per supported cache dtype.
    pub dtype_mask: u32,
    /// Bit `1 << DLDeviceType` per supported device.
    pub device_mask: u32,
    pub head_sizes: &'static [i32],
    pub supports_lse: bool,
    pub needs_state_slots: bool,
}

impl BackendInfo {
    pub fn supports_dtype(&self, dtype: KvDtype) -> bool {
        self.dtype_mask & (1u32 << dtype.to_raw()) != 0
    }

    pub fn supports_device(&self, device: DeviceType) -> bool {
        self.device_mask & (1u32 << device.dl()) != 0
    }
}

/// `n` entries of the library's static storage (empty for NULL or n <= 0).
fn static_i32s(p: *const i32, n: i32) -> &'static [i32] {
    if p.is_null() || n <= 0 {
        return &[];
    }
    // SAFETY: the library's lists are static storage of n entries (header).
    unsafe { std::slice::from_raw_parts(p, n as usize) }
}

/// Describes backend `name` (`Status::NotFound` for an unknown name).
pub fn backend_info(name: &str) -> Result<BackendInfo> {
    let c = attention::c_name("backend_info: name", name)?;
    let mut info: sys::kvp_backend_info = sys::Zeroed::zeroed();
    info.struct_size = std::mem::size_of::<sys::kvp_backend_info>();
    // SAFETY: NUL-terminated name; valid out pointer of the declared size.
    check(unsafe { sys::kvp_backend_info_get(c.as_ptr(), &mut info) })?;
    let head_sizes = static_i32s(info.head_sizes, info.num_head_sizes);
    Ok(BackendInfo {
        name: static_str(info.name),
        dtype_mask: info.dtype_mask,
        device_mask: info.device_mask,
        head_sizes,
        supports_lse: info.supports_lse != 0,
        needs_state_slots: info.needs_state_slots != 0,
    })
}

/// What a backend offers on one device type (`kvp_backend_device_info`); capabilities differ per
/// device (the CUDA kernels take fewer head sizes than the CPU engine).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendDeviceInfo {
    pub device: DeviceType,
    /// Whether the backend runs on this device in this build. When false, the masks and lists are
    /// empty.
    pub available: bool,
    /// Bit `1 << kvp_dtype` per cache dtype on this device.
    pub dtype_mask: u32,
    pub head_sizes: &'static [i32],
    /// `AttentionOutputs::lse` can be set.
    pub supports_lse: bool,
    /// `AttentionOutputs::entropy` can be set.
    pub supports_entropy: bool,
    /// Caches need state slots of `Attention::state_bytes` per layer.
    pub needs_state_slots: bool,
    /// Its config table's fields may still change.
    pub experimental: bool,
}

impl BackendDeviceInfo {
    pub fn supports_dtype(&self, dtype: KvDtype) -> bool {
        self.dtype_mask & (1u32 << dtype.to_raw()) != 0
    }

    pub fn supports_head_size(&self, head_size: i32) -> bool {
        self.head_sizes.contains(&head_size)
    }
}

/// Describes backend `name` on `device` (`Status::NotFound` for an unknown name). A device this
/// build lacks is reported as `available: false`, not as an error.
pub fn backend_device_info(name: &str, device: DeviceType) -> Result<BackendDeviceInfo> {
    let c = attention::c_name("backend_device_info: name", name)?;
    let mut info: sys::kvp_backend_device_info = sys::Zeroed::zeroed();
    info.struct_size = std::mem::size_of::<sys::kvp_backend_device_info>();
    // SAFETY: NUL-terminated name; valid out pointer of the declared size.
    check(unsafe { sys::kvp_backend_device_info_get(c.as_ptr(), device.dl() as i32, &mut info) })?;
    Ok(BackendDeviceInfo {
        device,
        available: info.available != 0,
        dtype_mask: info.dtype_mask,
        head_sizes: static_i32s(info.head_sizes, info.num_head_sizes),
        supports_lse: info.supports_lse != 0,
        supports_entropy: info.supports_entropy != 0,
        needs_state_slots: info.needs_state_slots != 0,
        experimental: info.experimental != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_policy() {
        let (major, minor, _) = BINDING_ABI_VERSION;
        assert!(version_compatible((major, minor, 0)).is_ok());
        assert!(version_compatible((major, minor + 3, 7)).is_ok(), "newer minor versions only add");
        let e = version_compatible((major + 1, 0, 0)).unwrap_err();
        assert_eq!(e.code, Status::NotSupported);
        assert!(e.message.contains(&format!("{}.0.0", major + 1)), "{}", e.message);
        if minor > 0 {
            assert!(version_compatible((major, minor - 1, 0)).is_err(), "older minor: our struct sizes are refused");
        }
        // The loaded library passes (the tests link the one they were built against).
        check_version().unwrap();
    }

    #[test]
    fn status_round_trips_through_raw_codes() {
        for raw in 0..=11u32 {
            let s = Status::from_raw(raw);
            assert!(!matches!(s, Status::Unknown(_)), "code {raw} must be known");
            assert_eq!(s.to_raw(), raw);
        }
        assert_eq!(Status::from_raw(99), Status::Unknown(99));
        assert_eq!(Status::NoFreeBlocks.name(), "KVP_ERR_NO_FREE_BLOCKS");
        assert_eq!(Status::Unknown(99).name(), "KVP_UNKNOWN_STATUS");
    }
}
