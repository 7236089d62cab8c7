package kvplug

/*
#include "kvplug_go.h"
*/
import "C"

import "runtime"

// PlanOptions sizes a plan's preallocated buffers (kvp_plan_options).
type PlanOptions struct {
	MaxNumSeqs   int // > 0
	MaxNumTokens int // > 0: query tokens in one step
	MaxNumBlocks int // > 0: blocks referenced by one step, all sequences together
}

// Batch describes one step (kvp_batch): num_seqs = len(SeqLens). The block table comes in either
// form: dense (BlockTable, [num_seqs, BlockTableStride] row-major, vLLM) or, when BlockTable is
// nil, CSR (KVIndptr [num_seqs+1] and KVIndices, FlashInfer). The slices are read during
// Plan.Update only.
type Batch struct {
	BlockSize        int
	QueryStartLoc    []int32 // [num_seqs+1], non-decreasing, from 0
	SeqLens          []int32 // [num_seqs]: K/V length including this step's tokens
	BlockTable       []int32 // dense form, or nil
	BlockTableStride int     // >= blocks needed by the longest sequence
	KVIndptr         []int32 // CSR form
	KVIndices        []int32
	SlotMapping      []int64 // optional [num_tokens]: for Attention.WriteKV
	StateSlots       []int32 // optional [num_seqs]: for backends with state
	// Since ABI 0.4 (both optional; nil keeps the 0.3 meaning).
	// ContextLens [num_seqs], >= 0: global positions below ContextLens[b] of sequence b are its
	// context, the rest its query and generated tokens (Star Attention encodes the context in
	// phase 1 and the rest in phase 2; other backends ignore it).
	ContextLens []int32
	// QueryPosStarts [num_seqs], >= 0: the global position of each sequence's first token of this
	// step; nil: SeqLens[b] - q_len_b. Given, SeqLens may be shorter than the step (a Star shard
	// that holds only context keys).
	QueryPosStarts []int32
}

// Plan is the host-side description of one batch step, built once per step by Update and read
// by every layer's attention run (kvp_plan). Update holds its lock exclusively, runs shared.
type Plan struct {
	h   handle[C.kvp_plan]
	ctx *Context
}

// NewPlan creates a plan with the given capacities.
func (c *Context) NewPlan(o PlanOptions) (*Plan, error) {
	const op = "Context.NewPlan"
	for _, v := range []int{o.MaxNumSeqs, o.MaxNumTokens, o.MaxNumBlocks} {
		if int(int32(v)) != v {
			return nil, invalid(op, "capacity %d does not fit int32", v)
		}
	}
	co := C.kvp_plan_options{
		struct_size:    C.sizeof_kvp_plan_options,
		max_num_seqs:   C.int32_t(o.MaxNumSeqs),
		max_num_tokens: C.int32_t(o.MaxNumTokens),
		max_num_blocks: C.int32_t(o.MaxNumBlocks),
	}
	var ptr *C.kvp_plan
	err := c.newDependent(op, func(ctx *C.kvp_context) error {
		return call(op, func() C.kvp_status { return C.kvp_plan_create(ctx, &co, &ptr) })
	})
	if err != nil {
		return nil, err
	}
	p := &Plan{ctx: c}
	p.h.ptr, p.h.kind = ptr, "Plan"
	runtime.SetFinalizer(p, func(p *Plan) { _ = p.Close() })
	return p, nil
}

// Close destroys the plan. Idempotent.
func (p *Plan) Close() error {
	if p.h.close(func(ptr *C.kvp_plan) { C.kvp_plan_destroy(ptr) }) {
		p.ctx.release()
		runtime.SetFinalizer(p, nil)
	}
	return nil
}

// check rejects what C would read past the end of a slice: the library trusts every array to be
// as long as num_seqs and the offsets say. Values (monotonic offsets, block ids, capacities) are
// the library's to check.
func (b *Batch) check(op string) error {
	n := len(b.SeqLens)
	if n == 0 {
		return invalid(op, "SeqLens is empty: a batch has at least one sequence")
	}
	if n > 1<<31-2 {
		return invalid(op, "len(SeqLens)=%d too large", n)
	}
	if len(b.QueryStartLoc) != n+1 {
		return invalid(op, "len(QueryStartLoc)=%d but len(SeqLens)+1=%d", len(b.QueryStartLoc), n+1)
	}
	if b.BlockTable != nil {
		if b.BlockTableStride <= 0 || int(int32(b.BlockTableStride)) != b.BlockTableStride {
			return invalid(op, "BlockTableStride=%d must be in [1, 2^31)", b.BlockTableStride)
		}
		if len(b.BlockTable) != n*b.BlockTableStride {
			return invalid(op, "len(BlockTable)=%d but len(SeqLens)*BlockTableStride=%d", len(b.BlockTable), n*b.BlockTableStride)
		}
	} else {
		if len(b.KVIndptr) != n+1 {
			return invalid(op, "no BlockTable, and len(KVIndptr)=%d but len(SeqLens)+1=%d", len(b.KVIndptr), n+1)
		}
		for i, v := range b.KVIndptr {
			if v < 0 || int(v) > len(b.KVIndices) {
				return invalid(op, "KVIndptr[%d]=%d out of range [0, len(KVIndices)=%d]", i, v, len(b.KVIndices))
			}
		}
		if len(b.KVIndices) == 0 {
			// C takes a NULL kv_indices as "no block table"; an empty one can serve no block.
			return invalid(op, "KVIndices is empty")
		}
	}
	if b.SlotMapping != nil {
		if t := b.QueryStartLoc[n]; int(t) != len(b.SlotMapping) {
			return invalid(op, "len(SlotMapping)=%d but QueryStartLoc[%d]=%d tokens", len(b.SlotMapping), n, t)
		}
	}
	if b.StateSlots != nil && len(b.StateSlots) != n {
		return invalid(op, "len(StateSlots)=%d but len(SeqLens)=%d", len(b.StateSlots), n)
	}
	if b.ContextLens != nil && len(b.ContextLens) != n {
		return invalid(op, "len(ContextLens)=%d but len(SeqLens)=%d", len(b.ContextLens), n)
	}
	if b.QueryPosStarts != nil && len(b.QueryPosStarts) != n {
		return invalid(op, "len(QueryPosStarts)=%d but len(SeqLens)=%d", len(b.QueryPosStarts), n)
	}
	return nil
}

// Update checks b and converts it into the plan's buffers (no allocation). ErrOutOfRange if it
// exceeds the plan's capacities. On failure the plan is emptied.
func (p *Plan) Update(b *Batch) error {
	const op = "Plan.Update"
	if b == nil {
		b = &Batch{} // rejected by check below, which also empties the plan
	}
	ptr, err := p.h.exclusive(op)
	if err != nil {
		return err
	}
	defer p.h.mu.Unlock()
	if err := b.check(op); err != nil {
		// Keep the header's promise that a failed update leaves no stale plan behind.
		_ = call(op, func() C.kvp_status { return C.kvp_plan_update(ptr, nil) })
		return err
	}
	var table, indptr, indices *C.int32_t
	if b.BlockTable != nil {
		table = int32Ptr(b.BlockTable)
	} else {
		indptr, indices = int32Ptr(b.KVIndptr), int32Ptr(b.KVIndices)
	}
	var slots *C.int64_t
	if b.SlotMapping != nil {
		slots = int64Ptr(b.SlotMapping)
		if len(b.SlotMapping) == 0 {
			// A zero-token step still "has" a slot mapping; any non-NULL pointer says so and
			// nothing is read through it.
			var dummy [1]int64
			slots = int64Ptr(dummy[:])
		}
	}
	return call(op, func() C.kvp_status {
		return C.kvpg_plan_update(ptr, C.int32_t(len(b.SeqLens)), C.int32_t(b.BlockSize), int32Ptr(b.QueryStartLoc),
			int32Ptr(b.SeqLens), table, C.int32_t(b.BlockTableStride), indptr, indices, slots, int32Ptr(b.StateSlots),
			int32Ptr(b.ContextLens), int32Ptr(b.QueryPosStarts))
	})
}

// Attach makes every later Update plan for a too (and plans the current batch now): the step work
// its runs need (key sets, split-KV partitions) is then built once per step, and attentions whose
// planners agree share it. Running on a plan without attaching attaches at that run. Both must
// come from the same Context (ErrInvalidArgument otherwise).
func (p *Plan) Attach(a *Attention) error {
	const op = "Plan.Attach"
	if a == nil {
		return invalid(op, "attention is required")
	}
	// Lock order everywhere: attention, plan, cache. The plan's lock is exclusive: attaching
	// changes what its updates build.
	ap, err := a.h.shared(op)
	if err != nil {
		return err
	}
	defer a.h.mu.RUnlock()
	pp, err := p.h.exclusive(op)
	if err != nil {
		return err
	}
	defer p.h.mu.Unlock()
	return call(op, func() C.kvp_status { return C.kvp_plan_attach(pp, ap) })
}
