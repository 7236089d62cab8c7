package naive

import (
	"math"
	"testing"
)

// The reference is what every other check trusts, so it gets hand-computable cases.
func TestAttentionHandCases(t *testing.T) {
	// One key: the output is its value, the lse its scaled logit.
	p := NewParams(1, 1, 2, 0.5)
	out, lse := Attention(p, 1, 1, []float64{1, 2}, []float64{3, 4}, []float64{5, 6})
	if out[0] != 5 || out[1] != 6 || lse[0] != 0.5*11 {
		t.Fatalf("one key: out %v lse %v", out, lse)
	}
	// Two keys with equal logits: the mean of the values, lse = logit + ln 2.
	out, lse = Attention(p, 2, 1, []float64{1, 0}, []float64{1, 7, 1, -7}, []float64{2, 0, 4, 8})
	if out[0] != 3 || out[1] != 4 || math.Abs(lse[0]-(0.5+math.Ln2)) > 1e-15 {
		t.Fatalf("two keys: out %v lse %v", out, lse)
	}
	// Causality: the first of two queries sees only the first key.
	out, _ = Attention(p, 2, 2, []float64{1, 0, 1, 0}, []float64{1, 0, 1, 0}, []float64{2, 0, 4, 8})
	if out[0] != 2 || out[1] != 0 || out[2] != 3 || out[3] != 4 {
		t.Fatalf("causal: out %v", out)
	}
	// Window 0: each query sees only its own position.
	p.WindowLeft = 0
	out, _ = Attention(p, 2, 1, []float64{1, 0}, []float64{1, 0, 1, 0}, []float64{2, 0, 4, 8})
	if out[0] != 4 || out[1] != 8 {
		t.Fatalf("window 0: out %v", out)
	}
	// GQA: query heads 0 and 1 share KV head 0, heads 2 and 3 KV head 1.
	g := NewParams(4, 2, 1, 1)
	out, _ = Attention(g, 1, 1, []float64{1, 1, 1, 1}, []float64{1, 1}, []float64{10, 20})
	if out[0] != 10 || out[1] != 10 || out[2] != 20 || out[3] != 20 {
		t.Fatalf("gqa: out %v", out)
	}
	// Soft cap: logits 100 and 0 capped at 1 become tanh(100)≈1 and 0.
	c := NewParams(1, 1, 1, 1)
	c.SoftCap = 1
	_, lse = Attention(c, 2, 1, []float64{1}, []float64{100, 0}, []float64{0, 0})
	if want := math.Log(math.Exp(math.Tanh(100)) + 1); math.Abs(lse[0]-want) > 1e-12 {
		t.Fatalf("soft cap: lse %v, want %v", lse[0], want)
	}
}

// Entropy: a single key has none, n equal logits give ln n, and a skewed pair gives the closed form.
func TestEntropyHandCases(t *testing.T) {
	p := NewParams(1, 1, 2, 0.5)
	if _, _, h := States(p, 1, 1, []float64{1, 2}, []float64{3, 4}, []float64{5, 6}); h[0] != 0 {
		t.Fatalf("one key: entropy %v, want 0", h[0])
	}
	k := []float64{1, 7, 1, -7, 1, 3} // equal logits for q = (1, 0)
	if _, _, h := States(p, 3, 1, []float64{1, 0}, k, make([]float64, 6)); math.Abs(h[0]-math.Log(3)) > 1e-15 {
		t.Fatalf("three equal keys: entropy %v, want ln 3", h[0])
	}
	// Logits 0 and ln 3 (scale 1): weights 1/4 and 3/4.
	c := NewParams(1, 1, 1, 1)
	_, _, h := States(c, 2, 1, []float64{1}, []float64{0, math.Log(3)}, []float64{0, 0})
	if want := -(0.25*math.Log(0.25) + 0.75*math.Log(0.75)); math.Abs(h[0]-want) > 1e-15 {
		t.Fatalf("skewed pair: entropy %v, want %v", h[0], want)
	}
}
