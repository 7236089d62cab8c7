package kvplug

/*
#include "kvplug_go.h"
*/
import "C"

import (
	"math"
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

// Outputs are what one attention run writes (kvp_attention_outputs). LSE, Entropy and
// EntropySummary are optional (nil for none), float32 shaped after the query.
type Outputs struct {
	Out     Tensor    // required: [num_tokens, num_q_heads, head_size], the query's dtype
	LSE     []float32 // [num_tokens, num_q_heads]: natural log-sum-exp of the scaled logits (-Inf for a row that saw no key)
	Entropy []float32 // [num_tokens, num_q_heads]: attention entropy of each row in nats; needs BackendDeviceInfo.SupportsEntropy
	// Since ABI 0.4: [num_q_heads, EntropySummaryFields], the per-head summary of this run's row
	// entropies (read it with ParseEntropySummary); needs SupportsEntropy, computed whether or not
	// Entropy is set.
	EntropySummary []float32
}

// EntropySummaryFields is the number of float32 fields per head of Outputs.EntropySummary.
const EntropySummaryFields = 6

// HeadEntropy is one head's row of an entropy summary over the rows of one run. E_max = ln(keys)
// of a row; informative rows saw at least 2 keys (E_max > 0), and only they enter the normalised
// mean and the bands of entropy-guided attention. Means are 0 over no rows.
type HeadEntropy struct {
	Rows                  int     // rows that saw at least one key
	MeanEntropy           float32 // their mean entropy, nats
	InformativeRows       int     // rows that saw at least two keys
	MeanNormalizedEntropy float32 // their mean H / E_max, in [0, 1]
	CollapseRows          int     // informative rows with H <= E_max / 4
	OverloadRows          int     // informative rows with H >= 3 E_max / 4
}

// ParseEntropySummary reads a summary a run wrote ([num_q_heads * EntropySummaryFields] float32,
// row-major) head by head. A trailing partial row is ignored. Counts are exact up to 2^24 rows.
func ParseEntropySummary(summary []float32) []HeadEntropy {
	heads := make([]HeadEntropy, len(summary)/EntropySummaryFields)
	for h := range heads {
		s := summary[h*EntropySummaryFields : (h+1)*EntropySummaryFields]
		heads[h] = HeadEntropy{Rows: int(s[0]), MeanEntropy: s[1], InformativeRows: int(s[2]),
			MeanNormalizedEntropy: s[3], CollapseRows: int(s[4]), OverloadRows: int(s[5])}
	}
	return heads
}

// Run computes causal attention of this step's queries over layer of cache: query token i of
// sequence b sits at position seq_lens[b] - q_len_b + i and sees positions [0, that]. The cache
// must already hold this step's K/V. query and out are [num_tokens, num_q_heads, head_size] of one
// float dtype; lse (optional, nil for none) receives [num_tokens, num_q_heads] natural
// log-sum-exps of the scaled logits.
func (a *Attention) Run(plan *Plan, cache *KvCache, layer int, query, out Tensor, lse []float32) error {
	return a.run("Attention.Run", plan, cache, layer, query, Outputs{Out: out, LSE: lse})
}

// RunWith is Run writing every output set in o (kvp_attention_run_v2), including (ABI 0.4) the
// per-head entropy summary. ErrNotSupported for an output the backend does not offer.
func (a *Attention) RunWith(plan *Plan, cache *KvCache, layer int, query Tensor, o Outputs) error {
	return a.run("Attention.RunWith", plan, cache, layer, query, o)
}

func (a *Attention) run(op string, plan *Plan, cache *KvCache, layer int, query Tensor, o Outputs) error {
	if plan == nil || cache == nil {
		return invalid(op, "plan and cache are required")
	}
	if o.Out.shape == nil && o.Out.f32 == nil && o.Out.u16 == nil {
		return invalid(op, "Outputs.Out is required")
	}
	qd, qp, err := query.desc(op, "query")
	if err != nil {
		return err
	}
	od, optr, err := o.Out.desc(op, "out")
	if err != nil {
		return err
	}
	// [num_tokens, num_q_heads] and [num_q_heads, EntropySummaryFields], only needed for the
	// optional outputs.
	var rowShape, summaryShape []int64
	if o.LSE != nil || o.Entropy != nil || o.EntropySummary != nil {
		if len(query.shape) != 3 {
			return invalid(op, "query: ndim=%d, expected 3", len(query.shape))
		}
		rowShape = query.shape[:2]
		summaryShape = []int64{query.shape[1], EntropySummaryFields}
	}
	ld, lp, err := optionalDesc(op, "lse", o.LSE, rowShape)
	if err != nil {
		return err
	}
	ed, ep, err := optionalDesc(op, "entropy", o.Entropy, rowShape)
	if err != nil {
		return err
	}
	sd, sp, err := optionalDesc(op, "entropy_summary", o.EntropySummary, summaryShape)
	if err != nil {
		return err
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
		return C.kvpg_attention_run(ap, pp, cp, C.int32_t(layer), qp, &qd, optr, &od, lp, ld, ep, ed, sp, sd)
	})
}

// optionalDesc describes data as a float32 tensor of shape, or returns a nil desc (the output
// or input is absent) for nil data.
func optionalDesc(op, name string, data []float32, shape []int64) (*C.kvpg_desc, unsafe.Pointer, error) {
	if data == nil {
		return nil, nil, nil
	}
	t := Float32Tensor(data)
	t.shape = shape
	d, p, err := t.desc(op, name)
	if err != nil {
		return nil, nil, err
	}
	return &d, p, nil
}

// StateBytes is the bytes of per-sequence state per layer the backend keeps in a cache's state
// slots (0 for stateless backends such as dense): create caches with StateBytesPerLayer at least
// this.
func (a *Attention) StateBytes() (int64, error) {
	const op = "Attention.StateBytes"
	ap, err := a.h.shared(op)
	if err != nil {
		return 0, err
	}
	defer a.h.mu.RUnlock()
	var n C.int64_t
	if err := call(op, func() C.kvp_status { return C.kvp_attention_state_bytes(ap, &n) }); err != nil {
		return 0, err
	}
	return int64(n), nil
}

// CacheLayout is where a sequence's K/V rows live in its page list for one step (kvp_cache_layout,
// ABI 0.5). Token-stream backends: SeqLen = numTokens, nothing compressed. attamba: [CompressedPages
// pages of chunk-end rows][WindowPages token pages from token page WindowFirstPage]; SeqLen is the
// batch's SeqLens entry.
type CacheLayout struct {
	SeqLen, NumPages, CompressedRows, CompressedPages, StableRows, WindowFirstPage, WindowPages int
}

// CacheLayout is the page-list layout of a sequence of numTokens tokens (after the step) for a step
// starting at position queryPosStart (kvp_attention_cache_layout, ABI 0.5).
func (a *Attention) CacheLayout(blockSize, numTokens, queryPosStart int) (CacheLayout, error) {
	const op = "Attention.CacheLayout"
	names := [3]string{"blockSize", "numTokens", "queryPosStart"}
	for i, n := range [3]int{blockSize, numTokens, queryPosStart} {
		if n < math.MinInt32 || n > math.MaxInt32 {
			return CacheLayout{}, invalid(op, "%s=%d does not fit int32", names[i], n)
		}
	}
	ap, err := a.h.shared(op)
	if err != nil {
		return CacheLayout{}, err
	}
	defer a.h.mu.RUnlock()
	// No Go pointers inside: it may live in Go memory.
	var l C.kvp_cache_layout
	l.struct_size = C.size_t(C.sizeof_kvp_cache_layout)
	if err := call(op, func() C.kvp_status {
		return C.kvp_attention_cache_layout(ap, C.int32_t(blockSize), C.int32_t(numTokens), C.int32_t(queryPosStart), &l)
	}); err != nil {
		return CacheLayout{}, err
	}
	return CacheLayout{int(l.seq_len), int(l.num_pages), int(l.compressed_rows), int(l.compressed_pages),
		int(l.stable_rows), int(l.window_first_page), int(l.window_pages)}, nil
}

// SSMArgs are the float32 tensors of Attention.SSM (kvp_ssm_args, ABI 0.5). In: in_proj's output
// [T, 2 d_inner + 2 G N + heads]; ConvWeight [conv_dim, conv_width]; ALog [heads]; optional (nil:
// absent) ConvBias [conv_dim], DtBias and DSkip [heads], NormWeight [d_inner]; Out [T, d_inner].
// Which: attamba's key SSM (0) or value SSM (1).
type SSMArgs struct {
	Which                                     int
	In, ConvWeight, Out                       Tensor
	ALog, ConvBias, DtBias, DSkip, NormWeight []float32
}

// SSM runs the backend's sequence-state operator over the plan's tokens (kvp_attention_ssm, ABI
// 0.5; attamba: the chunk-local Mamba-2 block), its state in cache's state slots (the plan's batch
// needs StateSlots and QueryPosStarts). Writes args.Out. ErrNotSupported for backends without one.
func (a *Attention) SSM(plan *Plan, cache *KvCache, layer int, args SSMArgs) error {
	const op = "Attention.SSM"
	if plan == nil || cache == nil {
		return invalid(op, "plan and cache are required")
	}
	if args.ALog == nil {
		return invalid(op, "SSMArgs.ALog is required")
	}
	xd, xp, err := args.In.desc(op, "in")
	if err != nil {
		return err
	}
	wd, wp, err := args.ConvWeight.desc(op, "conv_weight")
	if err != nil {
		return err
	}
	od, optr, err := args.Out.desc(op, "out")
	if err != nil {
		return err
	}
	vec := func(name string, v []float32) (*C.kvpg_desc, unsafe.Pointer, error) {
		return optionalDesc(op, name, v, []int64{int64(len(v))})
	}
	ald, alp, err := vec("a_log", args.ALog)
	if err != nil {
		return err
	}
	cbd, cbp, err := vec("conv_bias", args.ConvBias)
	if err != nil {
		return err
	}
	dbd, dbp, err := vec("dt_bias", args.DtBias)
	if err != nil {
		return err
	}
	dsd, dsp, err := vec("d_skip", args.DSkip)
	if err != nil {
		return err
	}
	nwd, nwp, err := vec("norm_weight", args.NormWeight)
	if err != nil {
		return err
	}
	if args.Which < math.MinInt32 || args.Which > math.MaxInt32 {
		return invalid(op, "Which=%d does not fit int32", args.Which)
	}
	// Lock order everywhere: attention, plan, cache (exclusive: the call updates its state slots).
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
		return C.kvpg_attention_ssm(ap, pp, cp, C.int32_t(layer), C.int32_t(args.Which), xp, &xd, wp, &wd, cbp, cbd,
			dbp, dbd, alp, ald, dsp, dsd, nwp, nwd, optr, &od)
	})
}
