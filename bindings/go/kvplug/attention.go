package kvplug

/*
#include "kvplug_go.h"
*/
import "C"

import (
	"runtime"
	"unsafe"
)

// AttentionOptions configures an attention backend instance (kvp_attention_options).
type AttentionOptions struct {
	Backend    string  // e.g. "dense"; see Backends
	NumQHeads  int     // > 0, a multiple of NumKVHeads
	NumKVHeads int     // > 0
	HeadSize   int     // a size listed by GetBackendInfo
	KVDType    DType   // dtype of the caches it will read
	SmScale    float32 // softmax scale; 0 = 1/sqrt(HeadSize)
	// The backend config, a kvplug.AttentionConfig (abi/schema/kvplug_config.fbs): ConfigJSON
	// as JSON text, e.g. {"backend_config_type": "DenseConfig", "backend_config": {"window_left": 64}},
	// or ConfigBinary as a FlatBuffers buffer. At most one; neither takes the backend's defaults.
	ConfigJSON   string
	ConfigBinary []byte
}

// Attention is an attention backend instance (kvp_attention), immutable after creation: runs on
// one Attention from several goroutines are safe when they write different outputs.
type Attention struct {
	h   handle[C.kvp_attention]
	ctx *Context
	opt AttentionOptions
}

// NewAttention creates a backend instance: ErrNotFound for an unknown backend, ErrInvalidConfig
// for a bad config, ErrNotSupported for a head size or dtype the backend lacks.
func (c *Context) NewAttention(o AttentionOptions) (*Attention, error) {
	const op = "Context.NewAttention"
	for _, v := range []int{o.NumQHeads, o.NumKVHeads, o.HeadSize} {
		if int(int32(v)) != v {
			return nil, invalid(op, "head count or size %d does not fit int32", v)
		}
	}
	if o.ConfigJSON != "" && o.ConfigBinary != nil {
		return nil, invalid(op, "both ConfigJSON and ConfigBinary are set")
	}
	// The options struct holds pointers, so what it points at lives in C memory (cgo forbids a Go
	// struct with Go pointers); the library copies what it keeps before returning.
	backend := C.CString(o.Backend)
	defer C.free(unsafe.Pointer(backend))
	format, config := ConfigNone, []byte(nil)
	switch {
	case o.ConfigJSON != "":
		format, config = ConfigJSON, []byte(o.ConfigJSON)
	case o.ConfigBinary != nil:
		format, config = ConfigBinary, o.ConfigBinary
	}
	var cfg unsafe.Pointer
	if len(config) > 0 {
		cfg = C.CBytes(config)
		defer C.free(cfg)
	}
	co := C.kvp_attention_options{
		struct_size:   C.sizeof_kvp_attention_options,
		backend:       backend,
		num_q_heads:   C.int32_t(o.NumQHeads),
		num_kv_heads:  C.int32_t(o.NumKVHeads),
		head_size:     C.int32_t(o.HeadSize),
		kv_dtype:      C.int32_t(o.KVDType),
		sm_scale:      C.float(o.SmScale),
		config_format: C.int32_t(format),
		config:        cfg,
		config_size:   C.size_t(len(config)),
	}
	var ptr *C.kvp_attention
	err := c.newDependent(op, func(ctx *C.kvp_context) error {
		return call(op, func() C.kvp_status { return C.kvp_attention_create(ctx, &co, &ptr) })
	})
	if err != nil {
		return nil, err
	}
	a := &Attention{ctx: c, opt: o}
	a.h.ptr, a.h.kind = ptr, "Attention"
	runtime.SetFinalizer(a, func(a *Attention) { _ = a.Close() })
	return a, nil
}

// Close destroys the instance. Idempotent.
func (a *Attention) Close() error {
	if a.h.close(func(p *C.kvp_attention) { C.kvp_attention_destroy(p) }) {
		a.ctx.release()
		runtime.SetFinalizer(a, nil)
	}
	return nil
}

// Options returns the options the instance was created with.
func (a *Attention) Options() AttentionOptions { return a.opt }

// WriteKV writes this step's new keys and values ([num_tokens, num_kv_heads, head_size]) of layer
// through the backend at the plan's SlotMapping (dense writes them as they are).
func (a *Attention) WriteKV(plan *Plan, cache *KvCache, layer int, key, value Tensor) error {
	const op = "Attention.WriteKV"
	if plan == nil || cache == nil {
		return invalid(op, "plan and cache are required")
	}
	kd, kp, err := key.desc(op, "key")
	if err != nil {
		return err
	}
	vd, vp, err := value.desc(op, "value")
	if err != nil {
		return err
	}
	// Lock order everywhere: attention, plan, cache.
	ap, err := a.h.shared(op)
	if err != nil {
		return err
	}
	defer a.h.mu.RUnlock()
	pp, err := plan.h.shared(op)
	if err != nil {
		return err
	}
	defer plan.h.mu.RUnlock()
	cp, err := cache.h.exclusive(op)
	if err != nil {
		return err
	}
	defer cache.h.mu.Unlock()
	return call(op, func() C.kvp_status {
		return C.kvpg_attention_write_kv(ap, pp, cp, C.int32_t(layer), kp, &kd, vp, &vd)
	})
}

// Run computes causal attention of this step's queries over layer of cache: query token i of
// sequence b sits at position seq_lens[b] - q_len_b + i and sees positions [0, that]. The cache
// must already hold this step's K/V. query and out are [num_tokens, num_q_heads, head_size] of one
// float dtype; lse (optional, nil for none) receives [num_tokens, num_q_heads] natural
// log-sum-exps of the scaled logits.
func (a *Attention) Run(plan *Plan, cache *KvCache, layer int, query, out Tensor, lse []float32) error {
	const op = "Attention.Run"
	if plan == nil || cache == nil {
		return invalid(op, "plan and cache are required")
	}
	qd, qp, err := query.desc(op, "query")
	if err != nil {
		return err
	}
	od, optr, err := out.desc(op, "out")
	if err != nil {
		return err
	}
	var ld *C.kvpg_desc
	var lp unsafe.Pointer
	if lse != nil {
		if len(query.shape) != 3 {
			return invalid(op, "query: ndim=%d, expected 3", len(query.shape))
		}
		l := Float32Tensor(lse)
		l.shape = []int64{query.shape[0], query.shape[1]}
		d, p, err := l.desc(op, "lse")
		if err != nil {
			return err
		}
		ld, lp = &d, p
	}
	ap, err := a.h.shared(op)
	if err != nil {
		return err
	}
	defer a.h.mu.RUnlock()
	pp, err := plan.h.shared(op)
	if err != nil {
		return err
	}
	defer plan.h.mu.RUnlock()
	cp, err := cache.h.shared(op)
	if err != nil {
		return err
	}
	defer cache.h.mu.RUnlock()
	return call(op, func() C.kvp_status {
		return C.kvpg_attention_run(ap, pp, cp, C.int32_t(layer), qp, &qd, optr, &od, lp, ld)
	})
}
