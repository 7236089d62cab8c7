package kvplug

/*
#include "kvplug_go.h"
*/
import "C"

import (
	"runtime"
	"unsafe"
)

// BlockManagerOptions configures a block manager (kvp_block_manager_options).
type BlockManagerOptions struct {
	BlockSize           int     // tokens per block, in [1, 65536]
	NumDeviceBlocks     int     // > 0
	NumHostBlocks       int     // >= 0: swap space on the host
	EnablePrefixCaching bool    // publish full computed blocks for reuse by equal prefixes
	Watermark           float64 // in [0, 1): fraction of device blocks admission must leave free
	NumStateSlots       int     // >= 0: if > 0 each sequence gets a state slot at allocate/fork
	HashSeed            uint64  // seeds the block hash chain
}

// BlockCopy is one block copy (src -> dst): the unit of copy-on-write and swap plans.
type BlockCopy struct {
	Src, Dst int32
}

// BlockCopy must match kvp_block_copy exactly: slices of it are passed to C as arrays.
var _ [unsafe.Sizeof(BlockCopy{}) - C.sizeof_kvp_block_copy]struct{}
var _ [C.sizeof_kvp_block_copy - unsafe.Sizeof(BlockCopy{})]struct{}

func copiesPtr(c []BlockCopy) *C.kvp_block_copy {
	if len(c) == 0 {
		return nil
	}
	return (*C.kvp_block_copy)(unsafe.Pointer(&c[0]))
}

// AllocVerdict answers BlockManager.CanAllocate.
type AllocVerdict int32

const (
	AllocOK    AllocVerdict = C.KVP_ALLOC_OK    // can allocate now
	AllocLater AllocVerdict = C.KVP_ALLOC_LATER // cannot now; can once other sequences free blocks
	AllocNever AllocVerdict = C.KVP_ALLOC_NEVER // can never fit in this pool
)

func (v AllocVerdict) String() string {
	switch v {
	case AllocOK:
		return "ok"
	case AllocLater:
		return "later"
	case AllocNever:
		return "never"
	}
	return "AllocVerdict(?)"
}

// BlockManagerStats is a snapshot of the pool (kvp_block_manager_stats).
type BlockManagerStats struct {
	NumDeviceBlocks     int
	NumFreeBlocks       int // never used, or evicted: no content
	NumCachedFreeBlocks int // unreferenced but holding a cached prefix: reusable or evictable
	NumUsedBlocks       int // referenced by at least one sequence
	NumHostBlocks       int
	NumFreeHostBlocks   int
	NumSequences        int // on device or swapped out
	NumSwappedSequences int
	PrefixQueriedBlocks int64 // full blocks looked up in the prefix cache
	PrefixHitBlocks     int64 // of those, found
	NumEvictions        int64
}

// BlockManager is the host-side bookkeeping of a paged KV cache (kvp_block_manager). Mutating
// calls hold its lock exclusively, queries shared (see the package comment).
type BlockManager struct {
	h         handle[C.kvp_block_manager]
	blockSize int
}

func int32Ptr(s []int32) *C.int32_t {
	if len(s) == 0 {
		return nil
	}
	return (*C.int32_t)(unsafe.Pointer(&s[0]))
}

func int64Ptr(s []int64) *C.int64_t {
	if len(s) == 0 {
		return nil
	}
	return (*C.int64_t)(unsafe.Pointer(&s[0]))
}

func uint64Ptr(s []uint64) *C.uint64_t {
	if len(s) == 0 {
		return nil
	}
	return (*C.uint64_t)(unsafe.Pointer(&s[0]))
}

func cbool(b bool) C.int32_t {
	if b {
		return 1
	}
	return 0
}

// NewBlockManager creates a block manager. It needs no context and no device.
func NewBlockManager(o BlockManagerOptions) (*BlockManager, error) {
	const op = "NewBlockManager"
	if err := checkABI(); err != nil {
		return nil, err
	}
	for _, v := range []struct {
		name string
		val  int
	}{{"BlockSize", o.BlockSize}, {"NumDeviceBlocks", o.NumDeviceBlocks}, {"NumHostBlocks", o.NumHostBlocks},
		{"NumStateSlots", o.NumStateSlots}} {
		if int(int32(v.val)) != v.val {
			return nil, invalid(op, "%s=%d does not fit int32", v.name, v.val)
		}
	}
	co := C.kvp_block_manager_options{
		struct_size:           C.sizeof_kvp_block_manager_options,
		block_size:            C.int32_t(o.BlockSize),
		num_device_blocks:     C.int32_t(o.NumDeviceBlocks),
		num_host_blocks:       C.int32_t(o.NumHostBlocks),
		enable_prefix_caching: cbool(o.EnablePrefixCaching),
		watermark:             C.double(o.Watermark),
		num_state_slots:       C.int32_t(o.NumStateSlots),
		hash_seed:             C.uint64_t(o.HashSeed),
	}
	var ptr *C.kvp_block_manager
	if err := call(op, func() C.kvp_status { return C.kvp_block_manager_create(&co, &ptr) }); err != nil {
		return nil, err
	}
	m := &BlockManager{blockSize: o.BlockSize}
	m.h.ptr, m.h.kind = ptr, "BlockManager"
	runtime.SetFinalizer(m, func(m *BlockManager) { _ = m.Close() })
	return m, nil
}

// Close destroys the block manager. Idempotent.
func (m *BlockManager) Close() error {
	if m.h.close(func(p *C.kvp_block_manager) { C.kvp_block_manager_destroy(p) }) {
		runtime.SetFinalizer(m, nil)
	}
	return nil
}

// BlockSize is the tokens per block the manager was created with.
func (m *BlockManager) BlockSize() int { return m.blockSize }

// tokens checks an optional token-id slice against numTokens.
func checkTokens(op string, numTokens int, ids []int32) error {
	if numTokens < 0 {
		return invalid(op, "numTokens=%d must be >= 0", numTokens)
	}
	if ids != nil && len(ids) != numTokens {
		return invalid(op, "len(tokenIDs)=%d but numTokens=%d", len(ids), numTokens)
	}
	return nil
}

// CanAllocate tells whether a new sequence of numTokens prompt tokens could be allocated now.
// tokenIDs may be nil (no prefix-cache credit); otherwise len(tokenIDs) must be numTokens, and
// cached prefix blocks count as free.
func (m *BlockManager) CanAllocate(numTokens int, tokenIDs []int32, extraKey uint64) (AllocVerdict, error) {
	const op = "BlockManager.CanAllocate"
	if err := checkTokens(op, numTokens, tokenIDs); err != nil {
		return 0, err
	}
	p, err := m.h.shared(op)
	if err != nil {
		return 0, err
	}
	defer m.h.mu.RUnlock()
	var v C.kvp_alloc_verdict
	err = call(op, func() C.kvp_status {
		return C.kvp_block_manager_can_allocate(p, int32Ptr(tokenIDs), C.int64_t(numTokens), C.uint64_t(extraKey), &v)
	})
	return AllocVerdict(v), err
}

// Allocate creates sequence seqID holding numTokens (>= 1) prompt tokens, reusing cached prefix
// blocks, and returns how many leading tokens already have K/V in the cache (a multiple of the
// block size, always < numTokens). tokenIDs (len numTokens) may be nil only without prefix
// caching. ErrAlreadyExists, ErrNoFreeBlocks (nothing changed).
func (m *BlockManager) Allocate(seqID uint64, numTokens int, tokenIDs []int32, extraKey uint64) (int, error) {
	const op = "BlockManager.Allocate"
	if err := checkTokens(op, numTokens, tokenIDs); err != nil {
		return 0, err
	}
	p, err := m.h.exclusive(op)
	if err != nil {
		return 0, err
	}
	defer m.h.mu.Unlock()
	var cached C.int64_t
	err = call(op, func() C.kvp_status {
		return C.kvp_block_manager_allocate(p, C.uint64_t(seqID), int32Ptr(tokenIDs), C.int64_t(numTokens),
			C.uint64_t(extraKey), &cached)
	})
	return int(cached), err
}

// StarLayout says where a sequence's Star Attention context lies (kvp_star_layout, since ABI 0.4).
type StarLayout struct {
	ContextLen       int // >= 0: tokens [0, ContextLen) are context
	ContextBlockSize int // > 0, a multiple of the manager's block size
	AnchorSize       int // in [1, ContextBlockSize]: the first AnchorSize tokens
}

// AllocateStar is Allocate with Star keys for the context: a context block is keyed by the anchor,
// its own tokens and its start position, so blocks after a changed middle block are still reused.
// cachedBlocks has one entry per block of the sequence, true where its K/V is already cached (hits
// need not be leading: recompute only the Star blocks with false, in increasing order, then
// MarkComputed as usual); cachedTokens counts the tokens in those blocks. The last token is never
// served from the cache. ErrInvalidArgument for the layout; otherwise as Allocate.
func (m *BlockManager) AllocateStar(seqID uint64, numTokens int, tokenIDs []int32, extraKey uint64,
	layout StarLayout) (cachedBlocks []bool, cachedTokens int, err error) {
	const op = "BlockManager.AllocateStar"
	if err := checkTokens(op, numTokens, tokenIDs); err != nil {
		return nil, 0, err
	}
	for _, v := range []int{layout.ContextBlockSize, layout.AnchorSize} {
		if int(int32(v)) != v {
			return nil, 0, invalid(op, "layout value %d does not fit int32", v)
		}
	}
	p, err := m.h.exclusive(op)
	if err != nil {
		return nil, 0, err
	}
	defer m.h.mu.Unlock()
	l := C.kvp_star_layout{
		struct_size:        C.sizeof_kvp_star_layout,
		context_len:        C.int64_t(layout.ContextLen),
		context_block_size: C.int32_t(layout.ContextBlockSize),
		anchor_size:        C.int32_t(layout.AnchorSize),
	}
	// ceil(numTokens / block_size) flags; at least one so the pointer is never NULL.
	numBlocks := 0
	if numTokens >= 1 && m.blockSize > 0 {
		numBlocks = (numTokens + m.blockSize - 1) / m.blockSize
	}
	flags := make([]uint8, numBlocks+1)
	var cached C.int64_t
	err = call(op, func() C.kvp_status {
		return C.kvp_block_manager_allocate_star(p, C.uint64_t(seqID), int32Ptr(tokenIDs), C.int64_t(numTokens),
			C.uint64_t(extraKey), &l, (*C.uint8_t)(unsafe.Pointer(&flags[0])), &cached)
	})
	if err != nil {
		return nil, 0, err
	}
	cachedBlocks = make([]bool, numBlocks)
	for i := range cachedBlocks {
		cachedBlocks[i] = flags[i] != 0
	}
	return cachedBlocks, int(cached), nil
}

// CanAppend tells whether numTokens more tokens could be appended to seqID now.
func (m *BlockManager) CanAppend(seqID uint64, numTokens int) (bool, error) {
	const op = "BlockManager.CanAppend"
	p, err := m.h.shared(op)
	if err != nil {
		return false, err
	}
	defer m.h.mu.RUnlock()
	var can C.int32_t
	err = call(op, func() C.kvp_status {
		return C.kvp_block_manager_can_append(p, C.uint64_t(seqID), C.int64_t(numTokens), &can)
	})
	return can != 0, err
}

// Append appends numTokens (>= 1) tokens to seqID (tokenIDs, len numTokens, may be nil only
// without prefix caching). If the sequence's last block was shared (after a fork) and partially
// filled it is first replaced by a private copy: copyNeeded is true and the caller must perform
// copy (KvCache.CopyBlocks) before writing K/V. ErrNoFreeBlocks leaves the sequence unchanged.
func (m *BlockManager) Append(seqID uint64, numTokens int, tokenIDs []int32) (copy BlockCopy, copyNeeded bool, err error) {
	const op = "BlockManager.Append"
	if err := checkTokens(op, numTokens, tokenIDs); err != nil {
		return BlockCopy{}, false, err
	}
	p, err := m.h.exclusive(op)
	if err != nil {
		return BlockCopy{}, false, err
	}
	defer m.h.mu.Unlock()
	var c C.kvp_block_copy
	var needed C.int32_t
	err = call(op, func() C.kvp_status {
		return C.kvp_block_manager_append(p, C.uint64_t(seqID), int32Ptr(tokenIDs), C.int64_t(numTokens), &c, &needed)
	})
	if err != nil || needed == 0 {
		return BlockCopy{}, false, err
	}
	return BlockCopy{Src: int32(c.src), Dst: int32(c.dst)}, true, nil
}

// MarkComputed reports the K/V of the first numComputed tokens of seqID written, publishing its
// full blocks to the prefix cache. ErrOutOfRange beyond the sequence's length;
// ErrFailedPrecondition if swapped out.
func (m *BlockManager) MarkComputed(seqID uint64, numComputed int) error {
	const op = "BlockManager.MarkComputed"
	p, err := m.h.exclusive(op)
	if err != nil {
		return err
	}
	defer m.h.mu.Unlock()
	return call(op, func() C.kvp_status {
		return C.kvp_block_manager_mark_computed(p, C.uint64_t(seqID), C.int64_t(numComputed))
	})
}

// Fork creates childID sharing every block of parentID (reference counted; copy on write).
func (m *BlockManager) Fork(parentID, childID uint64) error {
	const op = "BlockManager.Fork"
	p, err := m.h.exclusive(op)
	if err != nil {
		return err
	}
	defer m.h.mu.Unlock()
	return call(op, func() C.kvp_status { return C.kvp_block_manager_fork(p, C.uint64_t(parentID), C.uint64_t(childID)) })
}

// Free releases seqID and its blocks and state slot. ErrNotFound if unknown.
func (m *BlockManager) Free(seqID uint64) error {
	const op = "BlockManager.Free"
	p, err := m.h.exclusive(op)
	if err != nil {
		return err
	}
	defer m.h.mu.Unlock()
	return call(op, func() C.kvp_status { return C.kvp_block_manager_free(p, C.uint64_t(seqID)) })
}

// NumTokens returns the number of tokens of seqID.
func (m *BlockManager) NumTokens(seqID uint64) (int, error) {
	const op = "BlockManager.NumTokens"
	p, err := m.h.shared(op)
	if err != nil {
		return 0, err
	}
	defer m.h.mu.RUnlock()
	var n C.int64_t
	err = call(op, func() C.kvp_status { return C.kvp_block_manager_num_tokens(p, C.uint64_t(seqID), &n) })
	return int(n), err
}

// BlockTable returns the physical block ids of seqID.
func (m *BlockManager) BlockTable(seqID uint64) ([]int32, error) {
	const op = "BlockManager.BlockTable"
	p, err := m.h.shared(op)
	if err != nil {
		return nil, err
	}
	defer m.h.mu.RUnlock()
	buf := make([]int32, 16)
	for {
		var n C.int32_t
		err = call(op, func() C.kvp_status {
			return C.kvp_block_manager_block_table(p, C.uint64_t(seqID), int32Ptr(buf), C.int32_t(len(buf)), &n)
		})
		// Too small: the library reports the needed length; the table cannot change meanwhile
		// (the lock excludes mutating calls).
		if err != nil && err.(*Error).Code == StatusOutOfRange && int(n) > len(buf) {
			buf = make([]int32, int(n))
			continue
		}
		if err != nil {
			return nil, err
		}
		return buf[:int(n):int(n)], nil
	}
}

// BlockTables fills table ([len(seqIDs), maxBlocksPerSeq] row-major) with the block tables of
// seqIDs, padded with -1, and seqLens (optional: nil or len(seqIDs)) with their token counts:
// the dense block table of a step. ErrOutOfRange if a table exceeds maxBlocksPerSeq.
func (m *BlockManager) BlockTables(seqIDs []uint64, maxBlocksPerSeq int, table []int32, seqLens []int32) error {
	const op = "BlockManager.BlockTables"
	if maxBlocksPerSeq <= 0 || int(int32(maxBlocksPerSeq)) != maxBlocksPerSeq {
		return invalid(op, "maxBlocksPerSeq=%d must be in [1, 2^31)", maxBlocksPerSeq)
	}
	if len(seqIDs) > 1<<31-1 || len(table) != len(seqIDs)*maxBlocksPerSeq {
		return invalid(op, "len(table)=%d but len(seqIDs)*maxBlocksPerSeq=%d", len(table), len(seqIDs)*maxBlocksPerSeq)
	}
	if seqLens != nil && len(seqLens) != len(seqIDs) {
		return invalid(op, "len(seqLens)=%d but len(seqIDs)=%d", len(seqLens), len(seqIDs))
	}
	if len(seqIDs) == 0 {
		return nil
	}
	p, err := m.h.shared(op)
	if err != nil {
		return err
	}
	defer m.h.mu.RUnlock()
	return call(op, func() C.kvp_status {
		return C.kvp_block_manager_block_tables(p, uint64Ptr(seqIDs), C.int32_t(len(seqIDs)), int32Ptr(table),
			C.int32_t(maxBlocksPerSeq), int32Ptr(seqLens))
	})
}

// SlotMapping fills slots with the cache slots (block_id * block_size + offset) of positions
// [start, start+len(slots)) of seqID.
func (m *BlockManager) SlotMapping(seqID uint64, start int, slots []int64) error {
	const op = "BlockManager.SlotMapping"
	p, err := m.h.shared(op)
	if err != nil {
		return err
	}
	defer m.h.mu.RUnlock()
	return call(op, func() C.kvp_status {
		return C.kvp_block_manager_slot_mapping(p, C.uint64_t(seqID), C.int64_t(start), C.int64_t(len(slots)), int64Ptr(slots))
	})
}

// StateSlot returns the state slot of seqID (-1 when the manager has no state slots).
func (m *BlockManager) StateSlot(seqID uint64) (int, error) {
	const op = "BlockManager.StateSlot"
	p, err := m.h.shared(op)
	if err != nil {
		return 0, err
	}
	defer m.h.mu.RUnlock()
	var s C.int32_t
	err = call(op, func() C.kvp_status { return C.kvp_block_manager_state_slot(p, C.uint64_t(seqID), &s) })
	return int(s), err
}

type swapFunc func(*C.kvp_block_manager, C.uint64_t, *C.kvp_block_copy, C.int32_t, *C.int32_t) C.kvp_status

func (m *BlockManager) swap(op string, seqID uint64, f swapFunc) ([]BlockCopy, error) {
	p, err := m.h.exclusive(op)
	if err != nil {
		return nil, err
	}
	defer m.h.mu.Unlock()
	// A plan has one copy per block. If the guess is too small the library changes nothing and
	// reports the needed length, and the lock keeps it from changing before the retry.
	plan := make([]BlockCopy, 32)
	for {
		var n C.int32_t
		err := call(op, func() C.kvp_status { return f(p, C.uint64_t(seqID), copiesPtr(plan), C.int32_t(len(plan)), &n) })
		if err != nil && err.(*Error).Code == StatusOutOfRange && int(n) > len(plan) {
			plan = make([]BlockCopy, int(n))
			continue
		}
		if err != nil {
			return nil, err
		}
		return plan[:int(n):int(n)], nil
	}
}

// SwapOut moves seqID to host blocks and returns the (device block -> host block) copies the
// caller performs with KvCache.SwapOut before the device blocks are reused. ErrNoFreeBlocks if
// the host pool is too small; ErrFailedPrecondition if already swapped out.
func (m *BlockManager) SwapOut(seqID uint64) ([]BlockCopy, error) {
	return m.swap("BlockManager.SwapOut", seqID, func(p *C.kvp_block_manager, id C.uint64_t, plan *C.kvp_block_copy, c C.int32_t, n *C.int32_t) C.kvp_status {
		return C.kvp_block_manager_swap_out(p, id, plan, c, n)
	})
}

// SwapIn brings seqID back to device blocks and returns the (host block -> device block) copies
// for KvCache.SwapIn.
func (m *BlockManager) SwapIn(seqID uint64) ([]BlockCopy, error) {
	return m.swap("BlockManager.SwapIn", seqID, func(p *C.kvp_block_manager, id C.uint64_t, plan *C.kvp_block_copy, c C.int32_t, n *C.int32_t) C.kvp_status {
		return C.kvp_block_manager_swap_in(p, id, plan, c, n)
	})
}

// IsSwapped reports whether seqID is swapped out.
func (m *BlockManager) IsSwapped(seqID uint64) (bool, error) {
	const op = "BlockManager.IsSwapped"
	p, err := m.h.shared(op)
	if err != nil {
		return false, err
	}
	defer m.h.mu.RUnlock()
	var s C.int32_t
	err = call(op, func() C.kvp_status { return C.kvp_block_manager_is_swapped(p, C.uint64_t(seqID), &s) })
	return s != 0, err
}

// Stats returns a snapshot of the pool.
func (m *BlockManager) Stats() (BlockManagerStats, error) {
	const op = "BlockManager.Stats"
	p, err := m.h.shared(op)
	if err != nil {
		return BlockManagerStats{}, err
	}
	defer m.h.mu.RUnlock()
	s := C.kvp_block_manager_stats{struct_size: C.sizeof_kvp_block_manager_stats}
	if err := call(op, func() C.kvp_status { return C.kvp_block_manager_stats_get(p, &s) }); err != nil {
		return BlockManagerStats{}, err
	}
	return BlockManagerStats{
		NumDeviceBlocks:     int(s.num_device_blocks),
		NumFreeBlocks:       int(s.num_free_blocks),
		NumCachedFreeBlocks: int(s.num_cached_free_blocks),
		NumUsedBlocks:       int(s.num_used_blocks),
		NumHostBlocks:       int(s.num_host_blocks),
		NumFreeHostBlocks:   int(s.num_free_host_blocks),
		NumSequences:        int(s.num_sequences),
		NumSwappedSequences: int(s.num_swapped_sequences),
		PrefixQueriedBlocks: int64(s.prefix_queried_blocks),
		PrefixHitBlocks:     int64(s.prefix_hit_blocks),
		NumEvictions:        int64(s.num_evictions),
	}, nil
}
