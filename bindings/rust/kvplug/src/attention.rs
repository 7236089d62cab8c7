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

/// The outputs of [`Attention::run_with`] (`kvp_attention_outputs`). Each is a separate exclusive
/// borrow, so none can overlap another or the query (the library checks that too).
#[derive(Debug)]
pub struct AttentionOutputs<'a> {
    /// `[num_tokens, num_q_heads, head_size]`, the query's dtype.
    pub out: TensorMut<'a>,
    /// `[num_tokens, num_q_heads]` f32: the natural log-sum-exp of the scaled logits (-inf for a row
    /// that saw no key). Needs `supports_lse`.
    pub lse: Option<TensorMut<'a>>,
    /// `[num_tokens, num_q_heads]` f32: each row's attention entropy in nats, `-sum_j a_j ln a_j`.
    /// Needs `supports_entropy` (see [`crate::backend_device_info`]).
    pub entropy: Option<TensorMut<'a>>,
    /// Since ABI 0.4: `[num_q_heads, ENTROPY_SUMMARY_FIELDS]` f32, contiguous: the per-head summary
    /// of this run's row entropies (read it with [`HeadEntropy::from_summary`]). Needs
    /// `supports_entropy`; computed on the run's device whether or not `entropy` is given.
    pub entropy_summary: Option<TensorMut<'a>>,
}

impl<'a> AttentionOutputs<'a> {
    /// Only `out`.
    pub fn new(out: TensorMut<'a>) -> Self {
        AttentionOutputs { out, lse: None, entropy: None, entropy_summary: None }
    }

    pub fn with_lse(mut self, lse: TensorMut<'a>) -> Self {
        self.lse = Some(lse);
        self
    }

    pub fn with_entropy(mut self, entropy: TensorMut<'a>) -> Self {
        self.entropy = Some(entropy);
        self
    }

    /// Since ABI 0.4: see [`AttentionOutputs::entropy_summary`].
    pub fn with_entropy_summary(mut self, summary: TensorMut<'a>) -> Self {
        self.entropy_summary = Some(summary);
        self
    }
}

/// The number of f32 fields per head of an entropy summary (`kvp_attention_outputs.entropy_summary`
/// is `[num_q_heads, ENTROPY_SUMMARY_FIELDS]`).
pub const ENTROPY_SUMMARY_FIELDS: usize = 6;

/// One head's row of an entropy summary (ABI 0.4), over the rows of one run. `E_max = ln(keys)` of a
/// row; informative rows saw at least 2 keys (`E_max > 0`), and only they enter the normalised
/// mean and the bands of entropy-guided attention. Means are 0 over no rows.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HeadEntropy {
    /// Rows that saw at least one key.
    pub rows: u32,
    /// Their mean entropy, nats.
    pub mean_entropy: f32,
    /// Rows that saw at least two keys.
    pub informative_rows: u32,
    /// Their mean `H / E_max`, in [0, 1].
    pub mean_normalized_entropy: f32,
    /// Informative rows in the collapse band, `H <= E_max / 4`.
    pub collapse_rows: u32,
    /// Informative rows in the overload band, `H >= 3 E_max / 4`.
    pub overload_rows: u32,
}

impl HeadEntropy {
    /// The heads of a summary written by a run (`[num_q_heads * ENTROPY_SUMMARY_FIELDS]` f32, row
    /// major). A trailing partial row is ignored. Counts are exact in f32 up to 2^24 rows.
    pub fn from_summary(summary: &[f32]) -> Vec<HeadEntropy> {
        summary
            .chunks_exact(ENTROPY_SUMMARY_FIELDS)
            .map(|s| HeadEntropy {
                rows: s[0] as u32,
                mean_entropy: s[1],
                informative_rows: s[2] as u32,
                mean_normalized_entropy: s[3],
                collapse_rows: s[4] as u32,
                overload_rows: s[5] as u32,
            })
            .collect()
    }
}

/// Since ABI 0.5: where a sequence's K/V rows live in its page list for one step
/// (`kvp_cache_layout`, from [`Attention::cache_layout`]). Token-stream backends: `seq_len` =
/// num_tokens, nothing compressed. attamba: `[compressed_pages][window_pages from token page
/// window_first_page]`; `seq_len` is the batch's `seq_lens` entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheLayout {
    pub seq_len: i32,
    pub num_pages: i32,
    pub compressed_rows: i32,
    pub compressed_pages: i32,
    pub stable_rows: i32,
    pub window_first_page: i32,
    pub window_pages: i32,
}

/// Since ABI 0.5: the tensors of [`Attention::ssm`] (`kvp_ssm_args`), f32 on the cache's device.
/// `input`: in_proj's output `[T, 2 d_inner + 2 G N + heads]`; `conv_weight` `[conv_dim,
/// conv_width]`; `a_log` `[heads]`; optional `conv_bias` `[conv_dim]`, `dt_bias` and `d_skip`
/// `[heads]`, `norm_weight` `[d_inner]`; `out` `[T, d_inner]`. `which`: attamba's key SSM (0) or
/// value SSM (1).
#[derive(Debug)]
pub struct SsmArgs<'a> {
    pub which: i32,
    pub input: TensorRef<'a>,
    pub conv_weight: TensorRef<'a>,
    pub conv_bias: Option<TensorRef<'a>>,
    pub dt_bias: Option<TensorRef<'a>>,
    pub a_log: TensorRef<'a>,
    pub d_skip: Option<TensorRef<'a>>,
    pub norm_weight: Option<TensorRef<'a>>,
    pub out: TensorMut<'a>,
}

impl<'a> SsmArgs<'a> {
    /// The required tensors; the optional ones absent, `which` 0.
    pub fn new(input: TensorRef<'a>, conv_weight: TensorRef<'a>, a_log: TensorRef<'a>, out: TensorMut<'a>) -> Self {
        SsmArgs {
            which: 0,
            input,
            conv_weight,
            conv_bias: None,
            dt_bias: None,
            a_log,
            d_skip: None,
            norm_weight: None,
            out,
        }
    }
}

/// A null pointer for `None`, else a pointer to the DLTensor (which must outlive the call).
fn opt_ref(t: &Option<sys::DLTensor>) -> *const sys::DLTensor {
    t.as_ref().map_or(ptr::null(), |t| t as *const sys::DLTensor)
}

/// A null pointer for `None`, else a pointer to the DLTensor (which must outlive the call).
fn opt_mut(t: &mut Option<sys::DLTensor>) -> *mut sys::DLTensor {
    t.as_mut().map_or(ptr::null_mut(), |t| t as *mut sys::DLTensor)
}

/// Merges `S` partial attention states of the same queries over disjoint key sets into one
/// (`kvp_attention_merge_states`): `partial_out` `[S, T, H, D]` (f32/f16/bf16) and `partial_lse`
/// `[S, T, H]` f32 (natural log; -inf marks an empty partial, which weighs 0) into `out` `[T, H, D]`
/// and, if given, `lse` `[T, H]`. `entropy` `[T, H]` needs `partial_entropy` `[S, T, H]`. All f32
/// except the outs. Runs on the context's threads (CPU) or stream (CUDA).
pub fn merge_states(
    context: &Context,
    partial_out: &TensorRef<'_>,
    partial_lse: &TensorRef<'_>,
    out: &mut TensorMut<'_>,
    lse: Option<&mut TensorMut<'_>>,
    partial_entropy: Option<&TensorRef<'_>>,
    entropy: Option<&mut TensorMut<'_>>,
) -> Result<()> {
    let (po, pl) = (partial_out.dl(), partial_lse.dl());
    let pe = partial_entropy.map(TensorRef::dl);
    let mut o = out.dl_mut();
    let mut l = lse.map(|t| t.dl_mut());
    let mut e = entropy.map(|t| t.dl_mut());
    let mut a: sys::kvp_merge_states_args = sys::Zeroed::zeroed();
    a.struct_size = std::mem::size_of::<sys::kvp_merge_states_args>();
    a.partial_out = &po;
    a.partial_lse = &pl;
    a.partial_entropy = pe.as_ref().map_or(ptr::null(), |t| t as *const sys::DLTensor);
    a.out = &mut o;
    a.lse = opt_mut(&mut l);
    a.entropy = opt_mut(&mut e);
    // SAFETY: every tensor exactly covers its borrowed slice and the library checks their shapes
    // against each other before touching data; the outputs are exclusive borrows, so they overlap
    // neither each other nor the inputs; all DLTensors outlive the call.
    check(unsafe { sys::kvp_attention_merge_states(context.as_raw(), &a) })
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
// `&self`, and `run`/`run_with` take their outputs as `&mut`, so two concurrent runs cannot share one.
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

    /// As [`Attention::run`] with the outputs in one struct (`kvp_attention_run_v2`), which also
    /// offers the per-row entropy and (ABI 0.4) the per-head entropy summary.
    /// `Status::NotSupported` for an output the backend does not write.
    pub fn run_with(
        &self,
        plan: &Plan<'_>,
        cache: &KvCache<'_>,
        layer: i32,
        query: &TensorRef<'_>,
        outputs: &mut AttentionOutputs<'_>,
    ) -> Result<()> {
        let q = query.dl();
        let mut o = outputs.out.dl_mut();
        let mut l = outputs.lse.as_mut().map(TensorMut::dl_mut);
        let mut e = outputs.entropy.as_mut().map(TensorMut::dl_mut);
        let mut s = outputs.entropy_summary.as_mut().map(TensorMut::dl_mut);
        let mut raw: sys::kvp_attention_outputs = sys::Zeroed::zeroed();
        raw.struct_size = std::mem::size_of::<sys::kvp_attention_outputs>();
        raw.out = &mut o;
        raw.lse = opt_mut(&mut l);
        raw.entropy = opt_mut(&mut e);
        raw.entropy_summary = opt_mut(&mut s);
        // SAFETY: as in `run`: tensors exactly cover their slices, the outputs are exclusive borrows
        // held by `outputs` for the call, the DLTensors outlive it; cache and plan are only read.
        check(unsafe {
            sys::kvp_attention_run_v2(self.raw.as_ptr(), plan.raw_const(), cache.raw_const(), layer, &q, &raw)
        })
    }

    /// Bytes of per-sequence state per layer this backend keeps in a cache's state slots (0 for
    /// stateless backends such as dense): the least `KvCacheOptions::state_bytes_per_layer` for it.
    pub fn state_bytes(&self) -> Result<i64> {
        let mut n = 0i64;
        // SAFETY: live handle; valid out pointer.
        check(unsafe { sys::kvp_attention_state_bytes(self.raw.as_ptr(), &mut n) })?;
        Ok(n)
    }

    /// Since ABI 0.5: the page-list layout of a sequence of `num_tokens` tokens (after the step)
    /// for a step starting at position `query_pos_start` (`kvp_attention_cache_layout`).
    pub fn cache_layout(&self, block_size: i32, num_tokens: i32, query_pos_start: i32) -> Result<CacheLayout> {
        let mut l: sys::kvp_cache_layout = sys::Zeroed::zeroed();
        l.struct_size = std::mem::size_of::<sys::kvp_cache_layout>();
        // SAFETY: live handle; valid out pointer of the declared size.
        check(unsafe {
            sys::kvp_attention_cache_layout(self.raw.as_ptr(), block_size, num_tokens, query_pos_start, &mut l)
        })?;
        Ok(CacheLayout {
            seq_len: l.seq_len,
            num_pages: l.num_pages,
            compressed_rows: l.compressed_rows,
            compressed_pages: l.compressed_pages,
            stable_rows: l.stable_rows,
            window_first_page: l.window_first_page,
            window_pages: l.window_pages,
        })
    }

    /// Since ABI 0.5: the backend's sequence-state operator over the plan's tokens
    /// (`kvp_attention_ssm`; attamba: the chunk-local Mamba-2 block), its state in `cache`'s state
    /// slots (the plan's batch needs `state_slots` and `query_pos_starts`). Writes `args.out`.
    /// `Status::NotSupported` for backends without one.
    pub fn ssm(&self, plan: &Plan<'_>, cache: &mut KvCache<'_>, layer: i32, args: &mut SsmArgs<'_>) -> Result<()> {
        let (input, conv_weight, a_log) = (args.input.dl(), args.conv_weight.dl(), args.a_log.dl());
        let conv_bias = args.conv_bias.as_ref().map(TensorRef::dl);
        let dt_bias = args.dt_bias.as_ref().map(TensorRef::dl);
        let d_skip = args.d_skip.as_ref().map(TensorRef::dl);
        let norm_weight = args.norm_weight.as_ref().map(TensorRef::dl);
        let mut out = args.out.dl_mut();
        let mut a: sys::kvp_ssm_args = sys::Zeroed::zeroed();
        a.struct_size = std::mem::size_of::<sys::kvp_ssm_args>();
        a.which = args.which;
        a.r#in = &input;
        a.conv_weight = &conv_weight;
        a.conv_bias = opt_ref(&conv_bias);
        a.dt_bias = opt_ref(&dt_bias);
        a.a_log = &a_log;
        a.d_skip = opt_ref(&d_skip);
        a.norm_weight = opt_ref(&norm_weight);
        a.out = &mut out;
        // SAFETY: tensors exactly cover their borrowed slices and the library checks their shapes;
        // `out` is an exclusive borrow (so it overlaps no input); exclusive access to the cache,
        // whose state slots the call updates; the plan is only read; the DLTensors outlive the call.
        check(unsafe { sys::kvp_attention_ssm(self.raw.as_ptr(), plan.raw_const(), cache.raw_mut(), layer, &a) })
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
