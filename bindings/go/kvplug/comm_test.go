package kvplug_test

import (
	"math"
	"testing"

	"kvplug.dev/kvplug/kvplug"
)

func newComm(t *testing.T, ctx *kvplug.Context, ranks int) *kvplug.Comm {
	t.Helper()
	m := newMergeCase(1)
	c, err := ctx.NewComm(kvplug.CommOptions{Kind: kvplug.CommInProcess, NumRanks: ranks, MaxNumTokens: 8, NumHeads: m.H,
		HeadSize: m.D, OutDType: kvplug.Float32})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// Two ranks' partials over disjoint key ranges merge into attention over all keys, on every rank.
func TestCommMergesTwoPartials(t *testing.T) {
	ctx := newMergeContext(t)
	m := newMergeCase(1)
	c := newComm(t, ctx, 2)
	want, wantLse, _ := m.states(0, m.N)
	for round := 0; round < 2; round++ {
		o0, l0, _ := m.states(0, 17)
		o1, l1, _ := m.states(17, m.N)
		outs := [][]float32{f32s(o0), f32s(o1)}
		lses := [][]float32{f32s(l0), f32s(l1)}
		err := c.MergeAll([]kvplug.Tensor{kvplug.Float32Tensor(outs[0], m.T, m.H, m.D), kvplug.Float32Tensor(outs[1], m.T, m.H, m.D)}, lses)
		if err != nil {
			t.Fatal(err)
		}
		for r := 0; r < 2; r++ {
			if d := maxDiff(outs[r], want); !(d < 1e-6) {
				t.Fatalf("round %d rank %d: out off by %g", round, r, d)
			}
			if d := maxDiff(lses[r], wantLse); !(d < 1e-5) {
				t.Fatalf("round %d rank %d: lse off by %g", round, r, d)
			}
		}
		if n, err := c.Pending(); n != 0 || err != nil {
			t.Fatalf("pending %d %v", n, err)
		}
	}
	// An empty partial (lse -Inf) weighs nothing.
	out0, lse0 := f32s(want), f32s(wantLse)
	out1, lse1 := make([]float32, len(out0)), make([]float32, len(lse0))
	for i := range lse1 {
		lse1[i] = float32(math.Inf(-1))
	}
	if err := c.MergeAll([]kvplug.Tensor{kvplug.Float32Tensor(out0, m.T, m.H, m.D), kvplug.Float32Tensor(out1, m.T, m.H, m.D)},
		[][]float32{lse0, lse1}); err != nil {
		t.Fatal(err)
	}
	for i := range out0 {
		if out0[i] != float32(want[i]) || out1[i] != out0[i] {
			t.Fatalf("empty partial changed out[%d]: %g %g want %g", i, out0[i], out1[i], float32(want[i]))
		}
	}
}

func TestCommErrors(t *testing.T) {
	ctx := newMergeContext(t)
	m := newMergeCase(1)
	base := kvplug.CommOptions{Kind: kvplug.CommInProcess, NumRanks: 2, MaxNumTokens: 8, NumHeads: m.H, HeadSize: m.D,
		OutDType: kvplug.Float32}
	for name, o := range map[string]kvplug.CommOptions{
		"num_ranks":      func() kvplug.CommOptions { o := base; o.NumRanks = 0; return o }(),
		"max_num_tokens": func() kvplug.CommOptions { o := base; o.MaxNumTokens = 0; return o }(),
		"num_heads":      func() kvplug.CommOptions { o := base; o.NumHeads = -1; return o }(),
		"out_dtype":      func() kvplug.CommOptions { o := base; o.OutDType = kvplug.FP8E4M3; return o }(),
		"kind":           func() kvplug.CommOptions { o := base; o.Kind = 7; return o }(),
	} {
		c, err := ctx.NewComm(o)
		if c != nil {
			c.Close()
		}
		wantErr(t, err, kvplug.ErrInvalidArgument, name)
	}
	nccl := base
	nccl.Kind, nccl.NCCLUniqueID = kvplug.CommNCCL, make([]byte, kvplug.NCCLUniqueIDBytes)
	if c, err := ctx.NewComm(nccl); err == nil {
		c.Close()
		t.Fatal("an NCCL comm on a CPU context was created")
	} else if !errorsIsAny(err, kvplug.ErrNotSupported, kvplug.ErrInvalidArgument) {
		t.Fatalf("NCCL on the CPU: %v", err)
	}
	if _, err := kvplug.NCCLUniqueID(); err != nil && !errorsIsAny(err, kvplug.ErrNotSupported, kvplug.ErrDevice) {
		t.Fatalf("NCCLUniqueID: %v", err)
	}

	c := newComm(t, ctx, 2)
	o, l, _ := m.states(0, m.N)
	good := kvplug.Float32Tensor(f32s(o), m.T, m.H, m.D)
	wantErr(t, c.MergeAll([]kvplug.Tensor{good}, [][]float32{f32s(l)}), kvplug.ErrInvalidArgument, "NumRanks")
	// Wrong heads: the library refuses rank 0, nothing stays open.
	bad := kvplug.Float32Tensor(f32s(o), m.T, m.H*2, m.D/2)
	wantErr(t, c.MergeAll([]kvplug.Tensor{bad, bad}, [][]float32{make([]float32, m.T*m.H*2), make([]float32, m.T*m.H*2)}),
		kvplug.ErrInvalidArgument, "")
	// Too many rows for the comm.
	big := kvplug.Float32Tensor(make([]float32, 9*m.H*m.D), 9, m.H, m.D)
	wantErr(t, c.MergeAll([]kvplug.Tensor{big, big}, [][]float32{make([]float32, 9*m.H), make([]float32, 9*m.H)}),
		kvplug.ErrInvalidArgument, "")
	// Shapes that differ between ranks are refused before anything is contributed.
	wantErr(t, c.MergeAll([]kvplug.Tensor{good, big}, [][]float32{f32s(l), make([]float32, 9*m.H)}), kvplug.ErrInvalidArgument, "out[1]")
	wantErr(t, c.Merge(0, good, f32s(l)), kvplug.ErrFailedPrecondition, "MergeAll")
	if n, err := c.Pending(); n != 0 || err != nil {
		t.Fatalf("refused calls left a round open: %d %v", n, err)
	}
	// One rank merges in one call.
	one := newComm(t, ctx, 1)
	out, lse := f32s(o), f32s(l)
	if err := one.Merge(0, kvplug.Float32Tensor(out, m.T, m.H, m.D), lse); err != nil {
		t.Fatal(err)
	}
	if d := maxDiff(out, o); !(d < 1e-6) {
		t.Fatalf("single rank: %g", d)
	}
	c.Close()
	wantErr(t, c.MergeAll([]kvplug.Tensor{good, good}, [][]float32{f32s(l), f32s(l)}), kvplug.ErrClosed, "")
}

func errorsIsAny(err error, targets ...error) bool {
	for _, t := range targets {
		if e, ok := err.(*kvplug.Error); ok && e.Is(t) {
			return true
		}
	}
	return false
}
