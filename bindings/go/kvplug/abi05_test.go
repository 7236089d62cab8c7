package kvplug_test

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"

	"kvplug.dev/kvplug/kvplug"
)

// ABI 0.5: Attention.CacheLayout for dense and attamba (against attamba.h's formulas) and one
// Attention.SSM run with its error path.
const (
	a5P, a5L, a5Layers, a5Layer = 4, 3, 2, 1 // chunk size, window; layer 1 of 2: cyclic offset 2
	a5Page, a5Head              = 8, 32
)

func attambaJSON(ssmHeads int) string {
	return fmt.Sprintf(`{"backend_config_type": "AttambaConfig", "backend_config": {"chunk_size": %d, "window": %d,
		"layer_index": %d, "num_layers": %d, "chunk_offsets": "Cyclic", "ssm_heads": %d, "ssm_head_dim": 4,
		"state_size": 4, "ssm_groups": 1, "conv_width": 3}}`, a5P, a5L, a5Layer, a5Layers, ssmHeads)
}

func newAttention(t *testing.T, ctx *kvplug.Context, backend, json string) *kvplug.Attention {
	t.Helper()
	a, err := ctx.NewAttention(kvplug.AttentionOptions{Backend: backend, NumQHeads: 4, NumKVHeads: 2, HeadSize: a5Head,
		KVDType: kvplug.Float32, ConfigJSON: json})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	return a
}

// chunkEnds counts the chunk ends in [0, n) as attamba.h lists them: 0 and j*P + P-1 - off.
func chunkEnds(n, off int) int {
	count := 0
	for p := 0; p < n; p++ {
		end := p == 0
		for j := 0; j <= n/a5P+1 && !end; j++ {
			end = j*a5P+a5P-1-off == p
		}
		if end {
			count++
		}
	}
	return count
}

// go.mod's language version (1.19) predates the min/max builtins.
func imin(a, b int) int {
	if a < b {
		return a
	}
	return b
}

func imax(a, b int) int {
	if a > b {
		return a
	}
	return b
}

func expectedLayout(n, p0, bs int) kvplug.CacheLayout {
	most, least := 0, math.MaxInt
	for l := 0; l < a5Layers; l++ {
		r := chunkEnds(n, imin(a5P-1, l*(a5P/a5Layers)))
		most, least = imax(most, r), imin(least, r)
	}
	comp := (most + bs - 1) / bs
	first := imax(0, p0-a5L) / bs
	win := (n+bs-1)/bs - first
	return kvplug.CacheLayout{SeqLen: comp*bs + n - first*bs, NumPages: comp + win, CompressedRows: most,
		CompressedPages: comp, StableRows: least, WindowFirstPage: first, WindowPages: win}
}

func TestCacheLayout(t *testing.T) {
	ctx, err := kvplug.NewContext(&kvplug.ContextOptions{NumThreads: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer ctx.Close()
	dense := newAttention(t, ctx, "dense", "")
	for _, c := range [][2]int{{0, 0}, {1, 0}, {17, 5}, {64, 63}} {
		got, err := dense.CacheLayout(a5Page, c[0], c[1])
		pages := (c[0] + a5Page - 1) / a5Page
		if want := (kvplug.CacheLayout{SeqLen: c[0], NumPages: pages, WindowPages: pages}); err != nil || got != want {
			t.Errorf("dense %v: %+v, %v; want %+v", c, got, err, want)
		}
	}
	attn := newAttention(t, ctx, "attamba", attambaJSON(0))
	for _, c := range [][2]int{{1, 0}, {4, 0}, {38, 0}, {40, 0}, {46, 40}, {100, 99}, {100, 2}, {9, 9}} {
		got, err := attn.CacheLayout(a5Page, c[0], c[1])
		if want := expectedLayout(c[0], c[1], a5Page); err != nil || got != want {
			t.Errorf("attamba %v: %+v, %v; want %+v", c, got, err, want)
		}
	}
	// The layers' row counts differ at 38 (layer 0's ends 0, 3, .., 35; layer 1's 0, 1, 5, .., 37).
	if l, _ := attn.CacheLayout(a5Page, 38, 0); l.StableRows != 10 || l.CompressedRows != 11 {
		t.Errorf("38 tokens: %+v", l)
	}
	if _, err := attn.CacheLayout(0, 10, 0); !errors.Is(err, kvplug.ErrInvalidArgument) || !strings.Contains(err.Error(), "block_size=0") {
		t.Errorf("block_size 0: %v", err)
	}
	if _, err := attn.CacheLayout(a5Page, 1<<40, 0); !errors.Is(err, kvplug.ErrInvalidArgument) {
		t.Errorf("numTokens beyond int32: %v", err)
	}
}

func TestSSM(t *testing.T) {
	ctx, err := kvplug.NewContext(&kvplug.ContextOptions{NumThreads: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer ctx.Close()
	attn := newAttention(t, ctx, "attamba", attambaJSON(2))
	const T, dInner, convDim, heads = 10, 8, 16, 2
	state, err := attn.StateBytes()
	// attamba.h: two SSMs of (conv_width - 1) conv_dim + heads head_dim state floats.
	if want := int64(2 * (2*convDim + dInner*4) * 4); err != nil || state != want {
		t.Fatalf("StateBytes %d, %v; want %d", state, err, want)
	}
	cache, err := ctx.NewKvCache(kvplug.KvCacheOptions{NumLayers: 1, NumBlocks: 8, BlockSize: a5Page, NumKVHeads: 2,
		HeadSize: a5Head, DType: kvplug.Float32, NumStateSlots: 1, StateBytesPerLayer: state})
	if err != nil {
		t.Fatal(err)
	}
	defer cache.Close()
	plan, err := ctx.NewPlan(kvplug.PlanOptions{MaxNumSeqs: 1, MaxNumTokens: 16, MaxNumBlocks: 8})
	if err != nil {
		t.Fatal(err)
	}
	defer plan.Close()
	if err := plan.Attach(attn); err != nil {
		t.Fatal(err)
	}
	l, err := attn.CacheLayout(a5Page, T, 0)
	if err != nil {
		t.Fatal(err)
	}
	table := make([]int32, l.NumPages)
	for i := range table {
		table[i] = int32(i)
	}
	if err := plan.Update(&kvplug.Batch{BlockSize: a5Page, QueryStartLoc: []int32{0, T}, SeqLens: []int32{int32(l.SeqLen)},
		BlockTable: table, BlockTableStride: len(table), StateSlots: []int32{0}, QueryPosStarts: []int32{0}}); err != nil {
		t.Fatal(err)
	}
	inDim := 2*dInner + 2*4 + heads
	in := make([]float32, T*inDim)
	for i := range in {
		in[i] = float32(math.Sin(float64(i) * 0.37))
	}
	conv := make([]float32, convDim*3)
	for i := range conv {
		conv[i] = float32(math.Cos(float64(i)*0.11)) * 0.5
	}
	out := make([]float32, T*dInner)
	for i := range out {
		out[i] = float32(math.NaN())
	}
	args := kvplug.SSMArgs{In: kvplug.Float32Tensor(in, T, inDim), ConvWeight: kvplug.Float32Tensor(conv, convDim, 3),
		ALog: []float32{0.1, -0.2}, DSkip: []float32{1, 1}, Out: kvplug.Float32Tensor(out, T, dInner)}
	if err := attn.SSM(plan, cache, 0, args); err != nil {
		t.Fatal(err)
	}
	nonzero := false
	for i, x := range out {
		if math.IsNaN(float64(x)) || math.IsInf(float64(x), 0) {
			t.Fatalf("out[%d] = %v", i, x)
		}
		nonzero = nonzero || x != 0
	}
	if !nonzero {
		t.Error("out is all zero")
	}
	args.Which = 2
	if err := attn.SSM(plan, cache, 0, args); !errors.Is(err, kvplug.ErrInvalidArgument) || !strings.Contains(err.Error(), "which=2") {
		t.Errorf("which=2: %v", err)
	}
	args.Which, args.ALog = 0, []float32{0.1, 0.2, 0.3}
	if err := attn.SSM(plan, cache, 0, args); !errors.Is(err, kvplug.ErrInvalidArgument) || !strings.Contains(err.Error(), "a_log") {
		t.Errorf("a_log of 3: %v", err)
	}
	args.ALog = []float32{0.1, -0.2}
	dense := newAttention(t, ctx, "dense", "")
	if err := dense.SSM(plan, cache, 0, args); !errors.Is(err, kvplug.ErrNotSupported) {
		t.Errorf("dense SSM: %v", err)
	}
}
