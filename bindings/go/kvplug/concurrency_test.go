package kvplug_test

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"kvplug.dev/kvplug/kvplug"
)

// The header: different handles may be used from different threads at once. Several goroutines
// each build their own context, block manager, cache, plan and attention and run seeded ragged
// batches; every result must match the reference (under -race, which also checks the binding's
// own Go state).
func TestConcurrentSeparateHandles(t *testing.T) {
	const workers = 6
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			c := baseConfig()
			c.seed = int64(100 + w)
			c.threads = 1 + w%2
			e, err := newEnv(c)
			if err != nil {
				errs <- err
				return
			}
			defer func() {
				if err := e.close(); err != nil {
					errs <- err
				}
			}()
			for round := 0; round < 3; round++ {
				items, err := e.raggedBatch(uint64(round * 10))
				if err != nil {
					errs <- fmt.Errorf("worker %d: %w", w, err)
					return
				}
				res, err := e.step(items, round%2 == 1)
				if err != nil {
					errs <- fmt.Errorf("worker %d: %w", w, err)
					return
				}
				if res.maxErr > 1e-5 || res.maxLseErr > 1e-5 {
					errs <- fmt.Errorf("worker %d round %d: max |err| %.3g, lse %.3g", w, round, res.maxErr, res.maxLseErr)
					return
				}
				for _, it := range items {
					if err := e.bm.Free(it.id); err != nil {
						errs <- err
						return
					}
				}
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// The header: concurrent runs reading one attention, plan and cache are safe when they write
// different outputs. Eight goroutines run the same query into their own buffers; all must equal
// the single-threaded result bit for bit.
func TestConcurrentRunsShareReadOnlyHandles(t *testing.T) {
	e := mustEnv(t, baseConfig())
	items, err := e.raggedBatch(1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.step(items, false); err != nil {
		t.Fatal(err)
	}
	T := 0
	for _, it := range items {
		T += it.qLen
	}
	shape := []int{T, e.c.qHeads, e.c.head}
	q := make([]float32, T*e.c.qHeads*e.c.head)
	for i := range q {
		q[i] = float32(i%17) / 17
	}
	want := make([]float32, len(q))
	if err := e.attn.Run(e.plan, e.cache, 1, kvplug.Float32Tensor(q, shape...), kvplug.Float32Tensor(want, shape...), nil); err != nil {
		t.Fatal(err)
	}
	const workers = 8
	outs := make([][]float32, workers)
	var wg sync.WaitGroup
	errs := make([]error, workers)
	for w := 0; w < workers; w++ {
		outs[w] = make([]float32, len(q))
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < 5 && errs[w] == nil; i++ {
				errs[w] = e.attn.Run(e.plan, e.cache, 1, kvplug.Float32Tensor(q, shape...), kvplug.Float32Tensor(outs[w], shape...), nil)
			}
		}(w)
	}
	wg.Wait()
	for w := range outs {
		if errs[w] != nil {
			t.Fatal(errs[w])
		}
		for i := range want {
			if outs[w][i] != want[i] {
				t.Fatalf("worker %d: out[%d] = %v, single-threaded %v", w, i, outs[w][i], want[i])
			}
		}
	}
}

// Library error messages are thread-local. Goroutines failing at once on different ids must each
// get their own message (the binding locks the OS thread between the call and kvp_last_error).
// Without the lock this fails whenever the scheduler moves a goroutine between the two cgo calls;
// with a runtime.Gosched forced there it fails every run.
func TestConcurrentErrorMessagesStayWithTheirCall(t *testing.T) {
	const workers = 8
	var wg sync.WaitGroup
	bad := make(chan string, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			bm, err := kvplug.NewBlockManager(kvplug.BlockManagerOptions{BlockSize: 4, NumDeviceBlocks: 4})
			if err != nil {
				bad <- err.Error()
				return
			}
			defer bm.Close()
			for i := 0; i < 300; i++ {
				id := uint64(w*100000 + i)
				err := bm.Free(id)
				if !errors.Is(err, kvplug.ErrNotFound) || !strings.Contains(err.Error(), fmt.Sprintf("seq %d:", id)) {
					bad <- fmt.Sprintf("Free(%d): %v", id, err)
					return
				}
			}
		}(w)
	}
	wg.Wait()
	close(bad)
	for msg := range bad {
		t.Error(msg)
	}
}

// Beyond the header: the binding serializes mutating calls on one BlockManager, so goroutines may
// share it. Each goroutine allocates, appends to and frees its own sequences; at the end the pool
// must be exactly as it started (a lost update would leak or double-free blocks).
func TestSharedBlockManagerIsSerialized(t *testing.T) {
	bm := mustBM(t, kvplug.BlockManagerOptions{BlockSize: 4, NumDeviceBlocks: 256})
	const workers = 8
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < 50; i++ {
				id := uint64(w*1000 + i)
				if _, err := bm.Allocate(id, 1+i%9, nil, 0); err != nil {
					errs <- err
					return
				}
				if _, _, err := bm.Append(id, 3, nil); err != nil {
					errs <- err
					return
				}
				if n, err := bm.NumTokens(id); err != nil || n != 1+i%9+3 {
					errs <- fmt.Errorf("seq %d: %d tokens, %v", id, n, err)
					return
				}
				if _, err := bm.Stats(); err != nil {
					errs <- err
					return
				}
				if err := bm.Free(id); err != nil {
					errs <- err
					return
				}
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if st := must(bm.Stats())(t); st.NumUsedBlocks != 0 || st.NumSequences != 0 || st.NumFreeBlocks != 256 {
		t.Fatalf("after all goroutines freed their sequences: %+v", st)
	}
}

// Close racing with calls: every call either completes or returns ErrClosed; none reaches C with
// a freed pointer (which would crash the test binary or trip the race detector).
func TestCloseWhileInUse(t *testing.T) {
	for round := 0; round < 20; round++ {
		bm, err := kvplug.NewBlockManager(kvplug.BlockManagerOptions{BlockSize: 4, NumDeviceBlocks: 64})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := bm.Allocate(1, 5, nil, 0); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		for w := 0; w < 4; w++ {
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				for i := 0; i < 200; i++ {
					_, err := bm.NumTokens(1)
					if err != nil && !errors.Is(err, kvplug.ErrClosed) {
						t.Errorf("NumTokens: %v", err)
						return
					}
					if err != nil {
						return // closed: every later call would say so too
					}
				}
			}(w)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := bm.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
		}()
		wg.Wait()
		if _, err := bm.NumTokens(1); !errors.Is(err, kvplug.ErrClosed) {
			t.Fatalf("after Close: %v", err)
		}
	}
}
