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

// NCCLUniqueIDBytes is the size of an NCCL unique id (KVP_NCCL_UNIQUE_ID_BYTES).
const NCCLUniqueIDBytes = C.KVP_NCCL_UNIQUE_ID_BYTES

// CommKind is a communicator's kind (kvp_comm_kind, since ABI 0.4).
type CommKind int32

const (
	// CommInProcess is one handle for all ranks of one process (one context); thread-safe.
	CommInProcess CommKind = C.KVP_COMM_IN_PROCESS
	// CommNCCL is one handle per rank; NCCL is loaded on first use (ErrNotSupported without
	// libnccl.so.2). Not usable with this CPU-only binding's tensors, but creatable.
	CommNCCL CommKind = C.KVP_COMM_NCCL
)

// CommOptions configures a communicator (kvp_comm_options).
type CommOptions struct {
	Kind             CommKind
	NumRanks         int    // in [1, 1024]
	Rank             int    // NCCL: this handle's rank; in-process: 0
	NCCLUniqueID     []byte // NCCL: NCCLUniqueIDBytes bytes from NCCLUniqueID; else nil
	MaxNumTokens     int    // > 0: rows of one merge
	NumHeads         int    // > 0: query heads
	HeadSize         int    // > 0
	OutDType         DType  // of the partial outputs: Float32, Float16 or BFloat16
	ValidateEachCall bool   // NCCL: check every call's shapes across ranks (a synchronization)
}

// Comm merges partial attention states held by several shards (Star Attention's phase 2) exactly,
// so that every rank ends with the attention over all keys (kvp_comm). An in-process comm keeps
// every contributor's tensors until the round's last rank merges them in place; cgo forbids C to
// keep Go memory past a call, so this binding hands over a whole round at once (MergeAll), staging
// the partials in C memory. Calls hold the comm's lock exclusively.
type Comm struct {
	h        handle[C.kvp_comm]
	ctx      *Context
	opt      CommOptions
	poisoned bool             // a round was left open by a failed MergeAll
	held     []unsafe.Pointer // C memory an open round may still point at; freed after destroy
}

// NCCLUniqueID returns NCCL's unique id for a new communicator, on the rank that creates it:
// distribute it to every rank. ErrNotSupported if NCCL cannot be loaded.
func NCCLUniqueID() ([NCCLUniqueIDBytes]byte, error) {
	var id [NCCLUniqueIDBytes]byte
	if err := checkABI(); err != nil {
		return id, err
	}
	buf := (*C.uint8_t)(C.calloc(1, NCCLUniqueIDBytes))
	defer C.free(unsafe.Pointer(buf))
	if err := call("NCCLUniqueID", func() C.kvp_status { return C.kvp_comm_nccl_unique_id(buf) }); err != nil {
		return id, err
	}
	copy(id[:], unsafe.Slice((*byte)(unsafe.Pointer(buf)), NCCLUniqueIDBytes))
	return id, nil
}

// NewComm creates a communicator on c (NCCL: collective, every rank calls it). ErrInvalidArgument
// for options out of range.
func (c *Context) NewComm(o CommOptions) (*Comm, error) {
	const op = "Context.NewComm"
	for _, v := range []int{o.NumRanks, o.Rank, o.MaxNumTokens, o.NumHeads, o.HeadSize} {
		if int(int32(v)) != v {
			return nil, invalid(op, "option %d does not fit int32", v)
		}
	}
	if o.NCCLUniqueID != nil && len(o.NCCLUniqueID) != NCCLUniqueIDBytes {
		return nil, invalid(op, "len(NCCLUniqueID)=%d, want %d", len(o.NCCLUniqueID), NCCLUniqueIDBytes)
	}
	co := (*C.kvp_comm_options)(C.calloc(1, C.sizeof_kvp_comm_options))
	defer C.free(unsafe.Pointer(co))
	co.struct_size = C.sizeof_kvp_comm_options
	co.kind = C.int32_t(o.Kind)
	co.num_ranks = C.int32_t(o.NumRanks)
	co.rank = C.int32_t(o.Rank)
	if o.NCCLUniqueID != nil {
		id := C.CBytes(o.NCCLUniqueID)
		defer C.free(id)
		co.nccl_unique_id = (*C.uint8_t)(id)
	}
	co.max_num_tokens = C.int32_t(o.MaxNumTokens)
	co.num_heads = C.int32_t(o.NumHeads)
	co.head_size = C.int32_t(o.HeadSize)
	co.out_dtype = C.int32_t(o.OutDType)
	co.validate_each_call = cbool(o.ValidateEachCall)
	var ptr *C.kvp_comm
	err := c.newDependent(op, func(ctx *C.kvp_context) error {
		return call(op, func() C.kvp_status { return C.kvp_comm_create(ctx, co, &ptr) })
	})
	if err != nil {
		return nil, err
	}
	m := &Comm{ctx: c, opt: o}
	if m.opt.NCCLUniqueID != nil {
		m.opt.NCCLUniqueID = append([]byte(nil), o.NCCLUniqueID...)
	}
	m.h.ptr, m.h.kind = ptr, "Comm"
	runtime.SetFinalizer(m, func(m *Comm) { _ = m.Close() })
	return m, nil
}

// Close destroys the communicator. Idempotent.
func (m *Comm) Close() error {
	if m.h.close(func(p *C.kvp_comm) { C.kvp_comm_destroy(p) }) {
		for _, p := range m.held {
			C.free(p)
		}
		m.held = nil
		m.ctx.release()
		runtime.SetFinalizer(m, nil)
	}
	return nil
}

// Options returns the options the comm was created with.
func (m *Comm) Options() CommOptions { return m.opt }

// Pending returns how many ranks contributed to the in-process round in progress (0 when none is
// open).
func (m *Comm) Pending() (int, error) {
	const op = "Comm.Pending"
	p, err := m.h.shared(op)
	if err != nil {
		return 0, err
	}
	defer m.h.mu.RUnlock()
	var n C.int32_t
	err = call(op, func() C.kvp_status { return C.kvp_comm_pending(p, &n) })
	return int(n), err
}

// staged is one partial copied into C memory: its data, its descriptions and room for its
// DLTensors, all in one allocation the library may point into until the round completes.
type staged struct {
	base             unsafe.Pointer
	out, lse         unsafe.Pointer
	od, ld           *C.kvpg_desc
	tensors          *C.DLTensor
	outBytes, lBytes int
	goOut, goLse     unsafe.Pointer
}

func stage(op string, rank int, out Tensor, lse []float32) (*staged, error) {
	od, optr, err := out.desc(op, fmt.Sprintf("out[%d]", rank))
	if err != nil {
		return nil, err
	}
	if len(out.shape) != 3 {
		return nil, invalid(op, "out[%d]: ndim=%d, expected 3 [T, H, D]", rank, len(out.shape))
	}
	ld, lptr, err := optionalDesc(op, fmt.Sprintf("lse[%d]", rank), lse, out.shape[:2])
	if err != nil {
		return nil, err
	}
	if ld == nil {
		return nil, invalid(op, "lse[%d] is required", rank)
	}
	s := &staged{outBytes: int(out.shape[0]*out.shape[1]*out.shape[2]) * out.dtype.Size(), lBytes: len(lse) * 4,
		goOut: optr, goLse: lptr}
	descBytes := int(2 * C.sizeof_kvpg_desc)
	tensorBytes := int(2 * C.sizeof_DLTensor)
	align := func(n int) int { return (n + 63) &^ 63 }
	total := align(descBytes) + align(tensorBytes) + align(s.outBytes) + align(s.lBytes)
	s.base = C.calloc(1, C.size_t(total))
	if s.base == nil {
		return nil, &Error{Op: op, Code: StatusOutOfMemory, Message: fmt.Sprintf("staging %d bytes", total)}
	}
	at := func(off int) unsafe.Pointer { return unsafe.Add(s.base, off) }
	s.od = (*C.kvpg_desc)(at(0))
	s.ld = (*C.kvpg_desc)(at(int(C.sizeof_kvpg_desc)))
	*s.od, *s.ld = od, *ld
	s.tensors = (*C.DLTensor)(at(align(descBytes)))
	s.out = at(align(descBytes) + align(tensorBytes))
	s.lse = at(align(descBytes) + align(tensorBytes) + align(s.outBytes))
	if s.outBytes > 0 {
		C.memcpy(s.out, optr, C.size_t(s.outBytes))
	}
	if s.lBytes > 0 {
		C.memcpy(s.lse, lptr, C.size_t(s.lBytes))
	}
	return s, nil
}

// back copies the merged state into the caller's slices and frees the staging memory.
func (s *staged) back() {
	if s.outBytes > 0 {
		C.memcpy(s.goOut, s.out, C.size_t(s.outBytes))
	}
	if s.lBytes > 0 {
		C.memcpy(s.goLse, s.lse, C.size_t(s.lBytes))
	}
	C.free(s.base)
}

func (m *Comm) usable(op string) error {
	if m.poisoned {
		return &Error{Op: op, Code: StatusFailedPrecondition,
			Message: "an earlier MergeAll failed part way and left its round open; close this comm"}
	}
	return nil
}

// MergeAll merges one whole in-process round: outs[r] ([T, H, D] of OutDType) and lses[r] ([T, H]
// natural log, -Inf for rows that saw no key) are rank r's partial, exactly NumRanks of them; on
// success every outs[r] and lses[r] holds the merge over all ranks. ErrInvalidArgument for shapes,
// dtypes or counts that differ from the comm's or each other's.
func (m *Comm) MergeAll(outs []Tensor, lses [][]float32) error {
	const op = "Comm.MergeAll"
	if m.opt.Kind != CommInProcess {
		return &Error{Op: op, Code: StatusNotSupported, Message: "needs an in-process comm (an NCCL comm merges one rank per handle: Merge)"}
	}
	if len(outs) != m.opt.NumRanks || len(lses) != m.opt.NumRanks {
		return invalid(op, "%d outs and %d lses for a comm of NumRanks=%d", len(outs), len(lses), m.opt.NumRanks)
	}
	for r := range outs {
		if outs[r].dtype != outs[0].dtype || !equalShape(outs[r].shape, outs[0].shape) {
			return invalid(op, "out[%d] is %v %v but out[0] is %v %v", r, outs[r].dtype, outs[r].shape, outs[0].dtype, outs[0].shape)
		}
	}
	p, err := m.h.exclusive(op)
	if err != nil {
		return err
	}
	defer m.h.mu.Unlock()
	if err := m.usable(op); err != nil {
		return err
	}
	parts := make([]*staged, 0, len(outs))
	defer func() {
		for _, s := range parts {
			if s.base != nil {
				C.free(s.base)
			}
		}
	}()
	for r := range outs {
		s, err := stage(op, r, outs[r], lses[r])
		if err != nil {
			return err
		}
		parts = append(parts, s)
	}
	n := len(parts)
	raw := C.calloc(C.size_t(2*n), C.size_t(unsafe.Sizeof(unsafe.Pointer(nil))))
	defer C.free(raw)
	outPtrs := unsafe.Slice((*unsafe.Pointer)(raw), 2*n)
	for r, s := range parts {
		outPtrs[r], outPtrs[n+r] = s.out, s.lse
	}
	// The DLTensors of all ranks in one C array (the helper fills them in rank order).
	tensors := (*C.DLTensor)(C.calloc(C.size_t(2*n), C.sizeof_DLTensor))
	var failed C.int32_t
	err = call(op, func() C.kvp_status {
		return C.kvpg_comm_merge_all(p, C.int32_t(n), &outPtrs[0], parts[0].od, &outPtrs[n], parts[0].ld, tensors, &failed)
	})
	if err != nil {
		if failed > 0 {
			// Ranks before the failed one are held by an open round: keep their memory until
			// Close and refuse every later merge.
			m.poisoned = true
			m.held = append(m.held, unsafe.Pointer(tensors))
			for _, s := range parts {
				m.held = append(m.held, s.base)
				s.base = nil
			}
		} else {
			C.free(unsafe.Pointer(tensors))
		}
		return err
	}
	C.free(unsafe.Pointer(tensors))
	for _, s := range parts {
		s.back()
		s.base = nil
	}
	return nil
}

func equalShape(a, b []int64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// Merge contributes rank's partial and receives the merge in place where the call itself completes
// it: an NCCL comm (each rank with its own handle) or an in-process comm of one rank.
// ErrFailedPrecondition on an in-process comm of several ranks (use MergeAll).
func (m *Comm) Merge(rank int, out Tensor, lse []float32) error {
	const op = "Comm.Merge"
	if m.opt.Kind == CommInProcess && m.opt.NumRanks != 1 {
		return &Error{Op: op, Code: StatusFailedPrecondition, Message: fmt.Sprintf(
			"an in-process comm of NumRanks=%d completes a round only with every rank's partial: use MergeAll", m.opt.NumRanks)}
	}
	return m.contribute(op, rank, out, lse, false)
}

// contribute stages one partial in C memory and contributes it. With keep, the staging memory is
// held by the comm until Close whether or not the round completes (for tests of open rounds).
func (m *Comm) contribute(op string, rank int, out Tensor, lse []float32, keep bool) error {
	if int(int32(rank)) != rank {
		return invalid(op, "rank=%d does not fit int32", rank)
	}
	p, err := m.h.exclusive(op)
	if err != nil {
		return err
	}
	defer m.h.mu.Unlock()
	if err := m.usable(op); err != nil {
		return err
	}
	s, err := stage(op, rank, out, lse)
	if err != nil {
		return err
	}
	err = call(op, func() C.kvp_status {
		return C.kvpg_comm_contribute(p, C.int32_t(rank), s.out, s.od, s.lse, s.ld, s.tensors)
	})
	if keep {
		m.held = append(m.held, s.base)
		return err
	}
	if err != nil {
		C.free(s.base)
		return err
	}
	s.back()
	return nil
}
