package kvplug

/*
#include "kvplug_go.h"
*/
import "C"

import (
	"fmt"
	"runtime"
	"unsafe"
)

// Layout is the page layout of one cache layer (kvp_kv_layout).
type Layout int32

const (
	// LayoutKVFirst is [2, num_blocks, block_size, num_kv_heads, head_size] (vLLM).
	LayoutKVFirst Layout = C.KVP_LAYOUT_KV_FIRST
	// LayoutBlockFirst is [num_blocks, 2, block_size, num_kv_heads, head_size] (FlashInfer).
	LayoutBlockFirst Layout = C.KVP_LAYOUT_BLOCK_FIRST
)

// KvCacheOptions configures a KV cache (kvp_kv_cache_options).
type KvCacheOptions struct {
	NumLayers          int    // > 0
	NumBlocks          int    // > 0 device blocks per layer
	BlockSize          int    // tokens per block; equal to the block manager's
	NumKVHeads         int    // > 0
	HeadSize           int    // > 0
	DType              DType  // storage type
	Layout             Layout // page layout
	NumHostBlocks      int    // >= 0 host swap blocks per layer
	NumStateSlots      int    // >= 0
	StateBytesPerLayer int64  // >= 0 bytes of each state slot, per layer
}

// KvCache is the paged K/V of every layer, allocated (zero-filled) by the library, plus host swap
// pages and state slots (kvp_kv_cache). Writes, copies and swaps hold its lock exclusively;
// attention runs reading it hold it shared.
type KvCache struct {
	h   handle[C.kvp_kv_cache]
	ctx *Context
	opt KvCacheOptions
}

// NewKvCache creates a cache on the context's device.
func (c *Context) NewKvCache(o KvCacheOptions) (*KvCache, error) {
	const op = "Context.NewKvCache"
	for _, v := range []struct {
		name string
		val  int
	}{{"NumLayers", o.NumLayers}, {"NumBlocks", o.NumBlocks}, {"BlockSize", o.BlockSize},
		{"NumKVHeads", o.NumKVHeads}, {"HeadSize", o.HeadSize}, {"NumHostBlocks", o.NumHostBlocks},
		{"NumStateSlots", o.NumStateSlots}} {
		if int(int32(v.val)) != v.val {
			return nil, invalid(op, "%s=%d does not fit int32", v.name, v.val)
		}
	}
	co := C.kvp_kv_cache_options{
		struct_size:           C.sizeof_kvp_kv_cache_options,
		num_layers:            C.int32_t(o.NumLayers),
		num_blocks:            C.int32_t(o.NumBlocks),
		block_size:            C.int32_t(o.BlockSize),
		num_kv_heads:          C.int32_t(o.NumKVHeads),
		head_size:             C.int32_t(o.HeadSize),
		dtype:                 C.int32_t(o.DType),
		layout:                C.int32_t(o.Layout),
		num_host_blocks:       C.int32_t(o.NumHostBlocks),
		num_state_slots:       C.int32_t(o.NumStateSlots),
		state_bytes_per_layer: C.int64_t(o.StateBytesPerLayer),
	}
	var ptr *C.kvp_kv_cache
	err := c.newDependent(op, func(ctx *C.kvp_context) error {
		return call(op, func() C.kvp_status { return C.kvp_kv_cache_create(ctx, &co, &ptr) })
	})
	if err != nil {
		return nil, err
	}
	kc := &KvCache{ctx: c, opt: o}
	kc.h.ptr, kc.h.kind = ptr, "KvCache"
	runtime.SetFinalizer(kc, func(kc *KvCache) { _ = kc.Close() })
	return kc, nil
}

// Close destroys the cache. Idempotent.
func (kc *KvCache) Close() error {
	if kc.h.close(func(p *C.kvp_kv_cache) { C.kvp_kv_cache_destroy(p) }) {
		kc.ctx.release()
		runtime.SetFinalizer(kc, nil)
	}
	return nil
}

// Options returns the options the cache was created with.
func (kc *KvCache) Options() KvCacheOptions { return kc.opt }

// Write stores new keys and values ([num_tokens, num_kv_heads, head_size], any float dtype,
// converted to the cache's) of layer at the given slots (len num_tokens; -1 skips a token).
// All slots are checked before anything is written (vLLM's reshape_and_cache).
func (kc *KvCache) Write(layer int, key, value Tensor, slots []int64) error {
	const op = "KvCache.Write"
	kd, kp, err := key.desc(op, "key")
	if err != nil {
		return err
	}
	vd, vp, err := value.desc(op, "value")
	if err != nil {
		return err
	}
	p, err := kc.h.exclusive(op)
	if err != nil {
		return err
	}
	defer kc.h.mu.Unlock()
	return call(op, func() C.kvp_status {
		return C.kvpg_kv_cache_write(p, C.int32_t(layer), kp, &kd, vp, &vd, int64Ptr(slots), C.int64_t(len(slots)))
	})
}

type copyFunc func(*C.kvp_kv_cache, *C.kvp_block_copy, C.int32_t) C.kvp_status

func (kc *KvCache) copies(op string, copies []BlockCopy, f copyFunc) error {
	if len(copies) > 1<<31-1 {
		return invalid(op, "len(copies)=%d too large", len(copies))
	}
	p, err := kc.h.exclusive(op)
	if err != nil {
		return err
	}
	defer kc.h.mu.Unlock()
	return call(op, func() C.kvp_status { return f(p, copiesPtr(copies), C.int32_t(len(copies))) })
}

// CopyBlocks copies blocks src -> dst in every layer (copy-on-write plans from BlockManager.Append).
func (kc *KvCache) CopyBlocks(copies []BlockCopy) error {
	return kc.copies("KvCache.CopyBlocks", copies, func(p *C.kvp_kv_cache, c *C.kvp_block_copy, n C.int32_t) C.kvp_status {
		return C.kvp_kv_cache_copy_blocks(p, c, n)
	})
}

// SwapOut performs a BlockManager.SwapOut plan: device blocks -> host blocks, every layer.
func (kc *KvCache) SwapOut(copies []BlockCopy) error {
	return kc.copies("KvCache.SwapOut", copies, func(p *C.kvp_kv_cache, c *C.kvp_block_copy, n C.int32_t) C.kvp_status {
		return C.kvp_kv_cache_swap_out(p, c, n)
	})
}

// SwapIn performs a BlockManager.SwapIn plan: host blocks -> device blocks, every layer.
func (kc *KvCache) SwapIn(copies []BlockCopy) error {
	return kc.copies("KvCache.SwapIn", copies, func(p *C.kvp_kv_cache, c *C.kvp_block_copy, n C.int32_t) C.kvp_status {
		return C.kvp_kv_cache_swap_in(p, c, n)
	})
}

// CopyState copies state slot src to dst in every layer (after a fork).
func (kc *KvCache) CopyState(src, dst int) error {
	const op = "KvCache.CopyState"
	p, err := kc.h.exclusive(op)
	if err != nil {
		return err
	}
	defer kc.h.mu.Unlock()
	return call(op, func() C.kvp_status { return C.kvp_kv_cache_copy_state(p, C.int32_t(src), C.int32_t(dst)) })
}

// ReadState returns a copy of the bytes of state slot `slot` in layer. (The library hands out a
// pointer into the cache; this binding copies so that no Go slice aliases memory Close frees.)
func (kc *KvCache) ReadState(layer, slot int) ([]byte, error) {
	const op = "KvCache.ReadState"
	// Shared: the header lists the state among the cache's contents, which runs only read.
	p, err := kc.h.shared(op)
	if err != nil {
		return nil, err
	}
	defer kc.h.mu.RUnlock()
	var n C.int64_t
	if err := call(op, func() C.kvp_status { return C.kvpg_state_copy(p, C.int32_t(layer), C.int32_t(slot), nil, 0, &n) }); err != nil {
		return nil, err
	}
	buf := make([]byte, int(n))
	if n == 0 {
		return buf, nil
	}
	err = call(op, func() C.kvp_status {
		return C.kvpg_state_copy(p, C.int32_t(layer), C.int32_t(slot), unsafe.Pointer(&buf[0]), C.int64_t(len(buf)), &n)
	})
	return buf, err
}

// LayerSnapshot is a copy of one layer's pages: Data holds the bytes the view spans, element
// (i0, ..., i4) at byte offset sum(i_k * Strides[k]) * DType.Size().
type LayerSnapshot struct {
	Shape   [5]int64 // in the cache's Layout
	Strides [5]int64 // in elements
	DType   DType
	Data    []byte
}

// Float32At reads element idx of a snapshot whose DType is Float32 (other dtypes: use Data).
func (s *LayerSnapshot) Float32At(idx [5]int64) float32 {
	off := int64(0)
	for k := range idx {
		off += idx[k] * s.Strides[k]
	}
	b := s.Data[off*4 : off*4+4]
	return *(*float32)(unsafe.Pointer(&b[0]))
}

// Snapshot copies layer's device pages (host false) or host swap pages (host true), for
// inspection and tests.
func (kc *KvCache) Snapshot(layer int, host bool) (*LayerSnapshot, error) {
	const op = "KvCache.Snapshot"
	p, err := kc.h.shared(op)
	if err != nil {
		return nil, err
	}
	defer kc.h.mu.RUnlock()
	var shape, strides [5]C.int64_t
	var code, bits C.int32_t
	var span C.int64_t
	err = call(op, func() C.kvp_status {
		return C.kvpg_layer_info(p, C.int32_t(layer), C.int32_t(cbool(host)), &shape[0], &strides[0], &code, &bits, &span)
	})
	if err != nil {
		return nil, err
	}
	s := &LayerSnapshot{Data: make([]byte, int(span))}
	for i := range shape {
		s.Shape[i], s.Strides[i] = int64(shape[i]), int64(strides[i])
	}
	switch {
	case code == C.kDLFloat && bits == 32:
		s.DType = Float32
	case code == C.kDLFloat && bits == 16:
		s.DType = Float16
	case code == C.kDLBfloat && bits == 16:
		s.DType = BFloat16
	case bits == 8:
		s.DType = FP8E4M3
	default:
		return nil, &Error{Op: op, Code: StatusInternal, Message: fmt.Sprintf("unexpected view dtype (code=%d, bits=%d)", code, bits)}
	}
	if span == 0 {
		return s, nil
	}
	err = call(op, func() C.kvp_status {
		return C.kvpg_layer_copy(p, C.int32_t(layer), C.int32_t(cbool(host)), unsafe.Pointer(&s.Data[0]), span)
	})
	if err != nil {
		return nil, err
	}
	return s, nil
}
