package kvplug

/*
#include "kvplug_go.h"
*/
import "C"

import (
	"math"
	"unsafe"
)

// Tensor is a compact row-major CPU tensor over a Go slice, passed to the library as a DLTensor
// for the duration of one call (never kept). Build one with Float32Tensor or HalfTensor.
type Tensor struct {
	dtype DType
	shape []int64
	f32   []float32
	u16   []uint16
}

// Float32Tensor views data as a float32 tensor of the given shape; len(data) must be the
// product of shape (checked when the tensor is used).
func Float32Tensor(data []float32, shape ...int) Tensor {
	return Tensor{dtype: Float32, shape: toInt64(shape), f32: data}
}

// HalfTensor views data (raw 16-bit patterns) as a tensor of dtype Float16 or BFloat16.
// Convert with Float16FromFloat32 / BFloat16FromFloat32 and back.
func HalfTensor(data []uint16, dtype DType, shape ...int) Tensor {
	return Tensor{dtype: dtype, shape: toInt64(shape), u16: data}
}

func toInt64(s []int) []int64 {
	out := make([]int64, len(s))
	for i, v := range s {
		out[i] = int64(v)
	}
	return out
}

// DType is the element type.
func (t Tensor) DType() DType { return t.dtype }

// Shape returns a copy of the shape.
func (t Tensor) Shape() []int {
	out := make([]int, len(t.shape))
	for i, v := range t.shape {
		out[i] = int(v)
	}
	return out
}

// desc checks the tensor and returns its C description and data pointer. The checks are the ones
// C cannot make: it trusts the data pointer to span the shape, so a short slice would be read
// (or written) past its end.
func (t Tensor) desc(op, name string) (C.kvpg_desc, unsafe.Pointer, error) {
	var d C.kvpg_desc
	if len(t.shape) > 4 {
		return d, nil, invalid(op, "%s: ndim=%d; tensors have at most 4 dimensions", name, len(t.shape))
	}
	numel := int64(1)
	for i, n := range t.shape {
		if n < 0 || n > 1<<40 {
			return d, nil, invalid(op, "%s: shape[%d]=%d out of range", name, i, n)
		}
		numel *= n
		d.shape[i] = C.int64_t(n)
	}
	d.ndim = C.int32_t(len(t.shape))
	d.dtype = C.int32_t(t.dtype)
	var length int
	var ptr unsafe.Pointer
	switch t.dtype {
	case Float32:
		if t.u16 != nil {
			return d, nil, invalid(op, "%s: dtype float32 over 16-bit data", name)
		}
		length = len(t.f32)
		if length > 0 {
			ptr = unsafe.Pointer(&t.f32[0])
		}
	case Float16, BFloat16:
		if t.f32 != nil {
			return d, nil, invalid(op, "%s: dtype %v over float32 data", name, t.dtype)
		}
		length = len(t.u16)
		if length > 0 {
			ptr = unsafe.Pointer(&t.u16[0])
		}
	default:
		return d, nil, invalid(op, "%s: dtype %v is not float32, float16 or bfloat16", name, t.dtype)
	}
	if int64(length) != numel {
		return d, nil, invalid(op, "%s: len(data)=%d but shape %v holds %d elements", name, length, t.shape, numel)
	}
	return d, ptr, nil
}

// BFloat16FromFloat32 rounds f to bfloat16 (round to nearest even; NaN stays NaN).
func BFloat16FromFloat32(f float32) uint16 {
	u := math.Float32bits(f)
	if u&0x7fffffff > 0x7f800000 {
		return uint16(u>>16) | 0x40 // quiet NaN
	}
	return uint16((u + 0x7fff + (u>>16)&1) >> 16)
}

// BFloat16ToFloat32 widens a bfloat16 (exact).
func BFloat16ToFloat32(h uint16) float32 { return math.Float32frombits(uint32(h) << 16) }

// Float16FromFloat32 rounds f to IEEE half precision (round to nearest even, overflow to
// infinity, subnormals kept; NaN stays NaN).
func Float16FromFloat32(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int32(b>>23) & 0xff
	mant := b & 0x7fffff
	if exp == 0xff {
		if mant != 0 {
			return sign | 0x7e00
		}
		return sign | 0x7c00
	}
	e := exp - 127 + 15
	if e >= 0x1f {
		return sign | 0x7c00
	}
	if e <= 0 { // a half subnormal (or zero): value = m * 2^-24
		if e < -10 {
			return sign
		}
		full := mant | 0x800000
		shift := uint32(14 - e)
		r := full >> shift
		rem := full & (1<<shift - 1)
		half := uint32(1) << (shift - 1)
		if rem > half || (rem == half && r&1 == 1) {
			r++ // may carry into the smallest normal: still the right encoding
		}
		return sign | uint16(r)
	}
	r := uint32(e)<<10 | mant>>13
	rem := mant & 0x1fff
	if rem > 0x1000 || (rem == 0x1000 && r&1 == 1) {
		r++ // may carry into the exponent, up to infinity: still the right encoding
	}
	return sign | uint16(r)
}

// Float16ToFloat32 widens an IEEE half (exact).
func Float16ToFloat32(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	mant := uint32(h & 0x3ff)
	switch {
	case exp == 0x1f:
		return math.Float32frombits(sign | 0x7f800000 | mant<<13)
	case exp == 0:
		if mant == 0 {
			return math.Float32frombits(sign)
		}
		e := uint32(127 - 15 + 1)
		for mant&0x400 == 0 {
			mant <<= 1
			e--
		}
		return math.Float32frombits(sign | e<<23 | (mant&0x3ff)<<13)
	}
	return math.Float32frombits(sign | (exp+127-15)<<23 | mant<<13)
}
