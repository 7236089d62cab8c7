//! Attention backends.
use std::ffi::{c_void, CString};
use std::marker::PhantomData;
use std::ptr::{self, NonNull};

use kvplug_sys as sys;

use crate::context::Context;
use crate::error::{check, Error, Result};
use crate::kv_cache::{KvCache, KvDtype};
use crate::plan::Plan;
use crate::tensor::{TensorMut, TensorRef};

/// A backend config: a FlatBuffers `kvplug.AttentionConfig` as JSON text or verified binary (see
/// abi/schema/kvplug_config.fbs), or the backend's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Config<'a> {
    Default,
    /// e.g. `{"backend_config_type": "DenseConfig", "backend_config": {"window_left": 128}}`.
    Json(&'a str),
    /// A finished FlatBuffer with the "KVPC" file identifier. A slice that is not 8-byte aligned is
    /// copied to an aligned buffer for the call.
    Binary(&'a [u8]),
}

/// A config as the C call takes it: format, pointer, size. Holds an aligned copy of a binary
/// config that is not 8-byte aligned: FlatBuffers reads scalars in place and its verifier checks
/// alignment relative to the buffer start only, so the buffer itself must be aligned as a builder
/// leaves it (a `&[u8]` need not be).
struct RawConfig<'a> {
    format: i32,
    data: *const c_void,
    size: usize,
    _aligned: Option<Vec<u64>>,
    _borrow: PhantomData<&'a [u8]>,
}

impl<'a> Config<'a> {
    fn raw(&self) -> RawConfig<'a> {
        let (format, data, size, aligned) = match *self {
            Config::Default => (sys::KVP_CONFIG_NONE, ptr::null(), 0, None),
            // JSON need not be NUL-terminated: config_size bytes are read (header).
            Config::Json(s) => (sys::KVP_CONFIG_JSON, s.as_ptr().cast(), s.len(), None),
            Config::Binary(b) if b.as_ptr() as usize % 8 == 0 => {
                (sys::KVP_CONFIG_BINARY, b.as_ptr().cast(), b.len(), None)
            }
            Config::Binary(b) => {
                let mut words = vec![0u64; b.len().div_ceil(8)];
                // SAFETY: `words` has at least b.len() bytes; the regions do not overlap.
                unsafe { ptr::copy_nonoverlapping(b.as_ptr(), words.as_mut_ptr().cast::<u8>(), b.len()) };
                let p = words.as_ptr().cast::<c_void>(); // stays put when the Vec moves below
                (sys::KVP_CONFIG_BINARY, p, b.len(), Some(words))
            }
        };
        RawConfig { format: format as i32, data, size, _aligned: aligned, _borrow: PhantomData }
    }
}

pub(crate) fn c_name(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::invalid(format!("{what}: {s:?} contains a NUL byte")))
}

/// Checks a config for `backend` without creating anything.
pub fn config_check(backend: &str, config: &Config<'_>) -> Result<()> {
    let name = c_name("config_check: backend", backend)?;
    let c = config.raw();
    // SAFETY: NUL-terminated name; `c.data` points to `c.size` readable bytes (or is NULL with NONE)
    // and `c` lives across the call.
    check(unsafe { sys::kvp_config_check(name.as_ptr(), c.format, c.data, c.size) })
}

/// `kvp_attention_options`.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionOptions<'a> {
    /// e.g. "dense".
    pub backend: &'a str,
    /// > 0, a multiple of num_kv_heads.
    pub num_q_heads: i32,
    pub num_kv_heads: i32,
    /// A size listed by `backend_info`.
    pub head_size: i32,
    /// The dtype of the caches it will read.
    pub kv_dtype: KvDtype,
    /// Softmax scale; 0 = 1/sqrt(head_size).
    pub sm_scale: f32,
    pub config: Config<'a>,
}

impl<'a> AttentionOptions<'a> {
    /// Default scale and config.
    pub fn new(backend: &'a str, num_q_heads: i32, num_kv_heads: i32, head_size: i32, kv_dtype: KvDtype) -> Self {
        AttentionOptions {
            backend,
            num_q_heads,
            num_kv_heads,
            head_size,
            kv_dtype,
            sm_scale: 0.0,
            config: Config::Default,
        }
    }

    pub fn with_config(mut self, config: Config<'a>) -> Self {
        self.config = config;
        self
    }

    pub fn with_sm_scale(mut self, sm_scale: f32) -> Self {
        self.sm_scale = sm_scale;
        self
    }
}

/// An attention backend instance (`kvp_attention`), destroyed on drop; cannot outlive its context.
#[derive(Debug)]
pub struct Attention<'ctx> {
    raw: NonNull<sys::kvp_attention>,
    _context: PhantomData<&'ctx Context>,
}

// SAFETY (Send): no thread affinity; refers only to its (Sync) context.
unsafe impl Send for Attention<'_> {}
// SAFETY (Sync): the header says "an attention handle is immutable after creation; runs on one
// handle from several threads are safe if they write to different outputs". Every method takes
// `&self`, and `run` takes its output as `&mut TensorMut`, so two concurrent runs cannot share one.
// write_kv writes the cache, which it takes as `&mut KvCache`.
unsafe impl Sync for Attention<'_> {}

impl<'ctx> Attention<'ctx> {
    pub fn new(context: &'ctx Context, options: &AttentionOptions<'_>) -> Result<Attention<'ctx>> {
        let backend = c_name("Attention::new: backend", options.backend)?;
        let config = options.config.raw();
        let mut o: sys::kvp_attention_options = sys::Zeroed::zeroed();
        o.struct_size = std::mem::size_of::<sys::kvp_attention_options>();
        o.backend = backend.as_ptr();
        o.num_q_heads = options.num_q_heads;
        o.num_kv_heads = options.num_kv_heads;
        o.head_size = options.head_size;
        o.kv_dtype = options.kv_dtype.to_raw() as i32;
        o.sm_scale = options.sm_scale;
        o.config_format = config.format;
        o.config = config.data;
        o.config_size = config.size;
        let mut raw = ptr::null_mut();
        // SAFETY: live context; `backend` and the config bytes outlive the call (the library parses
        // the config during creation and keeps neither); valid out pointer.
        check(unsafe { sys::kvp_attention_create(context.as_raw(), &o, &mut raw) })?;
        Ok(Attention {
            raw: NonNull::new(raw).expect("kvp_attention_create returned OK and NULL"),
            _context: PhantomData,
        })
    }

    /// Writes this step's new keys/values (`[num_tokens, num_kv_heads, head_size]`) of `layer`
    /// through the backend, at the plan's slot mapping.
    pub fn write_kv(
        &self,
        plan: &Plan<'_>,
        cache: &mut KvCache<'_>,
        layer: i32,
        key: &TensorRef<'_>,
        value: &TensorRef<'_>,
    ) -> Result<()> {
        let (k, v) = (key.dl(), value.dl());
        // SAFETY: tensors exactly cover their borrowed slices; exclusive access to the cache; the
        // plan is only read.
        check(unsafe {
            sys::kvp_attention_write_kv(self.raw.as_ptr(), plan.raw_const(), cache.raw_mut(), layer, &k, &v)
        })
    }

    /// Causal attention of this step's queries (`[num_tokens, num_q_heads, head_size]`) over `layer`
    /// of `cache` into `out` (same shape and dtype); `lse` (`[num_tokens, num_q_heads]` f32), if
    /// given, receives the natural log-sum-exp of the scaled logits.
    pub fn run(
        &self,
        plan: &Plan<'_>,
        cache: &KvCache<'_>,
        layer: i32,
        query: &TensorRef<'_>,
        out: &mut TensorMut<'_>,
        lse: Option<&mut TensorMut<'_>>,
    ) -> Result<()> {
        let q = query.dl();
        let mut o = out.dl_mut();
        let mut l = lse.map(|t| t.dl_mut());
        let l_ptr = l.as_mut().map_or(ptr::null_mut(), |t| t as *mut sys::DLTensor);
        // SAFETY: tensors exactly cover their slices; `out` and `lse` are exclusive borrows (the
        // library writes only within their checked shapes); cache and plan are only read, which the
        // header allows concurrently with other runs.
        check(unsafe {
            sys::kvp_attention_run(self.raw.as_ptr(), plan.raw_const(), cache.raw_const(), layer, &q, &mut o, l_ptr)
        })
    }

    /// The raw handle, for interop with C code. It stays owned by `self`.
    pub fn as_raw(&self) -> *const sys::kvp_attention {
        self.raw.as_ptr()
    }
}

impl Drop for Attention<'_> {
    fn drop(&mut self) {
        // SAFETY: created by kvp_attention_create, destroyed once.
        unsafe { sys::kvp_attention_destroy(self.raw.as_ptr()) }
    }
}
