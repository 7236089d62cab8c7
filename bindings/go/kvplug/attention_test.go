package kvplug_test

import (
	"errors"
	"math"
	"strings"
	"testing"

	"kvplug.dev/kvplug/kvplug"
)

// mustEnv builds an env or fails the test; it closes it at the end, checking Close succeeds
// (which also proves no dependent handle was leaked open).
func mustEnv(t *testing.T, c config) *env {
	t.Helper()
	e, err := newEnv(c)
	if err != nil {
		t.Fatalf("newEnv: %v", err)
	}
	t.Cleanup(func() {
		if err := e.close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return e
}

// The main correctness check: a seeded ragged batch (single token, chunks crossing block
// boundaries, a whole prompt, a long decode) through the dense block table, against the float64
// reference: output, log-sum-exp and entropy (H = -sum p log p per row, from the kernel's running
// sums, against the reference's explicit probabilities).
func TestAttentionRaggedBatchMatchesReference(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(*config)
		csr    bool
	}{
		{"dense-table", func(*config) {}, false},
		{"csr-table", func(*config) {}, true},
		{"block-first-layout", func(c *config) { c.layout = kvplug.LayoutBlockFirst }, false},
		{"mha-head128", func(c *config) { c.qHeads, c.kvHeads, c.head = 2, 2, 128 }, false},
		{"explicit-sm-scale", func(c *config) { c.smScale = 0.05 }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := baseConfig()
			tc.change(&c)
			e := mustEnv(t, c)
			items, err := e.raggedBatch(1)
			if err != nil {
				t.Fatal(err)
			}
			res, err := e.step(items, tc.csr)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("max |err| out %.3g, lse %.3g, entropy %.3g", res.maxErr, res.maxLseErr, res.maxEntErr)
			if res.maxErr > 1e-5 || res.maxLseErr > 1e-5 || res.maxEntErr > 1e-5 {
				t.Fatalf("max |err| out %.3g, lse %.3g, entropy %.3g: over 1e-5", res.maxErr, res.maxLseErr, res.maxEntErr)
			}
			// Rows over up to 100 keys: a kernel writing zeros (or lse) would be far off.
			if res.maxEnt < 1 {
				t.Fatalf("largest reference entropy %.3g: the batch does not exercise spread rows", res.maxEnt)
			}
		})
	}
}

// Half-precision caches and tensors: the reference is fed the same rounded K/V (and queries), so
// what remains is the kernel's float32 arithmetic plus, for half outputs, one rounding of the
// output. Outputs are convex combinations of values in [-1, 1], so that rounding is at most half
// an ulp of [0.5, 1): 2^-12 (2.4e-4) for float16, 2^-9 (2.0e-3) for bfloat16; the tolerances sit
// just above. A kernel converting with truncation instead would exceed them.
func TestAttentionHalfPrecision(t *testing.T) {
	for _, tc := range []struct {
		cache, query kvplug.DType
		tol          float64
	}{
		{kvplug.BFloat16, kvplug.Float32, 1e-5},
		{kvplug.Float16, kvplug.Float32, 1e-5},
		{kvplug.Float32, kvplug.Float16, 3e-4},
		{kvplug.BFloat16, kvplug.BFloat16, 2.5e-3},
	} {
		t.Run(tc.cache.String()+"-cache-"+tc.query.String()+"-query", func(t *testing.T) {
			c := baseConfig()
			c.cacheDType, c.queryDType = tc.cache, tc.query
			e := mustEnv(t, c)
			items, err := e.raggedBatch(1)
			if err != nil {
				t.Fatal(err)
			}
			res, err := e.step(items, false)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("max |err| out %.3g, lse %.3g, entropy %.3g", res.maxErr, res.maxLseErr, res.maxEntErr)
			if res.maxErr > tc.tol || res.maxLseErr > 1e-4 || res.maxEntErr > 1e-5 {
				t.Fatalf("max |err| out %.3g (tol %g), lse %.3g, entropy %.3g", res.maxErr, tc.tol, res.maxLseErr, res.maxEntErr)
			}
		})
	}
}

// A JSON config reaches the backend: a sliding window and a logit soft cap change the result,
// which must then match the reference computed with the same variant (and differ from the
// unwindowed reference, so a config silently dropped would fail).
func TestAttentionJSONConfigIsApplied(t *testing.T) {
	c := baseConfig()
	c.configJSON = `{"backend_config_type": "DenseConfig", "backend_config": {"window_left": 7, "logits_soft_cap": 2.5}}`
	c.window, c.softCap = 7, 2.5
	c.smScale = 1 // large logits, so the soft cap matters
	e := mustEnv(t, c)
	items, err := e.raggedBatch(1)
	if err != nil {
		t.Fatal(err)
	}
	res, err := e.step(items, false)
	if err != nil {
		t.Fatal(err)
	}
	if res.maxErr > 1e-5 || res.maxLseErr > 1e-5 || res.maxEntErr > 1e-5 {
		t.Fatalf("windowed, capped: max |err| out %.3g, lse %.3g, entropy %.3g over 1e-5", res.maxErr, res.maxLseErr, res.maxEntErr)
	}

	// The same batch and seed without the config must not match the windowed reference.
	plain := c
	plain.configJSON = ""
	e2 := mustEnv(t, plain)
	items2, err := e2.raggedBatch(1)
	if err != nil {
		t.Fatal(err)
	}
	res2, err := e2.step(items2, false)
	if err != nil {
		t.Fatal(err)
	}
	if res2.maxErr < 1e-3 {
		t.Fatalf("without the config the output still matches the windowed reference (max |err| %.3g): the test cannot tell", res2.maxErr)
	}
}

// The log-sum-exp is optional: a nil lse runs, and produces the same output as with one.
func TestAttentionWithoutLSE(t *testing.T) {
	e := mustEnv(t, baseConfig())
	items, err := e.raggedBatch(1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.step(items, false); err != nil { // plan + K/V in place
		t.Fatal(err)
	}
	T := 0
	for _, it := range items {
		T += it.qLen
	}
	q := make([]float32, T*e.c.qHeads*e.c.head)
	for i := range q {
		q[i] = float32(math.Sin(float64(i)))
	}
	a, b := make([]float32, len(q)), make([]float32, len(q))
	shape := []int{T, e.c.qHeads, e.c.head}
	if err := e.attn.Run(e.plan, e.cache, 0, kvplug.Float32Tensor(q, shape...), kvplug.Float32Tensor(a, shape...), nil); err != nil {
		t.Fatal(err)
	}
	lse := make([]float32, T*e.c.qHeads)
	if err := e.attn.Run(e.plan, e.cache, 0, kvplug.Float32Tensor(q, shape...), kvplug.Float32Tensor(b, shape...), lse); err != nil {
		t.Fatal(err)
	}
	for i := range a {
		if a[i] != b[i] {
			t.Fatalf("out[%d] = %v without lse, %v with", i, a[i], b[i])
		}
	}
	if lse[0] == 0 {
		t.Fatal("lse not written")
	}
	// Run before any Update of a fresh plan is a precondition failure, not garbage.
	fresh, err := e.ctx.NewPlan(kvplug.PlanOptions{MaxNumSeqs: 1, MaxNumTokens: 1, MaxNumBlocks: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer fresh.Close()
	err = e.attn.Run(fresh, e.cache, 0, kvplug.Float32Tensor(q, shape...), kvplug.Float32Tensor(a, shape...), nil)
	if !errors.Is(err, kvplug.ErrFailedPrecondition) {
		t.Fatalf("run on an empty plan: got %v, want ErrFailedPrecondition", err)
	}
}

// readyEnv is an env whose plan holds a ragged batch with its K/V written, and a fixed query.
func readyEnv(t *testing.T, c config) (e *env, T int, q []float32, shape []int) {
	t.Helper()
	e = mustEnv(t, c)
	items, err := e.raggedBatch(1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.step(items, false); err != nil {
		t.Fatal(err)
	}
	for _, it := range items {
		T += it.qLen
	}
	q = make([]float32, T*e.c.qHeads*e.c.head)
	for i := range q {
		q[i] = float32(math.Sin(float64(i) * 0.37))
	}
	return e, T, q, []int{T, e.c.qHeads, e.c.head}
}

func equalBits(t *testing.T, what string, got, want []float32) {
	t.Helper()
	for i := range want {
		if math.Float32bits(got[i]) != math.Float32bits(want[i]) {
			t.Fatalf("%s[%d] = %v, want %v", what, i, got[i], want[i])
		}
	}
}

// RunWith and Run share one kernel: the same out and lse bit for bit, with or without the
// entropy requested, and the single-key row (the batch's first sequence) has entropy 0.
func TestRunWithMatchesRun(t *testing.T) {
	e, T, q, shape := readyEnv(t, baseConfig())
	H := e.c.qHeads
	f32 := kvplug.Float32Tensor
	out, lse := make([]float32, len(q)), make([]float32, T*H)
	if err := e.attn.Run(e.plan, e.cache, 1, f32(q, shape...), f32(out, shape...), lse); err != nil {
		t.Fatal(err)
	}
	out2, lse2, ent := make([]float32, len(q)), make([]float32, T*H), make([]float32, T*H)
	if err := e.attn.RunWith(e.plan, e.cache, 1, f32(q, shape...), kvplug.Outputs{Out: f32(out2, shape...), LSE: lse2, Entropy: ent}); err != nil {
		t.Fatal(err)
	}
	equalBits(t, "out", out2, out)
	equalBits(t, "lse", lse2, lse)
	out3 := make([]float32, len(q))
	if err := e.attn.RunWith(e.plan, e.cache, 1, f32(q, shape...), kvplug.Outputs{Out: f32(out3, shape...)}); err != nil {
		t.Fatal(err)
	}
	equalBits(t, "out (no optional outputs)", out3, out)
	for h := 0; h < H; h++ {
		if math.Abs(float64(ent[h])) > 1e-6 {
			t.Fatalf("entropy of a row over one key: head %d = %v, want 0", h, ent[h])
		}
	}
}

// Bad outputs: the binding's length checks, the library's shape and overlap checks, each an
// ErrInvalidArgument naming the output, and none writing anything.
func TestRunWithErrors(t *testing.T) {
	e, T, q, shape := readyEnv(t, baseConfig())
	H := e.c.qHeads
	f32 := kvplug.Float32Tensor
	out, lse, ent := make([]float32, len(q)), make([]float32, T*H), make([]float32, T*H)
	for _, s := range [][]float32{out, lse, ent} {
		for i := range s {
			s[i] = 7
		}
	}
	for _, tc := range []struct {
		name   string
		query  kvplug.Tensor
		o      kvplug.Outputs
		substr string
	}{
		{"short entropy", f32(q, shape...), kvplug.Outputs{Out: f32(out, shape...), Entropy: ent[:T*H-1]}, "entropy: len(data)"},
		{"short lse", f32(q, shape...), kvplug.Outputs{Out: f32(out, shape...), LSE: lse[:1], Entropy: ent}, "lse: len(data)"},
		{"2-d query", f32(q, T*H, e.c.head), kvplug.Outputs{Out: f32(out, shape...), Entropy: ent}, "query: ndim=2"},
		{"no out", f32(q, shape...), kvplug.Outputs{Entropy: ent}, "Outputs.Out is required"},
		{"entropy is lse", f32(q, shape...), kvplug.Outputs{Out: f32(out, shape...), LSE: lse, Entropy: lse}, "entropy (bytes"},
		{"entropy in out", f32(q, shape...), kvplug.Outputs{Out: f32(out, shape...), Entropy: out[:T*H]}, "overlaps out"},
		{"out is query", f32(q, shape...), kvplug.Outputs{Out: f32(q, shape...)}, "overlaps query"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := e.attn.RunWith(e.plan, e.cache, 0, tc.query, tc.o)
			wantErr(t, err, kvplug.ErrInvalidArgument, tc.substr)
			if !strings.HasPrefix(err.Error(), "kvplug: Attention.RunWith: ") {
				t.Fatalf("error %q does not name Attention.RunWith", err)
			}
		})
	}
	for name, s := range map[string][]float32{"out": out, "lse": lse, "entropy": ent} {
		for i, x := range s {
			if x != 7 {
				t.Fatalf("%s[%d] = %v written by a failed call", name, i, x)
			}
		}
	}
	wantErr(t, e.attn.RunWith(nil, e.cache, 0, f32(q, shape...), kvplug.Outputs{Out: f32(out, shape...)}), kvplug.ErrInvalidArgument, "plan and cache")
}

// Attaching changes where the step work is built, never the result: runs on a plan attached
// before its update, one attached after, and one shared by two attached instances all equal a
// run on a plan that was never attached (which attaches itself at the run).
func TestPlanAttachMatchesUnattachedRun(t *testing.T) {
	e, T, q, shape := readyEnv(t, baseConfig())
	H := e.c.qHeads
	f32 := kvplug.Float32Tensor
	newPlan := func() *kvplug.Plan {
		t.Helper()
		p, err := e.ctx.NewPlan(kvplug.PlanOptions{MaxNumSeqs: 16, MaxNumTokens: 512, MaxNumBlocks: e.c.numBlocks})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.Close() })
		return p
	}
	run := func(a *kvplug.Attention, p *kvplug.Plan) ([]float32, []float32) {
		t.Helper()
		out, lse := make([]float32, len(q)), make([]float32, T*H)
		if err := a.Run(p, e.cache, 1, f32(q, shape...), f32(out, shape...), lse); err != nil {
			t.Fatal(err)
		}
		return out, lse
	}
	plain := newPlan()
	if err := plain.Update(e.batch); err != nil {
		t.Fatal(err)
	}
	wantOut, wantLse := run(e.attn, plain)

	before := newPlan()
	if err := before.Attach(e.attn); err != nil { // on an empty plan: planned at each later update
		t.Fatal(err)
	}
	if err := before.Update(e.batch); err != nil {
		t.Fatal(err)
	}
	out, lse := run(e.attn, before)
	equalBits(t, "attached before update: out", out, wantOut)
	equalBits(t, "attached before update: lse", lse, wantLse)

	after := newPlan()
	if err := after.Update(e.batch); err != nil {
		t.Fatal(err)
	}
	twin, err := e.ctx.NewAttention(e.attn.Options())
	if err != nil {
		t.Fatal(err)
	}
	defer twin.Close()
	for _, a := range []*kvplug.Attention{e.attn, twin, e.attn} { // attaching again is harmless
		if err := after.Attach(a); err != nil {
			t.Fatal(err)
		}
	}
	for name, a := range map[string]*kvplug.Attention{"attached after update": e.attn, "second attached instance": twin} {
		out, lse := run(a, after)
		equalBits(t, name+": out", out, wantOut)
		equalBits(t, name+": lse", lse, wantLse)
	}
	// The attachment outlives the instance's Close (the plan keeps what it needs).
	if err := twin.Close(); err != nil {
		t.Fatal(err)
	}
	if err := after.Update(e.batch); err != nil {
		t.Fatalf("update after an attached instance closed: %v", err)
	}
	out, _ = run(e.attn, after)
	equalBits(t, "after the twin closed: out", out, wantOut)
}

func TestPlanAttachErrors(t *testing.T) {
	e := mustEnv(t, baseConfig())
	wantErr(t, e.plan.Attach(nil), kvplug.ErrInvalidArgument, "attention is required")
	other, err := kvplug.NewContext(&kvplug.ContextOptions{NumThreads: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	foreign, err := other.NewAttention(e.attn.Options())
	if err != nil {
		t.Fatal(err)
	}
	defer foreign.Close()
	wantErr(t, e.plan.Attach(foreign), kvplug.ErrInvalidArgument, "different contexts")
	if err := foreign.Close(); err != nil {
		t.Fatal(err)
	}
	if err := e.plan.Attach(foreign); !errors.Is(err, kvplug.ErrClosed) || !strings.Contains(err.Error(), "Attention") {
		t.Fatalf("attach of a closed attention: %v, want ErrClosed naming the Attention", err)
	}
}

// Dense keeps no per-sequence state, as its device info says; a closed instance is an error.
func TestAttentionStateBytes(t *testing.T) {
	e := mustEnv(t, baseConfig())
	n, err := e.attn.StateBytes()
	if err != nil {
		t.Fatal(err)
	}
	info, err := kvplug.GetBackendDeviceInfo("dense", kvplug.DeviceCPU)
	if err != nil {
		t.Fatal(err)
	}
	if n != 0 || info.NeedsStateSlots {
		t.Fatalf("dense: StateBytes() = %d, NeedsStateSlots = %v; want 0, false", n, info.NeedsStateSlots)
	}
	a, err := e.ctx.NewAttention(e.attn.Options())
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := a.StateBytes(); !errors.Is(err, kvplug.ErrClosed) {
		t.Fatalf("StateBytes after Close: %v, want ErrClosed", err)
	}
}
