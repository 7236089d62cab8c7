package kvplug

import (
	"math"
	"testing"
)

// The Go status names must be the library's (kvp_status_string), code for code; a renumbered or
// renamed code in either would show here.
func TestStatusNamesMatchLibrary(t *testing.T) {
	for s := StatusOK; s <= StatusDevice; s++ {
		if got, want := s.String(), statusStringFromLibrary(s); got != want {
			t.Errorf("Status(%d).String() = %q, library says %q", s, got, want)
		}
	}
	if got, want := Status(12).String(), statusStringFromLibrary(12); got != want {
		t.Errorf("unknown status: %q vs library %q", got, want)
	}
}

// The ABI check passes against the library the tests link (and is what NewContext runs).
func TestABICheck(t *testing.T) {
	if err := checkABI(); err != nil {
		t.Fatal(err)
	}
}

// Compiled against ABI 0.3 (run_v2, merge_states, device info, attach, state bytes): a 0.3 or
// newer 0.x library is accepted, a 0.2 one (which would reject the 0.3 structs, or lack the
// symbols) and another major version are not.
func TestABIVersionAccepts03(t *testing.T) {
	if HeaderVersionMajor != 0 || HeaderVersionMinor < 3 {
		t.Fatalf("compiled against header %d.%d, want 0.x with x >= 3", HeaderVersionMajor, HeaderVersionMinor)
	}
	for _, c := range []struct {
		major, minor int
		ok           bool
	}{
		{0, HeaderVersionMinor, true}, {0, HeaderVersionMinor + 1, true}, {0, 2, false}, {1, HeaderVersionMinor, false},
	} {
		if got := abiCompatible(c.major, c.minor); got != c.ok {
			t.Errorf("abiCompatible(%d, %d) = %v, want %v", c.major, c.minor, got, c.ok)
		}
	}
	if major, minor, _ := ABIVersion(); !abiCompatible(major, minor) {
		t.Fatalf("the linked library's ABI %d.%d is not accepted", major, minor)
	}
}

// Float16: every finite half survives half -> float32 -> half exactly; known encodings, rounding
// to nearest even at ties, overflow to infinity and subnormals.
func TestFloat16Conversion(t *testing.T) {
	for h := 0; h < 1<<16; h++ {
		u := uint16(h)
		f := Float16ToFloat32(u)
		if math.IsNaN(float64(f)) {
			if u&0x7c00 != 0x7c00 || u&0x3ff == 0 {
				t.Fatalf("%#04x decoded as NaN", u)
			}
			if back := Float16FromFloat32(f); back&0x7c00 != 0x7c00 || back&0x3ff == 0 {
				t.Fatalf("NaN %#04x re-encoded as %#04x", u, back)
			}
			continue
		}
		if back := Float16FromFloat32(f); back != u {
			t.Fatalf("%#04x -> %v -> %#04x", u, f, back)
		}
	}
	for _, c := range []struct {
		f float32
		h uint16
	}{
		{1, 0x3c00}, {-2, 0xc000}, {65504, 0x7bff}, {65520, 0x7c00}, {1e6, 0x7c00},
		{float32(math.Ldexp(1, -24)), 0x0001}, {float32(math.Ldexp(1, -25)), 0x0000}, // tie to even: 0
		{float32(math.Ldexp(3, -25)), 0x0002},     // 1.5 ulp: tie to even 2
		{1 + float32(math.Ldexp(1, -11)), 0x3c00}, // tie between 1 and 1+2^-10: even (1)
		{1 + float32(math.Ldexp(3, -11)), 0x3c02}, // tie between 1+2^-10 and 1+2^-9: even
		{float32(math.Inf(-1)), 0xfc00},
	} {
		if got := Float16FromFloat32(c.f); got != c.h {
			t.Errorf("Float16FromFloat32(%g) = %#04x, want %#04x", c.f, got, c.h)
		}
	}
}

func TestBFloat16Conversion(t *testing.T) {
	for _, c := range []struct {
		f float32
		h uint16
	}{
		{1, 0x3f80}, {-1, 0xbf80},
		{math.Float32frombits(0x3f808000), 0x3f80}, // tie: even
		{math.Float32frombits(0x3f818000), 0x3f82}, // tie: even (up)
		{math.Float32frombits(0x3f808001), 0x3f81}, // above the tie
		{float32(math.Inf(1)), 0x7f80},
	} {
		if got := BFloat16FromFloat32(c.f); got != c.h {
			t.Errorf("BFloat16FromFloat32(%g) = %#04x, want %#04x", c.f, got, c.h)
		}
		if c.f == c.f && BFloat16ToFloat32(c.h) != math.Float32frombits(uint32(c.h)<<16) {
			t.Errorf("BFloat16ToFloat32(%#04x)", c.h)
		}
	}
	if nan := BFloat16FromFloat32(float32(math.NaN())); !math.IsNaN(float64(BFloat16ToFloat32(nan))) {
		t.Errorf("NaN -> %#04x is not NaN", nan)
	}
	// A NaN whose payload sits only in the low bits must not round into infinity.
	if h := BFloat16FromFloat32(math.Float32frombits(0x7f800001)); !math.IsNaN(float64(BFloat16ToFloat32(h))) {
		t.Errorf("low-payload NaN -> %#04x", h)
	}
}

// desc rejects what C cannot check: slice length against shape, too many dimensions, and a
// dtype that does not fit the data.
func TestTensorDesc(t *testing.T) {
	if _, _, err := Float32Tensor(make([]float32, 6), 2, 3).desc("op", "x"); err != nil {
		t.Fatal(err)
	}
	if _, p, err := Float32Tensor(nil, 0, 3).desc("op", "x"); err != nil || p != nil {
		t.Fatalf("empty tensor: %v %v", p, err)
	}
	for name, tt := range map[string]Tensor{
		"short":       Float32Tensor(make([]float32, 5), 2, 3),
		"long":        Float32Tensor(make([]float32, 7), 2, 3),
		"negative":    Float32Tensor(make([]float32, 6), -2, -3),
		"ndim5":       Float32Tensor(make([]float32, 1), 1, 1, 1, 1, 1),
		"f32 on u16":  HalfTensor(make([]uint16, 6), Float32, 2, 3),
		"fp8":         HalfTensor(make([]uint16, 6), FP8E4M3, 2, 3),
		"half on f32": {dtype: Float16, shape: []int64{6}, f32: make([]float32, 6)},
	} {
		if _, _, err := tt.desc("op", "x"); err == nil || err.(*Error).Code != StatusInvalidArgument {
			t.Errorf("%s: %v, want an InvalidArgument error", name, err)
		}
	}
}

// A rank that contributes twice to the open round gets ErrFailedPrecondition; the round then
// completes with the other rank (staging memory is held by the comm until Close).
func TestCommContributeTwice(t *testing.T) {
	ctx, err := NewContext(&ContextOptions{NumThreads: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer ctx.Close()
	c, err := ctx.NewComm(CommOptions{Kind: CommInProcess, NumRanks: 2, MaxNumTokens: 4, NumHeads: 1, HeadSize: 8, OutDType: Float32})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	out := Float32Tensor(make([]float32, 8), 1, 1, 8)
	if err := c.contribute("test", 0, out, []float32{0}, true); err != nil {
		t.Fatal(err)
	}
	if n, err := c.Pending(); n != 1 || err != nil {
		t.Fatalf("pending %d %v", n, err)
	}
	err = c.contribute("test", 0, out, []float32{0}, true)
	if e, ok := err.(*Error); !ok || e.Code != StatusFailedPrecondition {
		t.Fatalf("second contribution of rank 0: %v", err)
	}
	err = c.contribute("test", 1, Float32Tensor(make([]float32, 16), 2, 1, 8), []float32{0, 0}, true)
	if e, ok := err.(*Error); !ok || e.Code != StatusInvalidArgument {
		t.Fatalf("rank 1 with another row count: %v", err)
	}
	if err := c.contribute("test", 1, out, []float32{0}, true); err != nil {
		t.Fatal(err)
	}
	if n, err := c.Pending(); n != 0 || err != nil {
		t.Fatalf("pending after the round %d %v", n, err)
	}
}
