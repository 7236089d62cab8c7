package kvplug_test

import (
	"errors"
	"reflect"
	"testing"

	"kvplug.dev/kvplug/kvplug"
)

func mustBM(t *testing.T, o kvplug.BlockManagerOptions) *kvplug.BlockManager {
	t.Helper()
	bm, err := kvplug.NewBlockManager(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bm.Close() })
	return bm
}

// must(f(...))(t) is f's value, or a fatal error (Go cannot spread f's results after t).
func must[T any](v T, err error) func(t *testing.T) T {
	return func(t *testing.T) T {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
}

func seqTokens(prefix []int32, base int32, n int) []int32 {
	out := append([]int32(nil), prefix...)
	for i := 0; i < n; i++ {
		out = append(out, base+int32(i))
	}
	return out
}

// Prefix caching: full blocks are shared only once MarkComputed says their K/V is written, only
// under the same extra key, never for the whole prompt; and a hit is real sharing: attention of
// the new sequence over blocks another sequence wrote matches the reference.
func TestPrefixCachingHitsAfterMarkComputed(t *testing.T) {
	c := baseConfig()
	e := mustEnv(t, c)
	// The env's manager has prefix caching off; this test swaps in one with it on.
	e.bm.Close()
	e.bm = mustBM(t, kvplug.BlockManagerOptions{BlockSize: c.blockSize, NumDeviceBlocks: c.numBlocks, EnablePrefixCaching: true})
	bm := e.bm
	system := seqTokens(nil, 1000, 48) // three full blocks

	a := seqTokens(system, 5000, 13)
	if cached := must(bm.Allocate(1, len(a), a, 0))(t); cached != 0 {
		t.Fatalf("first request: %d cached tokens, want 0", cached)
	}
	e.grow(1, len(a))
	if err := e.writeDirect(1, 0, len(a)); err != nil {
		t.Fatal(err)
	}
	// Before MarkComputed the blocks may be unwritten (chunked prefill): no hit.
	b := seqTokens(system, 6000, 7)
	if cached := must(bm.Allocate(2, len(b), b, 0))(t); cached != 0 {
		t.Fatalf("before MarkComputed: %d cached tokens, want 0", cached)
	}
	if err := bm.MarkComputed(1, len(a)); err != nil {
		t.Fatal(err)
	}
	before := must(bm.Stats())(t)
	cseq := seqTokens(system, 7000, 20)
	if cached := must(bm.Allocate(3, len(cseq), cseq, 0))(t); cached != 48 {
		t.Fatalf("after MarkComputed: %d cached tokens, want 48", cached)
	}
	after := must(bm.Stats())(t)
	if after.PrefixHitBlocks-before.PrefixHitBlocks != 3 {
		t.Fatalf("prefix hits %d -> %d, want +3", before.PrefixHitBlocks, after.PrefixHitBlocks)
	}
	ta, tb, tc := must(bm.BlockTable(1))(t), must(bm.BlockTable(2))(t), must(bm.BlockTable(3))(t)
	if !reflect.DeepEqual(ta[:3], tc[:3]) {
		t.Fatalf("hit does not share blocks: %v vs %v", ta, tc)
	}
	if reflect.DeepEqual(ta[:3], tb[:3]) {
		t.Fatalf("the pre-MarkComputed request shares blocks: %v vs %v", ta, tb)
	}
	// Data-level check: sequence 3's first 48 rows are sequence 1's, written once by sequence 1.
	// Only its 20 new tokens are written (through WriteKV in the step).
	e.k[3], e.v[3] = make([][]float32, c.layers), make([][]float32, c.layers)
	for l := 0; l < c.layers; l++ {
		e.k[3][l] = append([]float32(nil), e.k[1][l][:48*e.rowLen()]...)
		e.v[3][l] = append([]float32(nil), e.v[1][l][:48*e.rowLen()]...)
	}
	e.grow(3, 20)
	res, err := e.step([]item{{3, 20}}, false)
	if err != nil {
		t.Fatal(err)
	}
	if res.maxErr > 1e-5 {
		t.Fatalf("attention over a shared prefix: max |err| %.3g", res.maxErr)
	}

	// Another tenant (extra key) does not see the prefix.
	if cached := must(bm.Allocate(4, len(cseq), cseq, 99))(t); cached != 0 {
		t.Fatalf("other extra key: %d cached tokens, want 0", cached)
	}
	// A prompt that is exactly the cached prefix still computes its last token.
	if cached := must(bm.Allocate(5, len(system), system, 0))(t); cached != 32 {
		t.Fatalf("prompt == prefix: %d cached tokens, want 32 (always < the prompt)", cached)
	}
	// Freed, the prefix blocks stay cached and reusable.
	for _, id := range []uint64{1, 2, 3, 4, 5} {
		if err := bm.Free(id); err != nil {
			t.Fatal(err)
		}
	}
	st := must(bm.Stats())(t)
	if st.NumUsedBlocks != 0 || st.NumCachedFreeBlocks < 3 {
		t.Fatalf("after freeing everything: %+v", st)
	}
	if cached := must(bm.Allocate(6, len(cseq), cseq, 0))(t); cached != 48 {
		t.Fatalf("after the owner was freed: %d cached tokens, want 48", cached)
	}
}

// Unreferenced cached blocks are evicted when free blocks run out, and then no longer hit.
func TestPrefixEviction(t *testing.T) {
	bm := mustBM(t, kvplug.BlockManagerOptions{BlockSize: 4, NumDeviceBlocks: 4, EnablePrefixCaching: true})
	a := seqTokens(nil, 1, 16)
	must(bm.Allocate(1, 16, a, 0))(t)
	if err := bm.MarkComputed(1, 16); err != nil {
		t.Fatal(err)
	}
	if err := bm.Free(1); err != nil {
		t.Fatal(err)
	}
	if st := must(bm.Stats())(t); st.NumCachedFreeBlocks != 4 || st.NumEvictions != 0 {
		t.Fatalf("after free: %+v", st)
	}
	b := seqTokens(nil, 100, 16)
	if cached := must(bm.Allocate(2, 16, b, 0))(t); cached != 0 {
		t.Fatalf("unrelated prompt: %d cached", cached)
	}
	if st := must(bm.Stats())(t); st.NumEvictions != 4 || st.NumCachedFreeBlocks != 0 {
		t.Fatalf("after filling the pool: %+v, want 4 evictions", st)
	}
	if err := bm.Free(2); err != nil {
		t.Fatal(err)
	}
	if cached := must(bm.Allocate(3, 16, a, 0))(t); cached != 0 {
		t.Fatalf("evicted prefix still hit: %d cached", cached)
	}
}

// Fork shares every block; the first append to a partially filled shared block returns a copy the
// caller must perform. With CopyBlocks the child attends over the parent's K/V; without it (the
// negative control) it does not, so the check can fail. The parent, sole owner again, appends
// without a copy, and its K/V is untouched by the child's writes.
func TestForkCopyOnWrite(t *testing.T) {
	e := mustEnv(t, baseConfig())
	bm := e.bm
	if err := e.admit(1, 20); err != nil { // blocks: one full, one holding 4 of 16
		t.Fatal(err)
	}
	if err := e.writeDirect(1, 0, 20); err != nil {
		t.Fatal(err)
	}
	parent := must(bm.BlockTable(1))(t)
	for _, child := range []uint64{2, 3} {
		if err := bm.Fork(1, child); err != nil {
			t.Fatal(err)
		}
		e.fork(1, child)
		if got := must(bm.BlockTable(child))(t); !reflect.DeepEqual(got, parent) {
			t.Fatalf("fork %d: table %v, parent %v", child, got, parent)
		}
	}
	if err := bm.Fork(1, 2); !errors.Is(err, kvplug.ErrAlreadyExists) {
		t.Fatalf("fork onto an existing id: %v", err)
	}

	cp, needed := mustCopy(t, bm, 2)
	child := must(bm.BlockTable(2))(t)
	if !needed || cp.Src != parent[1] || cp.Dst != child[1] || cp.Dst == cp.Src || child[0] != parent[0] {
		t.Fatalf("COW: copy %+v needed %v; parent %v child %v", cp, needed, parent, child)
	}
	if err := e.cache.CopyBlocks([]kvplug.BlockCopy{cp}); err != nil {
		t.Fatal(err)
	}
	e.grow(2, 1)
	if res, err := e.step([]item{{2, 1}}, false); err != nil || res.maxErr > 1e-5 {
		t.Fatalf("child after COW: max |err| %.3g, %v", res.maxErr, err)
	}

	// Negative control: child 3 skips the copy, so its new block lacks the parent's 4 tokens.
	if _, needed := mustCopy(t, bm, 3); !needed {
		t.Fatal("second child: no copy needed")
	}
	e.grow(3, 1)
	if res, err := e.step([]item{{3, 1}}, false); err != nil || res.maxErr < 1e-3 {
		t.Fatalf("without CopyBlocks the child still matched (max |err| %.3g, %v): the check cannot fail", res.maxErr, err)
	}

	// The parent owns its partial block alone now: no copy, and its K/V is intact.
	if _, needed := mustCopy(t, bm, 1); needed {
		t.Fatal("parent append after both children copied: copy requested")
	}
	e.grow(1, 1)
	if res, err := e.step([]item{{1, 1}}, false); err != nil || res.maxErr > 1e-5 {
		t.Fatalf("parent after the children's writes: max |err| %.3g, %v", res.maxErr, err)
	}

	// A fork at a block boundary needs no copy: the append opens a fresh block.
	if err := e.admit(10, 32); err != nil {
		t.Fatal(err)
	}
	if err := bm.Fork(10, 11); err != nil {
		t.Fatal(err)
	}
	if _, needed := mustCopy(t, bm, 11); needed {
		t.Fatal("append after a fork at a block boundary asked for a copy")
	}
}

func mustCopy(t *testing.T, bm *kvplug.BlockManager, id uint64) (kvplug.BlockCopy, bool) {
	t.Helper()
	cp, needed, err := bm.Append(id, 1, nil)
	if err != nil {
		t.Fatal(err)
	}
	return cp, needed
}

// Swap out and in: the plans map the sequence's device blocks to host blocks and back, the cache
// moves the bytes, and after the device blocks were overwritten by another sequence the swapped-in
// sequence attends correctly again.
func TestSwapOutIn(t *testing.T) {
	c := baseConfig()
	c.numBlocks, c.hostBlocks = 8, 8
	e := mustEnv(t, c)
	bm := e.bm
	if err := e.admit(1, 40); err != nil { // 3 blocks
		t.Fatal(err)
	}
	if err := e.writeDirect(1, 0, 40); err != nil {
		t.Fatal(err)
	}
	table := must(bm.BlockTable(1))(t)
	out := must(bm.SwapOut(1))(t)
	if len(out) != len(table) {
		t.Fatalf("swap-out plan %v for table %v", out, table)
	}
	for i, cp := range out {
		if cp.Src != table[i] {
			t.Fatalf("swap-out plan %v: src is not the table %v", out, table)
		}
	}
	if err := e.cache.SwapOut(out); err != nil {
		t.Fatal(err)
	}
	if swapped := must(bm.IsSwapped(1))(t); !swapped {
		t.Fatal("IsSwapped false after SwapOut")
	}
	if st := must(bm.Stats())(t); st.NumSwappedSequences != 1 || st.NumFreeHostBlocks != 5 || st.NumUsedBlocks != 0 {
		t.Fatalf("stats after swap-out: %+v", st)
	}
	// The host pages hold the bytes: key of token 0, head 0, element 0 of layer 0, in the host
	// block the plan named (KV-first layout: [2, blocks, block_size, heads, head_size]).
	host := must(e.cache.Snapshot(0, true))(t)
	if got, want := host.Float32At([5]int64{0, int64(out[0].Dst), 0, 0, 0}), e.k[1][0][0]; got != want {
		t.Fatalf("host block %d key[0] = %v, want %v", out[0].Dst, got, want)
	}
	if err := bm.MarkComputed(1, 40); !errors.Is(err, kvplug.ErrFailedPrecondition) {
		t.Fatalf("MarkComputed while swapped: %v", err)
	}
	if _, err := bm.SwapOut(1); !errors.Is(err, kvplug.ErrFailedPrecondition) {
		t.Fatalf("second SwapOut: %v", err)
	}
	// Another sequence takes every device block and overwrites them.
	if err := e.admit(2, 8*16); err != nil {
		t.Fatal(err)
	}
	if err := e.writeDirect(2, 0, 8*16); err != nil {
		t.Fatal(err)
	}
	if err := bm.Free(2); err != nil {
		t.Fatal(err)
	}
	in := must(bm.SwapIn(1))(t)
	if len(in) != len(out) {
		t.Fatalf("swap-in plan %v", in)
	}
	for i := range in {
		if in[i].Src != out[i].Dst {
			t.Fatalf("swap-in plan %v does not read the host blocks of %v", in, out)
		}
	}
	if err := e.cache.SwapIn(in); err != nil {
		t.Fatal(err)
	}
	if swapped := must(bm.IsSwapped(1))(t); swapped {
		t.Fatal("IsSwapped true after SwapIn")
	}
	if _, _, err := bm.Append(1, 1, nil); err != nil {
		t.Fatal(err)
	}
	e.grow(1, 1)
	if res, err := e.step([]item{{1, 1}}, false); err != nil || res.maxErr > 1e-5 {
		t.Fatalf("after swap-in: max |err| %.3g, %v", res.maxErr, err)
	}

	// A host pool too small: nothing changes.
	small := mustBM(t, kvplug.BlockManagerOptions{BlockSize: 4, NumDeviceBlocks: 4, NumHostBlocks: 1})
	must(small.Allocate(1, 12, nil, 0))(t)
	if _, err := small.SwapOut(1); !errors.Is(err, kvplug.ErrNoFreeBlocks) {
		t.Fatalf("swap-out into a small host pool: %v", err)
	}
	if swapped := must(small.IsSwapped(1))(t); swapped {
		t.Fatal("failed SwapOut left the sequence swapped")
	}
}

// Pool exhaustion is ErrNoFreeBlocks and changes nothing; unknown ids are ErrNotFound everywhere.
func TestBlockManagerErrors(t *testing.T) {
	bm := mustBM(t, kvplug.BlockManagerOptions{BlockSize: 4, NumDeviceBlocks: 4})
	must(bm.Allocate(1, 12, nil, 0))(t) // 3 of 4 blocks
	if v := must(bm.CanAllocate(8, nil, 0))(t); v != kvplug.AllocLater {
		t.Fatalf("CanAllocate(8) = %v, want later", v)
	}
	if v := must(bm.CanAllocate(100, nil, 0))(t); v != kvplug.AllocNever {
		t.Fatalf("CanAllocate(100) = %v, want never", v)
	}
	if v := must(bm.CanAllocate(4, nil, 0))(t); v != kvplug.AllocOK {
		t.Fatalf("CanAllocate(4) = %v, want ok", v)
	}
	before := must(bm.Stats())(t)
	_, err := bm.Allocate(2, 8, nil, 0)
	wantErr(t, err, kvplug.ErrNoFreeBlocks, "")
	if after := must(bm.Stats())(t); after != before {
		t.Fatalf("failed Allocate changed the pool: %+v -> %+v", before, after)
	}
	_, err = bm.NumTokens(2)
	wantErr(t, err, kvplug.ErrNotFound, "")
	must(bm.Allocate(2, 4, nil, 0))(t) // the last block
	if can := must(bm.CanAppend(1, 1))(t); can {
		t.Fatal("CanAppend true with no free block")
	}
	_, _, err = bm.Append(1, 1, nil)
	wantErr(t, err, kvplug.ErrNoFreeBlocks, "")
	if n := must(bm.NumTokens(1))(t); n != 12 {
		t.Fatalf("failed Append changed the length: %d", n)
	}
	if err := bm.Free(2); err != nil {
		t.Fatal(err)
	}
	if can := must(bm.CanAppend(1, 1))(t); !can {
		t.Fatal("CanAppend false with a free block")
	}

	_, err = bm.Allocate(1, 4, nil, 0)
	wantErr(t, err, kvplug.ErrAlreadyExists, "")
	wantErr(t, bm.MarkComputed(1, 13), kvplug.ErrOutOfRange, "")
	_, err = bm.Allocate(3, 0, nil, 0)
	wantErr(t, err, kvplug.ErrInvalidArgument, "num_tokens=0")
	_, err = bm.Allocate(3, 4, []int32{1, 2}, 0)
	wantErr(t, err, kvplug.ErrInvalidArgument, "len(tokenIDs)")

	const unknown = 77
	checks := map[string]error{
		"Free":         bm.Free(unknown),
		"MarkComputed": bm.MarkComputed(unknown, 1),
		"Fork":         bm.Fork(unknown, 78),
		"SlotMapping":  bm.SlotMapping(unknown, 0, make([]int64, 1)),
	}
	_, checks["NumTokens"] = bm.NumTokens(unknown)
	_, checks["BlockTable"] = bm.BlockTable(unknown)
	_, _, checks["Append"] = bm.Append(unknown, 1, nil)
	_, checks["CanAppend"] = bm.CanAppend(unknown, 1)
	_, checks["SwapOut"] = bm.SwapOut(unknown)
	_, checks["SwapIn"] = bm.SwapIn(unknown)
	_, checks["IsSwapped"] = bm.IsSwapped(unknown)
	_, checks["StateSlot"] = bm.StateSlot(unknown)
	checks["BlockTables"] = bm.BlockTables([]uint64{1, unknown}, 4, make([]int32, 8), nil)
	for name, err := range checks {
		if !errors.Is(err, kvplug.ErrNotFound) {
			t.Errorf("%s(unknown seq): %v, want ErrNotFound", name, err)
		}
	}
}

// Slot mapping follows the block table (slot = block * block_size + offset); the batch form pads
// with -1 and reports lengths; a table too narrow is ErrOutOfRange and writes nothing.
func TestBlockTablesAndSlotMapping(t *testing.T) {
	bm := mustBM(t, kvplug.BlockManagerOptions{BlockSize: 4, NumDeviceBlocks: 16})
	must(bm.Allocate(1, 10, nil, 0))(t)
	must(bm.Allocate(2, 3, nil, 0))(t)
	table := must(bm.BlockTable(1))(t)
	if len(table) != 3 {
		t.Fatalf("table %v for 10 tokens of 4", table)
	}
	slots := make([]int64, 10)
	if err := bm.SlotMapping(1, 0, slots); err != nil {
		t.Fatal(err)
	}
	for p, s := range slots {
		if want := int64(table[p/4])*4 + int64(p%4); s != want {
			t.Fatalf("slot of position %d = %d, want %d", p, s, want)
		}
	}
	if err := bm.SlotMapping(1, 8, make([]int64, 3)); !errors.Is(err, kvplug.ErrOutOfRange) {
		t.Fatalf("slots past the end: %v", err)
	}
	tables, lens := make([]int32, 2*4), make([]int32, 2)
	if err := bm.BlockTables([]uint64{2, 1}, 4, tables, lens); err != nil {
		t.Fatal(err)
	}
	t2 := must(bm.BlockTable(2))(t)
	want := []int32{t2[0], -1, -1, -1, table[0], table[1], table[2], -1}
	if !reflect.DeepEqual(tables, want) || !reflect.DeepEqual(lens, []int32{3, 10}) {
		t.Fatalf("BlockTables = %v %v, want %v [3 10]", tables, lens, want)
	}
	narrow := []int32{9, 9, 9, 9}
	if err := bm.BlockTables([]uint64{2, 1}, 2, narrow, nil); !errors.Is(err, kvplug.ErrOutOfRange) {
		t.Fatalf("narrow table: %v", err)
	}
	if !reflect.DeepEqual(narrow, []int32{9, 9, 9, 9}) {
		t.Fatalf("a failed BlockTables wrote %v", narrow)
	}
	if err := bm.BlockTables([]uint64{1}, 4, make([]int32, 3), nil); !errors.Is(err, kvplug.ErrInvalidArgument) {
		t.Fatalf("table slice of the wrong length: %v", err)
	}
	// A long sequence's table exceeds BlockTable's first guess (16): the retry path.
	big := mustBM(t, kvplug.BlockManagerOptions{BlockSize: 1, NumDeviceBlocks: 100})
	must(big.Allocate(1, 100, nil, 0))(t)
	if tb := must(big.BlockTable(1))(t); len(tb) != 100 {
		t.Fatalf("long table has %d entries, want 100", len(tb))
	}
	// And a swap plan beyond its first guess (32).
	swap := mustBM(t, kvplug.BlockManagerOptions{BlockSize: 1, NumDeviceBlocks: 100, NumHostBlocks: 100})
	must(swap.Allocate(1, 50, nil, 0))(t)
	if plan := must(swap.SwapOut(1))(t); len(plan) != 50 {
		t.Fatalf("long swap plan has %d copies, want 50", len(plan))
	}
}

// State slots: one per sequence, given at allocate and fork, -1 without them; the cache's slots
// are zero-filled bytes, checked against their bounds.
func TestStateSlots(t *testing.T) {
	bm := mustBM(t, kvplug.BlockManagerOptions{BlockSize: 4, NumDeviceBlocks: 8, NumStateSlots: 2})
	must(bm.Allocate(1, 4, nil, 0))(t)
	if err := bm.Fork(1, 2); err != nil {
		t.Fatal(err)
	}
	s1, s2 := must(bm.StateSlot(1))(t), must(bm.StateSlot(2))(t)
	if s1 == s2 || s1 < 0 || s2 < 0 || s1 > 1 || s2 > 1 {
		t.Fatalf("state slots %d, %d", s1, s2)
	}
	_, err := bm.Allocate(3, 4, nil, 0)
	wantErr(t, err, kvplug.ErrNoFreeBlocks, "state slot")
	plain := mustBM(t, kvplug.BlockManagerOptions{BlockSize: 4, NumDeviceBlocks: 8})
	must(plain.Allocate(1, 4, nil, 0))(t)
	if s := must(plain.StateSlot(1))(t); s != -1 {
		t.Fatalf("state slot without slots = %d, want -1", s)
	}

	ctx := must(kvplug.NewContext(nil))(t)
	defer ctx.Close()
	cache := must(ctx.NewKvCache(kvplug.KvCacheOptions{NumLayers: 2, NumBlocks: 4, BlockSize: 4, NumKVHeads: 1,
		HeadSize: 32, NumStateSlots: 2, StateBytesPerLayer: 64}))(t)
	defer cache.Close()
	st := must(cache.ReadState(1, 1))(t)
	if len(st) != 64 {
		t.Fatalf("state of %d bytes, want 64", len(st))
	}
	for _, b := range st {
		if b != 0 {
			t.Fatal("state not zero-filled")
		}
	}
	if err := cache.CopyState(0, 1); err != nil {
		t.Fatal(err)
	}
	wantErr(t, cache.CopyState(0, 2), kvplug.ErrOutOfRange, "")
	_, err = cache.ReadState(2, 0)
	wantErr(t, err, kvplug.ErrOutOfRange, "")
}
