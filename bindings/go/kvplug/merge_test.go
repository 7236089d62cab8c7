package kvplug_test

import (
	"errors"
	"math"
	"math/rand"
	"testing"

	"kvplug.dev/kvplug/internal/naive"
	"kvplug.dev/kvplug/kvplug"
)

// mergeCase is T query rows of H heads over N keys (one KV head per query head), with the float64
// reference states over any contiguous key range.
type mergeCase struct {
	T, H, D, N int
	q, k, v    []float64
	p          naive.Params
}

func newMergeCase(seed int64) *mergeCase {
	m := &mergeCase{T: 3, H: 2, D: 32, N: 41}
	rng := rand.New(rand.NewSource(seed))
	fill := func(n int) []float64 {
		x := make([]float64, n)
		for i := range x {
			x[i] = rng.Float64()*2 - 1
		}
		return x
	}
	m.q, m.k, m.v = fill(m.T*m.H*m.D), fill(m.N*m.H*m.D), fill(m.N*m.H*m.D)
	m.p = naive.NewParams(m.H, m.H, m.D, 0.7) // spread weights, so every partial matters
	return m
}

// states over keys [lo, hi): one query row at a time (qLen 1 sees every key of the range).
func (m *mergeCase) states(lo, hi int) (out, lse, ent []float64) {
	row := m.H * m.D
	for t := 0; t < m.T; t++ {
		o, l, e := naive.States(m.p, hi-lo, 1, m.q[t*row:(t+1)*row], m.k[lo*row:hi*row], m.v[lo*row:hi*row])
		out, lse, ent = append(out, o...), append(lse, l...), append(ent, e...)
	}
	return out, lse, ent
}

func f32s(x []float64) []float32 {
	out := make([]float32, len(x))
	for i, v := range x {
		out[i] = float32(v)
	}
	return out
}

func maxDiff(got []float32, want []float64) float64 {
	d := 0.0
	for i := range want {
		d = math.Max(d, math.Abs(float64(got[i])-want[i]))
		if math.IsNaN(float64(got[i])) {
			return math.NaN()
		}
	}
	return d
}

func newMergeContext(t *testing.T) *kvplug.Context {
	t.Helper()
	ctx, err := kvplug.NewContext(&kvplug.ContextOptions{NumThreads: 2})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := ctx.Close(); err != nil {
			t.Error(err)
		}
	})
	return ctx
}

// Partials over disjoint key ranges, computed naively, merge into attention over all keys: out,
// lse and entropy to 1e-6 (float32 partials, float64 reference); a float16 out to its rounding.
func TestMergeStatesMatchesFullAttention(t *testing.T) {
	ctx := newMergeContext(t)
	m := newMergeCase(3)
	wantOut, wantLse, wantEnt := m.states(0, m.N)
	for _, tc := range []struct {
		name    string
		cuts    []int // partial s covers keys [cuts[s], cuts[s+1])
		outType kvplug.DType
		tol     float64
	}{
		{"two-halves", []int{0, 20, 41}, kvplug.Float32, 1e-6},
		{"three-uneven", []int{0, 1, 30, 41}, kvplug.Float32, 1e-6},
		{"float16-out", []int{0, 20, 41}, kvplug.Float16, 2.5e-4}, // half an ulp of [0.5, 1)
	} {
		t.Run(tc.name, func(t *testing.T) {
			S := len(tc.cuts) - 1
			var po, pl, pe []float64
			for s := 0; s < S; s++ {
				o, l, e := m.states(tc.cuts[s], tc.cuts[s+1])
				if s == 0 && maxDiff(f32s(o), wantOut) < 1e-2 {
					t.Fatal("a partial already equals the full attention: the test cannot tell a merge from a copy")
				}
				po, pl, pe = append(po, o...), append(pl, l...), append(pe, e...)
			}
			lse, ent := make([]float32, m.T*m.H), make([]float32, m.T*m.H)
			args := kvplug.MergeArgs{PartialOut: kvplug.Float32Tensor(f32s(po), S, m.T, m.H, m.D),
				PartialLSE: f32s(pl), PartialEntropy: f32s(pe), LSE: lse, Entropy: ent}
			out := make([]float32, m.T*m.H*m.D)
			var half []uint16
			if tc.outType == kvplug.Float32 {
				args.Out = kvplug.Float32Tensor(out, m.T, m.H, m.D)
			} else {
				half = make([]uint16, len(out))
				args.Out = kvplug.HalfTensor(half, tc.outType, m.T, m.H, m.D)
			}
			if err := ctx.MergeStates(args); err != nil {
				t.Fatal(err)
			}
			for i, h := range half {
				out[i] = kvplug.Float16ToFloat32(h)
			}
			dOut, dLse, dEnt := maxDiff(out, wantOut), maxDiff(lse, wantLse), maxDiff(ent, wantEnt)
			t.Logf("max |err| out %.3g, lse %.3g, entropy %.3g", dOut, dLse, dEnt)
			if !(dOut <= tc.tol && dLse <= 1e-6 && dEnt <= 1e-6) {
				t.Fatalf("max |err| out %.3g (tol %g), lse %.3g, entropy %.3g (tol 1e-6)", dOut, tc.tol, dLse, dEnt)
			}
		})
	}
}

// An empty partial (lse = -Inf) weighs nothing: merged with another, in either order, the result is
// the other exactly, whatever the empty one's out and entropy hold. A huge gap between lse values
// neither overflows nor gives NaN: the larger partial wins outright.
func TestMergeStatesEmptyPartialAndHugeGap(t *testing.T) {
	ctx := newMergeContext(t)
	m := newMergeCase(5)
	o, l, e := m.states(0, 20)
	n, rows := len(o), len(l)
	other, otherLse, otherEnt := f32s(o), f32s(l), f32s(e)
	fill := func(n int, x float32) []float32 {
		s := make([]float32, n)
		for i := range s {
			s[i] = x
		}
		return s
	}
	// merge merges the real partial with a junk one of lse junkLse, junk first or second.
	merge := func(junkLse float32, junkFirst bool) ([]float32, []float32, []float32) {
		t.Helper()
		junkOut, junkL, junkEnt := fill(n, 123.5), fill(rows, junkLse), fill(rows, 9)
		var po, pl, pe []float32
		if junkFirst {
			po, pl, pe = append(junkOut, other...), append(junkL, otherLse...), append(junkEnt, otherEnt...)
		} else {
			po, pl, pe = append(append([]float32{}, other...), junkOut...), append(append([]float32{}, otherLse...), junkL...),
				append(append([]float32{}, otherEnt...), junkEnt...)
		}
		out, lse, ent := make([]float32, n), make([]float32, rows), make([]float32, rows)
		if err := ctx.MergeStates(kvplug.MergeArgs{PartialOut: kvplug.Float32Tensor(po, 2, m.T, m.H, m.D), PartialLSE: pl,
			PartialEntropy: pe, Out: kvplug.Float32Tensor(out, m.T, m.H, m.D), LSE: lse, Entropy: ent}); err != nil {
			t.Fatal(err)
		}
		return out, lse, ent
	}
	for _, emptyFirst := range []bool{true, false} {
		out, lse, ent := merge(float32(math.Inf(-1)), emptyFirst)
		equalBits(t, "out", out, other)
		equalBits(t, "lse", lse, otherLse)
		equalBits(t, "entropy", ent, otherEnt)
	}
	// The real partial's lse is about 3; one of -1e30 is e^-1e30 times lighter: weight exactly 0.
	out, lse, ent := merge(-1e30, true)
	equalBits(t, "out (gap)", out, other)
	equalBits(t, "lse (gap)", lse, otherLse)
	if d := maxDiff(ent, e); !(d <= 1e-6) {
		t.Fatalf("entropy across a huge gap: max |err| %v", d)
	}
	// The other way round, the junk partial (lse 1e30) outweighs the real one entirely.
	out, lse, _ = merge(1e30, false)
	equalBits(t, "out (junk wins)", out, fill(n, 123.5))
	equalBits(t, "lse (junk wins)", lse, fill(rows, 1e30))
}

// Bad arguments: the binding's own checks (lengths C cannot see) and the library's (shapes, a
// missing input, overlapping outputs), each ErrInvalidArgument with a message naming the argument,
// none writing the outputs; a closed context is ErrClosed.
func TestMergeStatesErrors(t *testing.T) {
	ctx := newMergeContext(t)
	const S, T, H, D = 2, 3, 2, 8
	po, pl, pe := make([]float32, S*T*H*D), make([]float32, S*T*H), make([]float32, S*T*H)
	out, lse, ent := make([]float32, T*H*D), make([]float32, T*H), make([]float32, T*H)
	for _, s := range [][]float32{out, lse, ent} {
		for i := range s {
			s[i] = 7
		}
	}
	f32 := kvplug.Float32Tensor
	good := func() kvplug.MergeArgs {
		return kvplug.MergeArgs{PartialOut: f32(po, S, T, H, D), PartialLSE: pl, PartialEntropy: pe,
			Out: f32(out, T, H, D), LSE: lse, Entropy: ent}
	}
	for _, tc := range []struct {
		name   string
		change func(*kvplug.MergeArgs)
		substr string
	}{
		{"short partial lse", func(a *kvplug.MergeArgs) { a.PartialLSE = pl[:S*T*H-1] }, "partial_lse: len(data)"},
		{"no partial lse", func(a *kvplug.MergeArgs) { a.PartialLSE = nil }, "PartialLSE is required"},
		{"short entropy", func(a *kvplug.MergeArgs) { a.Entropy = ent[:1] }, "entropy: len(data)"},
		{"3-d partial out", func(a *kvplug.MergeArgs) { a.PartialOut = f32(po, S*T, H, D) }, "partial_out: ndim=3"},
		{"out of another shape", func(a *kvplug.MergeArgs) { a.Out = f32(out, T, H/2, 2*D); a.LSE, a.Entropy = nil, nil }, "out shape"},
		{"entropy without partials", func(a *kvplug.MergeArgs) { a.PartialEntropy = nil }, "partial_entropy is not given"},
		{"out over the partials", func(a *kvplug.MergeArgs) { a.Out = f32(po[:T*H*D], T, H, D) }, "overlaps partial_out"},
		{"entropy is lse", func(a *kvplug.MergeArgs) { a.Entropy = lse }, "entropy (bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := good()
			tc.change(&a)
			wantErr(t, ctx.MergeStates(a), kvplug.ErrInvalidArgument, tc.substr)
		})
	}
	for name, s := range map[string][]float32{"out": out, "lse": lse, "entropy": ent} {
		for i, x := range s {
			if x != 7 {
				t.Fatalf("%s[%d] = %v written by a failed call", name, i, x)
			}
		}
	}
	// The same arguments, unchanged, succeed: the failures above were the changes'.
	if err := ctx.MergeStates(good()); err != nil {
		t.Fatal(err)
	}
	closed, err := kvplug.NewContext(nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := closed.Close(); err != nil {
		t.Fatal(err)
	}
	if err := closed.MergeStates(good()); !errors.Is(err, kvplug.ErrClosed) {
		t.Fatalf("MergeStates on a closed context: %v, want ErrClosed", err)
	}
}
