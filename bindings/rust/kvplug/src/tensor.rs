//! Host tensors for the calls that take DLTensors: a borrowed slice plus a shape, checked to hold
//! exactly the shape's elements. Each call builds the DLTensor on the stack (compact row-major, so
//! `strides` is NULL) pointing into the slice and into the shape array kept here; the C side never
//! keeps it past the call (except `KvCache::from_tensors`, whose borrow outlives the cache).
//!
//! f16 and bf16 data are `u16` bit patterns with a dtype tag; this crate does no conversions.
use std::ffi::c_void;
use std::marker::PhantomData;

use kvplug_sys as sys;

use crate::error::{Error, Result};

/// The most dimensions a kvplug tensor has (the 5-d paged layer layouts).
pub const MAX_NDIM: usize = 5;

/// Element type of a tensor crossing the ABI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    /// IEEE half precision, as `u16` bits.
    F16,
    /// bfloat16, as `u16` bits.
    BF16,
    /// Signed 64-bit integers (slot mappings).
    I64,
}

impl DType {
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I64 => 8,
        }
    }

    pub(crate) fn dl(self) -> sys::DLDataType {
        let (code, bits) = match self {
            DType::F32 => (sys::kDLFloat, 32),
            DType::F16 => (sys::kDLFloat, 16),
            DType::BF16 => (sys::kDLBfloat, 16),
            DType::I64 => (sys::kDLInt, 64),
        };
        sys::DLDataType { code: code as u8, bits, lanes: 1 }
    }
}

/// Checks `shape` against a slice of `len` elements; returns it padded into a fixed array.
fn checked_shape(what: &str, shape: &[usize], len: usize) -> Result<[i64; MAX_NDIM]> {
    if shape.len() > MAX_NDIM {
        return Err(Error::invalid(format!("{what}: {} dimensions, at most {MAX_NDIM}", shape.len())));
    }
    let mut out = [0i64; MAX_NDIM];
    let mut numel: usize = 1;
    for (i, &d) in shape.iter().enumerate() {
        out[i] = i64::try_from(d).map_err(|_| Error::invalid(format!("{what}: shape[{i}]={d} too large")))?;
        numel = numel.checked_mul(d).ok_or_else(|| Error::invalid(format!("{what}: shape {shape:?} overflows")))?;
    }
    // The library reads (or writes) exactly numel elements of a compact tensor: the slice must hold
    // them all, or the C side would run past it.
    if numel != len {
        return Err(Error::invalid(format!("{what}: shape {shape:?} holds {numel} elements but the slice has {len}")));
    }
    Ok(out)
}

/// A read-only host tensor borrowed from a slice.
#[derive(Clone, Copy, Debug)]
pub struct TensorRef<'a> {
    data: *const c_void,
    dtype: DType,
    ndim: usize,
    shape: [i64; MAX_NDIM],
    _borrow: PhantomData<&'a [u8]>,
}

// SAFETY: a TensorRef is a shared borrow of plain numbers (f32/u16/i64 slices are Send and Sync);
// the raw pointer only erases the element type.
unsafe impl Send for TensorRef<'_> {}
// SAFETY: as above; it gives only read access.
unsafe impl Sync for TensorRef<'_> {}

impl<'a> TensorRef<'a> {
    pub fn f32(data: &'a [f32], shape: &[usize]) -> Result<Self> {
        Self::new(data.as_ptr().cast(), data.len(), DType::F32, shape, "TensorRef::f32")
    }

    /// f16 bits.
    pub fn f16(data: &'a [u16], shape: &[usize]) -> Result<Self> {
        Self::new(data.as_ptr().cast(), data.len(), DType::F16, shape, "TensorRef::f16")
    }

    /// bf16 bits.
    pub fn bf16(data: &'a [u16], shape: &[usize]) -> Result<Self> {
        Self::new(data.as_ptr().cast(), data.len(), DType::BF16, shape, "TensorRef::bf16")
    }

    /// 16-bit data tagged `dtype` (F16 or BF16).
    pub fn from_u16(data: &'a [u16], dtype: DType, shape: &[usize]) -> Result<Self> {
        match dtype {
            DType::F16 | DType::BF16 => {
                Self::new(data.as_ptr().cast(), data.len(), dtype, shape, "TensorRef::from_u16")
            }
            _ => Err(Error::invalid(format!("TensorRef::from_u16: dtype {dtype:?} is not F16 or BF16"))),
        }
    }

    pub fn i64(data: &'a [i64], shape: &[usize]) -> Result<Self> {
        Self::new(data.as_ptr().cast(), data.len(), DType::I64, shape, "TensorRef::i64")
    }

    fn new(data: *const c_void, len: usize, dtype: DType, shape: &[usize], what: &str) -> Result<Self> {
        let shape_arr = checked_shape(what, shape, len)?;
        Ok(TensorRef { data, dtype, ndim: shape.len(), shape: shape_arr, _borrow: PhantomData })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[i64] {
        &self.shape[..self.ndim]
    }

    /// The DLTensor of this borrow. Its `shape` points into `self`: use it while `self` is borrowed.
    pub(crate) fn dl(&self) -> sys::DLTensor {
        sys::DLTensor {
            data: self.data as *mut c_void,
            device: sys::DLDevice { device_type: sys::kDLCPU, device_id: 0 },
            ndim: self.ndim as i32,
            dtype: self.dtype.dl(),
            shape: self.shape.as_ptr() as *mut i64,
            strides: std::ptr::null_mut(),
            byte_offset: 0,
        }
    }
}

/// A writable host tensor borrowed from a slice.
#[derive(Debug)]
pub struct TensorMut<'a> {
    data: *mut c_void,
    dtype: DType,
    ndim: usize,
    shape: [i64; MAX_NDIM],
    _borrow: PhantomData<&'a mut [u8]>,
}

// SAFETY: a TensorMut is an exclusive borrow of plain numbers, like `&mut [f32]` (Send and Sync).
unsafe impl Send for TensorMut<'_> {}
// SAFETY: shared access to a TensorMut gives only read access to the data (`as_ref`), as `&&mut [T]`
// does; writes need `&mut TensorMut`.
unsafe impl Sync for TensorMut<'_> {}

impl<'a> TensorMut<'a> {
    pub fn f32(data: &'a mut [f32], shape: &[usize]) -> Result<Self> {
        Self::new(data.as_mut_ptr().cast(), data.len(), DType::F32, shape, "TensorMut::f32")
    }

    pub fn f16(data: &'a mut [u16], shape: &[usize]) -> Result<Self> {
        Self::new(data.as_mut_ptr().cast(), data.len(), DType::F16, shape, "TensorMut::f16")
    }

    pub fn bf16(data: &'a mut [u16], shape: &[usize]) -> Result<Self> {
        Self::new(data.as_mut_ptr().cast(), data.len(), DType::BF16, shape, "TensorMut::bf16")
    }

    pub fn from_u16(data: &'a mut [u16], dtype: DType, shape: &[usize]) -> Result<Self> {
        match dtype {
            DType::F16 | DType::BF16 => {
                Self::new(data.as_mut_ptr().cast(), data.len(), dtype, shape, "TensorMut::from_u16")
            }
            _ => Err(Error::invalid(format!("TensorMut::from_u16: dtype {dtype:?} is not F16 or BF16"))),
        }
    }

    pub fn i64(data: &'a mut [i64], shape: &[usize]) -> Result<Self> {
        Self::new(data.as_mut_ptr().cast(), data.len(), DType::I64, shape, "TensorMut::i64")
    }

    fn new(data: *mut c_void, len: usize, dtype: DType, shape: &[usize], what: &str) -> Result<Self> {
        let shape_arr = checked_shape(what, shape, len)?;
        Ok(TensorMut { data, dtype, ndim: shape.len(), shape: shape_arr, _borrow: PhantomData })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[i64] {
        &self.shape[..self.ndim]
    }

    /// A read-only view of the same data, for as long as this borrow of `self` lasts.
    pub fn as_ref(&self) -> TensorRef<'_> {
        TensorRef { data: self.data, dtype: self.dtype, ndim: self.ndim, shape: self.shape, _borrow: PhantomData }
    }

    /// The DLTensor of this borrow (writable through `data`); taken by `&mut self` so no other
    /// access to the slice exists while the C side writes.
    pub(crate) fn dl_mut(&mut self) -> sys::DLTensor {
        sys::DLTensor {
            data: self.data,
            device: sys::DLDevice { device_type: sys::kDLCPU, device_id: 0 },
            ndim: self.ndim as i32,
            dtype: self.dtype.dl(),
            shape: self.shape.as_mut_ptr(),
            strides: std::ptr::null_mut(),
            byte_offset: 0,
        }
    }
}
