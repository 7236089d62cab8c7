//! The paged KV cache: pages per layer on the context's device, host swap pages, state slots.
use std::ffi::c_void;
use std::marker::PhantomData;
use std::ptr::{self, NonNull};

use kvplug_sys as sys;

use crate::block_manager::BlockCopy;
use crate::context::{Context, DeviceType};
use crate::error::{check, to_i32, Error, Result, Status};
use crate::tensor::{TensorMut, TensorRef};

/// Storage types of the cache (`kvp_dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvDtype {
    F32,
    F16,
    BF16,
    /// Reserved for GPU caches with scales.
    Fp8E4m3,
}

impl KvDtype {
    pub fn to_raw(self) -> sys::kvp_dtype {
        match self {
            KvDtype::F32 => sys::KVP_DTYPE_FLOAT32,
            KvDtype::F16 => sys::KVP_DTYPE_FLOAT16,
            KvDtype::BF16 => sys::KVP_DTYPE_BFLOAT16,
            KvDtype::Fp8E4m3 => sys::KVP_DTYPE_FP8_E4M3,
        }
    }

    pub fn size_bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 | KvDtype::BF16 => 2,
            KvDtype::Fp8E4m3 => 1,
        }
    }
}

/// Layouts of one layer (`kvp_kv_layout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvLayout {
    /// `[2, num_blocks, block_size, num_kv_heads, head_size]` (vLLM).
    KvFirst,
    /// `[num_blocks, 2, block_size, num_kv_heads, head_size]` (FlashInfer).
    BlockFirst,
}

/// `kvp_kv_cache_options`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvCacheOptions {
    pub num_layers: i32,
    pub num_blocks: i32,
    pub block_size: i32,
    pub num_kv_heads: i32,
    pub head_size: i32,
    pub dtype: KvDtype,
    pub layout: KvLayout,
    pub num_host_blocks: i32,
    pub num_state_slots: i32,
    pub state_bytes_per_layer: i64,
}

impl KvCacheOptions {
    /// KV_FIRST layout, no host blocks, no state slots.
    pub fn new(
        num_layers: i32,
        num_blocks: i32,
        block_size: i32,
        num_kv_heads: i32,
        head_size: i32,
        dtype: KvDtype,
    ) -> Self {
        KvCacheOptions {
            num_layers,
            num_blocks,
            block_size,
            num_kv_heads,
            head_size,
            dtype,
            layout: KvLayout::KvFirst,
            num_host_blocks: 0,
            num_state_slots: 0,
            state_bytes_per_layer: 0,
        }
    }

    /// The 5-d shape of one layer's device pages in this layout (for `from_tensors`).
    pub fn layer_shape(&self) -> [usize; 5] {
        let (b, s, h, d) =
            (self.num_blocks as usize, self.block_size as usize, self.num_kv_heads as usize, self.head_size as usize);
        match self.layout {
            KvLayout::KvFirst => [2, b, s, h, d],
            KvLayout::BlockFirst => [b, 2, s, h, d],
        }
    }

    fn to_raw(&self) -> sys::kvp_kv_cache_options {
        let mut o: sys::kvp_kv_cache_options = sys::Zeroed::zeroed();
        o.struct_size = std::mem::size_of::<sys::kvp_kv_cache_options>();
        o.num_layers = self.num_layers;
        o.num_blocks = self.num_blocks;
        o.block_size = self.block_size;
        o.num_kv_heads = self.num_kv_heads;
        o.head_size = self.head_size;
        o.dtype = self.dtype.to_raw() as i32;
        o.layout = match self.layout {
            KvLayout::KvFirst => sys::KVP_LAYOUT_KV_FIRST,
            KvLayout::BlockFirst => sys::KVP_LAYOUT_BLOCK_FIRST,
        } as i32;
        o.num_host_blocks = self.num_host_blocks;
        o.num_state_slots = self.num_state_slots;
        o.state_bytes_per_layer = self.state_bytes_per_layer;
        o
    }
}

/// A KV cache (`kvp_kv_cache`), destroyed on drop. `'a` is the context it lives on and, for a cache
/// over caller tensors, the borrow of those tensors: the cache can outlive neither.
///
/// Writes (`write`, `copy_blocks`, swaps, state access, [`Attention::write_kv`](crate::Attention::write_kv))
/// take `&mut self`; attention runs and `layer_view` take `&self`.
#[derive(Debug)]
pub struct KvCache<'a> {
    raw: NonNull<sys::kvp_kv_cache>,
    options: KvCacheOptions,
    device: DeviceType,
    _context: PhantomData<&'a Context>,
    _storage: PhantomData<&'a mut [u8]>,
}

// SAFETY (Send): the cache refers to its context (Sync, borrowed for 'a) and to its pages (owned by
// kvplug, or caller memory exclusively borrowed for 'a); nothing is thread-bound.
unsafe impl Send for KvCache<'_> {}
// SAFETY (Sync): the header says "not thread-safe for writes; concurrent kvp_attention_run calls
// reading the same cache are safe as long as no write, copy or swap on it runs at the same time".
// Every write, copy, swap and state access takes `&mut self`; only reads (runs, layer views) are
// reachable through `&self`.
unsafe impl Sync for KvCache<'_> {}

impl<'a> KvCache<'a> {
    /// A cache whose pages kvplug allocates (zero-filled) on the context's device.
    pub fn new(context: &'a Context, options: &KvCacheOptions) -> Result<KvCache<'a>> {
        let o = options.to_raw();
        let mut raw = ptr::null_mut();
        // SAFETY: live context, complete options, valid out pointer.
        check(unsafe { sys::kvp_kv_cache_create(context.as_raw(), &o, &mut raw) })?;
        Ok(Self::wrap(raw, options, context))
    }

    /// A cache over the caller's tensors (zero copy), one per layer, each of
    /// `options.layer_shape()` with the options' dtype. They stay borrowed until the cache is
    /// dropped; kvplug reads and writes them through the cache.
    pub fn from_tensors(
        context: &'a Context,
        options: &KvCacheOptions,
        mut layers: Vec<TensorMut<'a>>,
    ) -> Result<KvCache<'a>> {
        let o = options.to_raw();
        let n = to_i32(layers.len(), "layers.len()")?;
        // Each DLTensor points into its TensorMut's shape array, which `layers` keeps in place for
        // the call; the library copies shapes and strides and keeps only the data pointers, whose
        // borrows (lifetime 'a) the returned cache carries.
        let dl: Vec<sys::DLTensor> = layers.iter_mut().map(|t| t.dl_mut()).collect();
        let mut raw = ptr::null_mut();
        // SAFETY: `dl` holds `n` tensors, each compact and exactly covering its slice (TensorMut
        // checks), so the library's accesses within the checked shape stay inside the slices.
        check(unsafe { sys::kvp_kv_cache_create_from_tensors(context.as_raw(), &o, dl.as_ptr(), n, &mut raw) })?;
        drop(dl);
        drop(layers);
        Ok(Self::wrap(raw, options, context))
    }

    fn wrap(raw: *mut sys::kvp_kv_cache, options: &KvCacheOptions, context: &Context) -> KvCache<'a> {
        KvCache {
            raw: NonNull::new(raw).expect("kvp_kv_cache_create returned OK and NULL"),
            options: options.clone(),
            device: context.device(),
            _context: PhantomData,
            _storage: PhantomData,
        }
    }

    pub fn options(&self) -> &KvCacheOptions {
        &self.options
    }

    fn host_only(&self, what: &str) -> Result<()> {
        if self.device == DeviceType::Cpu {
            Ok(())
        } else {
            Err(Error::binding(
                Status::NotSupported,
                format!("KvCache::{what}: the cache is on {:?}; host slices need a CPU cache", self.device),
            ))
        }
    }

    /// A view of layer `layer`'s device pages (`host == false`) or host swap pages.
    pub fn layer_view(&self, layer: i32, host: bool) -> Result<LayerView<'_>> {
        let mut t: sys::DLTensor = sys::Zeroed::zeroed();
        // SAFETY: valid out pointer; the view's shape/strides stay valid until the cache is
        // destroyed, and LayerView borrows the cache.
        check(unsafe { sys::kvp_kv_cache_layer_view(self.raw.as_ptr(), layer, host as i32, &mut t) })?;
        let mut shape = [0i64; 5];
        let mut strides = [0i64; 5];
        if t.ndim != 5 {
            return Err(Error::binding(Status::Internal, format!("layer view with ndim={}", t.ndim)));
        }
        for i in 0..5 {
            // SAFETY: ndim == 5 entries, valid while the cache lives (header).
            unsafe {
                shape[i] = *t.shape.add(i);
                strides[i] = if t.strides.is_null() { 0 } else { *t.strides.add(i) };
            }
        }
        if t.strides.is_null() {
            let mut compact = 1;
            for i in (0..5).rev() {
                strides[i] = compact;
                compact *= shape[i];
            }
        }
        Ok(LayerView {
            data: (t.data as *const u8).wrapping_add(t.byte_offset as usize).cast(),
            dtype: self.options.dtype,
            shape,
            strides,
            on_host: self.device == DeviceType::Cpu || host,
            _cache: PhantomData,
        })
    }

    /// Writes new keys and values (`[num_tokens, num_kv_heads, head_size]`) of `layer` to the slots
    /// in `slot_mapping` (one per token; -1 skips a token).
    pub fn write(
        &mut self,
        layer: i32,
        key: &TensorRef<'_>,
        value: &TensorRef<'_>,
        slot_mapping: &[i64],
    ) -> Result<()> {
        let slots = TensorRef::i64(slot_mapping, &[slot_mapping.len()])?;
        let (k, v, s) = (key.dl(), value.dl(), slots.dl());
        // SAFETY: each DLTensor exactly covers its borrowed slice (TensorRef checks) and its shape
        // lives in a TensorRef borrowed for the call; exclusive access to the cache (&mut self).
        check(unsafe { sys::kvp_kv_cache_write(self.raw.as_ptr(), layer, &k, &v, &s) })
    }

    /// Copies blocks src -> dst in every layer (copy-on-write plans).
    pub fn copy_blocks(&mut self, copies: &[BlockCopy]) -> Result<()> {
        let n = to_i32(copies.len(), "copies.len()")?;
        // SAFETY: `copies` holds n entries; exclusive access.
        check(unsafe { sys::kvp_kv_cache_copy_blocks(self.raw.as_ptr(), copies.as_ptr(), n) })
    }

    /// Performs a swap-out plan (device -> host blocks) in every layer.
    pub fn swap_out(&mut self, copies: &[BlockCopy]) -> Result<()> {
        let n = to_i32(copies.len(), "copies.len()")?;
        // SAFETY: as copy_blocks.
        check(unsafe { sys::kvp_kv_cache_swap_out(self.raw.as_ptr(), copies.as_ptr(), n) })
    }

    /// Performs a swap-in plan (host -> device blocks) in every layer.
    pub fn swap_in(&mut self, copies: &[BlockCopy]) -> Result<()> {
        let n = to_i32(copies.len(), "copies.len()")?;
        // SAFETY: as copy_blocks.
        check(unsafe { sys::kvp_kv_cache_swap_in(self.raw.as_ptr(), copies.as_ptr(), n) })
    }

    /// The bytes of state slot `slot` in `layer` (CPU caches).
    pub fn state(&mut self, layer: i32, slot: i32) -> Result<&mut [u8]> {
        self.host_only("state")?;
        let mut data: *mut c_void = ptr::null_mut();
        let mut n = 0i64;
        // SAFETY: valid out pointers.
        check(unsafe { sys::kvp_kv_cache_state(self.raw.as_ptr(), layer, slot, &mut data, &mut n) })?;
        if n == 0 || data.is_null() {
            return Ok(&mut []);
        }
        // SAFETY: the library returns `n` bytes of host memory (CPU cache, checked above) owned by the
        // cache; the slice borrows `self` mutably, so nothing else touches the cache meanwhile.
        Ok(unsafe { std::slice::from_raw_parts_mut(data.cast::<u8>(), n as usize) })
    }

    /// Copies state slot `src_slot` to `dst_slot` in every layer (after a fork).
    pub fn copy_state(&mut self, src_slot: i32, dst_slot: i32) -> Result<()> {
        // SAFETY: plain values; exclusive access.
        check(unsafe { sys::kvp_kv_cache_copy_state(self.raw.as_ptr(), src_slot, dst_slot) })
    }

    pub(crate) fn raw_const(&self) -> *const sys::kvp_kv_cache {
        self.raw.as_ptr()
    }

    pub(crate) fn raw_mut(&mut self) -> *mut sys::kvp_kv_cache {
        self.raw.as_ptr()
    }

    /// The raw handle, for interop with C code. It stays owned by `self`.
    pub fn as_raw(&self) -> *const sys::kvp_kv_cache {
        self.raw.as_ptr()
    }
}

impl Drop for KvCache<'_> {
    fn drop(&mut self) {
        // SAFETY: created by kvp_kv_cache_create(_from_tensors), destroyed once; the context and any
        // caller tensors are still alive (borrowed for 'a).
        unsafe { sys::kvp_kv_cache_destroy(self.raw.as_ptr()) }
    }
}

/// A read-only view of one layer's pages, borrowed from the cache.
#[derive(Debug)]
pub struct LayerView<'c> {
    data: *const c_void,
    dtype: KvDtype,
    shape: [i64; 5],
    strides: [i64; 5],
    on_host: bool,
    _cache: PhantomData<&'c [u8]>,
}

impl<'c> LayerView<'c> {
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    pub fn shape(&self) -> [i64; 5] {
        self.shape
    }

    /// Strides in elements.
    pub fn strides(&self) -> [i64; 5] {
        self.strides
    }

    /// The element offset of `index` into the slice accessors' data, or None out of bounds.
    pub fn offset(&self, index: [usize; 5]) -> Option<usize> {
        let mut off = 0usize;
        for ((&i, &n), &stride) in index.iter().zip(&self.shape).zip(&self.strides) {
            if i as i64 >= n {
                return None;
            }
            off += i * stride as usize;
        }
        Some(off)
    }

    /// Elements spanned by the view (0 if any dimension is empty).
    fn extent(&self) -> usize {
        if self.shape.iter().any(|&d| d <= 0) {
            return 0;
        }
        1 + (0..5).map(|i| (self.shape[i] - 1) as usize * self.strides[i] as usize).sum::<usize>()
    }

    fn slice<T>(&self, want: &[KvDtype]) -> Result<&'c [T]> {
        if !want.contains(&self.dtype) {
            return Err(Error::invalid(format!("LayerView: the cache dtype is {:?}, not {want:?}", self.dtype)));
        }
        if !self.on_host {
            return Err(Error::binding(Status::NotSupported, "LayerView: device pages are not host memory"));
        }
        let n = self.extent();
        if n == 0 || self.data.is_null() {
            return Ok(&[]);
        }
        // SAFETY: host memory of the cache (zero-filled at creation or the caller's initialized
        // slice), spanning `extent` elements of this dtype per the library's own shape and strides,
        // aligned (kvplug allocates it, or it came from a slice of this element type). It is only
        // written through `&mut KvCache`, which cannot coexist with this view's `&KvCache` borrow.
        Ok(unsafe { std::slice::from_raw_parts(self.data.cast::<T>(), n) })
    }

    /// The pages of an F32 cache.
    pub fn as_f32(&self) -> Result<&'c [f32]> {
        self.slice(&[KvDtype::F32])
    }

    /// The pages of an F16 or BF16 cache, as bits.
    pub fn as_u16(&self) -> Result<&'c [u16]> {
        self.slice(&[KvDtype::F16, KvDtype::BF16])
    }

    /// The pages of an FP8 cache, as bytes.
    pub fn as_u8(&self) -> Result<&'c [u8]> {
        self.slice(&[KvDtype::Fp8E4m3])
    }
}
