package kvplug_test

import (
	"errors"
	"math"
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
// reference, output and log-sum-exp.
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
			t.Logf("max |err| out %.3g, lse %.3g", res.maxErr, res.maxLseErr)
			if res.maxErr > 1e-5 || res.maxLseErr > 1e-5 {
				t.Fatalf("max |err| out %.3g, lse %.3g: over 1e-5", res.maxErr, res.maxLseErr)
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
			t.Logf("max |err| out %.3g, lse %.3g", res.maxErr, res.maxLseErr)
			if res.maxErr > tc.tol || res.maxLseErr > 1e-4 {
				t.Fatalf("max |err| out %.3g (tol %g), lse %.3g", res.maxErr, tc.tol, res.maxLseErr)
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
	if res.maxErr > 1e-5 || res.maxLseErr > 1e-5 {
		t.Fatalf("windowed, capped: max |err| out %.3g, lse %.3g over 1e-5", res.maxErr, res.maxLseErr)
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
