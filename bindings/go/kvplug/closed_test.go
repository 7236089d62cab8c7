package kvplug_test

import (
	"errors"
	"runtime"
	"strings"
	"testing"
	"time"

	"kvplug.dev/kvplug/kvplug"
)

// After Close every method returns an error wrapping ErrClosed that names the handle, instead of
// handing C a dangling pointer (which would crash or corrupt, not fail cleanly). Close is
// idempotent, and a Context refuses to close under open dependents.
func TestClosedHandles(t *testing.T) {
	e, err := newEnv(baseConfig())
	if err != nil {
		t.Fatal(err)
	}
	items, err := e.raggedBatch(1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.step(items, false); err != nil {
		t.Fatal(err)
	}

	// The context has three dependents (cache, plan, attention): Close must refuse.
	err = e.ctx.Close()
	wantErr(t, err, kvplug.ErrFailedPrecondition, "3 KvCache/Plan/Attention")
	f32 := kvplug.Float32Tensor
	q := make([]float32, 1*4*64)
	shape := []int{1, 4, 64}

	closedErr := func(name string, err error, kind string) {
		t.Helper()
		if !errors.Is(err, kvplug.ErrClosed) || !strings.Contains(err.Error(), kind) {
			t.Errorf("%s after Close: %v, want ErrClosed naming %s", name, err, kind)
		}
	}

	// The plan closed: runs that read it fail, the attention and cache still work for others.
	if err := e.plan.Close(); err != nil {
		t.Fatal(err)
	}
	closedErr("Plan.Update", e.plan.Update(&kvplug.Batch{}), "Plan")
	closedErr("Attention.Run(closed plan)", e.attn.Run(e.plan, e.cache, 0, f32(q, shape...), f32(q, shape...), nil), "Plan")
	closedErr("Attention.WriteKV(closed plan)", e.attn.WriteKV(e.plan, e.cache, 0, f32(q[:128], 1, 2, 64), f32(q[:128], 1, 2, 64)), "Plan")

	if err := e.attn.Close(); err != nil {
		t.Fatal(err)
	}
	closedErr("Attention.Run", e.attn.Run(e.plan, e.cache, 0, f32(q, shape...), f32(q, shape...), nil), "Attention")

	if err := e.cache.Close(); err != nil {
		t.Fatal(err)
	}
	closedErr("KvCache.Write", e.cache.Write(0, f32(q[:128], 1, 2, 64), f32(q[:128], 1, 2, 64), []int64{0}), "KvCache")
	closedErr("KvCache.CopyBlocks", e.cache.CopyBlocks([]kvplug.BlockCopy{{0, 1}}), "KvCache")
	closedErr("KvCache.SwapOut", e.cache.SwapOut(nil), "KvCache")
	closedErr("KvCache.SwapIn", e.cache.SwapIn(nil), "KvCache")
	closedErr("KvCache.CopyState", e.cache.CopyState(0, 0), "KvCache")
	_, err = e.cache.ReadState(0, 0)
	closedErr("KvCache.ReadState", err, "KvCache")
	_, err = e.cache.Snapshot(0, false)
	closedErr("KvCache.Snapshot", err, "KvCache")

	if err := e.bm.Close(); err != nil {
		t.Fatal(err)
	}
	bm := e.bm
	closedErr("BlockManager.Free", bm.Free(1), "BlockManager")
	closedErr("BlockManager.Fork", bm.Fork(1, 2), "BlockManager")
	closedErr("BlockManager.MarkComputed", bm.MarkComputed(1, 1), "BlockManager")
	closedErr("BlockManager.SlotMapping", bm.SlotMapping(1, 0, make([]int64, 1)), "BlockManager")
	closedErr("BlockManager.BlockTables", bm.BlockTables([]uint64{1}, 1, make([]int32, 1), nil), "BlockManager")
	_, err = bm.Allocate(1, 1, nil, 0)
	closedErr("BlockManager.Allocate", err, "BlockManager")
	_, err = bm.CanAllocate(1, nil, 0)
	closedErr("BlockManager.CanAllocate", err, "BlockManager")
	_, _, err = bm.Append(1, 1, nil)
	closedErr("BlockManager.Append", err, "BlockManager")
	_, err = bm.CanAppend(1, 1)
	closedErr("BlockManager.CanAppend", err, "BlockManager")
	_, err = bm.NumTokens(1)
	closedErr("BlockManager.NumTokens", err, "BlockManager")
	_, err = bm.BlockTable(1)
	closedErr("BlockManager.BlockTable", err, "BlockManager")
	_, err = bm.StateSlot(1)
	closedErr("BlockManager.StateSlot", err, "BlockManager")
	_, err = bm.SwapOut(1)
	closedErr("BlockManager.SwapOut", err, "BlockManager")
	_, err = bm.SwapIn(1)
	closedErr("BlockManager.SwapIn", err, "BlockManager")
	_, err = bm.IsSwapped(1)
	closedErr("BlockManager.IsSwapped", err, "BlockManager")
	_, err = bm.Stats()
	closedErr("BlockManager.Stats", err, "BlockManager")

	// Dependents gone: the context closes, and then creates nothing.
	if err := e.ctx.Close(); err != nil {
		t.Fatalf("context close after its dependents: %v", err)
	}
	_, err = e.ctx.NewPlan(kvplug.PlanOptions{MaxNumSeqs: 1, MaxNumTokens: 1, MaxNumBlocks: 1})
	closedErr("Context.NewPlan", err, "Context")
	_, err = e.ctx.NewKvCache(kvplug.KvCacheOptions{})
	closedErr("Context.NewKvCache", err, "Context")
	_, err = e.ctx.NewAttention(kvplug.AttentionOptions{Backend: "dense"})
	closedErr("Context.NewAttention", err, "Context")

	// Idempotent.
	for _, c := range []interface{ Close() error }{e.attn, e.plan, e.cache, e.bm, e.ctx} {
		if err := c.Close(); err != nil {
			t.Fatalf("second Close: %v", err)
		}
	}
}

// Nil handle arguments and a nil batch are errors, not nil-pointer panics.
func TestNilArguments(t *testing.T) {
	e := mustEnv(t, baseConfig())
	q := make([]float32, 4*64)
	qt := kvplug.Float32Tensor(q, 1, 4, 64)
	wantErr(t, e.attn.Run(nil, e.cache, 0, qt, qt, nil), kvplug.ErrInvalidArgument, "plan and cache")
	wantErr(t, e.attn.Run(e.plan, nil, 0, qt, qt, nil), kvplug.ErrInvalidArgument, "plan and cache")
	wantErr(t, e.attn.WriteKV(nil, e.cache, 0, qt, qt), kvplug.ErrInvalidArgument, "plan and cache")
	wantErr(t, e.plan.Update(nil), kvplug.ErrInvalidArgument, "SeqLens is empty")
}

// The finalizer is a safety net: a KvCache dropped without Close is destroyed once collected,
// which releases its hold on the context (whose Close then succeeds).
func TestFinalizerReleasesDroppedHandles(t *testing.T) {
	ctx, err := kvplug.NewContext(&kvplug.ContextOptions{NumThreads: 1})
	if err != nil {
		t.Fatal(err)
	}
	func() {
		if _, err := ctx.NewKvCache(kvplug.KvCacheOptions{NumLayers: 1, NumBlocks: 1, BlockSize: 1, NumKVHeads: 1, HeadSize: 32}); err != nil {
			t.Fatal(err)
		}
	}()
	if err := ctx.Close(); !errors.Is(err, kvplug.ErrFailedPrecondition) {
		t.Fatalf("close with a live (uncollected) cache: %v", err)
	}
	for i := 0; i < 100; i++ {
		runtime.GC() // finalizers run on their own goroutine after a collection
		time.Sleep(5 * time.Millisecond)
		if err := ctx.Close(); err == nil {
			return
		}
	}
	t.Fatal("the dropped KvCache was never finalized: the context still counts it")
}
