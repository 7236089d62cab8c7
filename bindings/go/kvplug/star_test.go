package kvplug_test

import (
	"fmt"
	"math"
	"testing"

	"kvplug.dev/kvplug/internal/naive"
	"kvplug.dev/kvplug/kvplug"
)

// Star attention on the CPU: one prefill step of a 100-token sequence whose first 80 tokens are
// context (context blocks of 32, an anchor of 16, pages of 16).
const (
	stHQ, stHK, stD        = 4, 2, 64
	stPage, stCBS, stAnch  = 16, 32, 16
	stContext, stLen, stPg = 80, 100, 7
)

func starJSON(shards, rank int) string {
	return fmt.Sprintf(`{"backend_config_type": "StarConfig", "backend_config": {"context_block_size": %d, "anchor_block_size": %d, "num_shards": %d, "shard_rank": %d}}`,
		stCBS, stAnch, shards, rank)
}

func stVal(pos, h, x, which int) float64 {
	return math.Sin(float64(pos*131+h*17+x*7+which*1009)*0.37) * math.Cos(float64(pos+x*which+1)*0.11)
}

type starFixture struct {
	ctx   *kvplug.Context
	q     []float32
	k, v  []float32
	table []int32
}

func newStarFixture(t *testing.T) *starFixture {
	t.Helper()
	f := &starFixture{ctx: newMergeContext(t)}
	for p := 0; p < stLen; p++ {
		for h := 0; h < stHQ; h++ {
			for x := 0; x < stD; x++ {
				f.q = append(f.q, float32(stVal(p, h, x, 2)))
			}
		}
		for h := 0; h < stHK; h++ {
			for x := 0; x < stD; x++ {
				f.k, f.v = append(f.k, float32(stVal(p, h, x, 0))), append(f.v, float32(stVal(p, h, x, 1)))
			}
		}
	}
	for i := stPg - 1; i >= 0; i-- {
		f.table = append(f.table, int32(i))
	}
	return f
}

// run returns out and lse of backend over the whole sequence in one step.
func (f *starFixture) run(backend, config string, contextLens []int32) ([]float32, []float32, error) {
	cache, err := f.ctx.NewKvCache(kvplug.KvCacheOptions{NumLayers: 1, NumBlocks: stPg, BlockSize: stPage, NumKVHeads: stHK,
		HeadSize: stD, DType: kvplug.Float32})
	if err != nil {
		return nil, nil, err
	}
	defer cache.Close()
	slots := make([]int64, stLen)
	for p := range slots {
		slots[p] = int64(int(f.table[p/stPage])*stPage + p%stPage)
	}
	if err := cache.Write(0, kvplug.Float32Tensor(f.k, stLen, stHK, stD), kvplug.Float32Tensor(f.v, stLen, stHK, stD), slots); err != nil {
		return nil, nil, err
	}
	attn, err := f.ctx.NewAttention(kvplug.AttentionOptions{Backend: backend, NumQHeads: stHQ, NumKVHeads: stHK, HeadSize: stD,
		KVDType: kvplug.Float32, ConfigJSON: config})
	if err != nil {
		return nil, nil, err
	}
	defer attn.Close()
	plan, err := f.ctx.NewPlan(kvplug.PlanOptions{MaxNumSeqs: 4, MaxNumTokens: 128, MaxNumBlocks: 16})
	if err != nil {
		return nil, nil, err
	}
	defer plan.Close()
	if err := plan.Attach(attn); err != nil {
		return nil, nil, err
	}
	if err := plan.Update(&kvplug.Batch{BlockSize: stPage, QueryStartLoc: []int32{0, stLen}, SeqLens: []int32{stLen},
		BlockTable: f.table, BlockTableStride: stPg, ContextLens: contextLens}); err != nil {
		return nil, nil, err
	}
	out, lse := make([]float32, stLen*stHQ*stD), make([]float32, stLen*stHQ)
	err = attn.Run(plan, cache, 0, kvplug.Float32Tensor(f.q, stLen, stHQ, stD), kvplug.Float32Tensor(out, stLen, stHQ, stD), lse)
	return out, lse, err
}

// ref is the f64 attention of query pos over exactly keys.
func (f *starFixture) ref(pos int, keys []int) ([]float64, []float64) {
	p := naive.NewParams(stHQ, stHK, stD, 1/math.Sqrt(stD))
	row := stHK * stD
	var kd, vd []float64
	for _, j := range keys {
		for i := 0; i < row; i++ {
			kd, vd = append(kd, float64(f.k[j*row+i])), append(vd, float64(f.v[j*row+i]))
		}
	}
	qd := make([]float64, stHQ*stD)
	for i := range qd {
		qd[i] = float64(f.q[pos*stHQ*stD+i])
	}
	o, l, _ := naive.States(p, len(keys), 1, qd, kd, vd) // qLen 1: sees every listed key
	return o, l
}

func span(lo, hi int) []int {
	var s []int
	for i := lo; i < hi; i++ {
		s = append(s, i)
	}
	return s
}

func TestStarRegistered(t *testing.T) {
	names, err := kvplug.Backends()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, n := range names {
		found = found || n == "star"
	}
	info, err := kvplug.GetBackendDeviceInfo("star", kvplug.DeviceCPU)
	if !found || err != nil || !info.Available || !info.SupportsHeadSize(stD) {
		t.Fatalf("star: listed %v, %+v, %v", found, info, err)
	}
	if err := kvplug.CheckConfig("star", kvplug.ConfigJSON, []byte(starJSON(1, 0))); err != nil {
		t.Fatal(err)
	}
}

// Phase 1: a token of block k > 0 sees [anchor ; block k up to itself]; phase 2 every key up to itself.
func TestStarPhase1(t *testing.T) {
	f := newStarFixture(t)
	out, lse, err := f.run("star", starJSON(1, 0), []int32{stContext})
	if err != nil {
		t.Fatal(err)
	}
	worst := 0.0
	for pos := 0; pos < stLen; pos++ {
		keys := span(0, pos+1)
		if pos < stContext && pos >= stCBS {
			keys = append(span(0, stAnch), span(pos/stCBS*stCBS, pos+1)...)
		}
		o, l := f.ref(pos, keys)
		worst = math.Max(worst, maxDiff(out[pos*stHQ*stD:(pos+1)*stHQ*stD], o))
		worst = math.Max(worst, maxDiff(lse[pos*stHQ:(pos+1)*stHQ], l))
	}
	if !(worst < 2e-5) {
		t.Fatalf("max |star - reference| = %g", worst)
	}
}

// Without ContextLens star is dense (all tokens are phase 2), and dense ignores ContextLens.
func TestStarWithoutContextIsDense(t *testing.T) {
	f := newStarFixture(t)
	star, starLse, err := f.run("star", starJSON(1, 0), nil)
	if err != nil {
		t.Fatal(err)
	}
	dense, denseLse, err := f.run("dense", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	dense2, _, err := f.run("dense", "", []int32{stContext})
	if err != nil {
		t.Fatal(err)
	}
	for i := range star {
		if math.Abs(float64(star[i]-dense[i])) > 1e-5 || dense[i] != dense2[i] {
			t.Fatalf("out[%d]: star %g dense %g dense with context %g", i, star[i], dense[i], dense2[i])
		}
	}
	for i := range starLse {
		if math.Abs(float64(starLse[i]-denseLse[i])) > 1e-5 {
			t.Fatalf("lse[%d]: star %g dense %g", i, starLse[i], denseLse[i])
		}
	}
}

func TestStarErrors(t *testing.T) {
	wantErr(t, kvplug.CheckConfig("star", kvplug.ConfigJSON, []byte(starJSON(2, 2))), kvplug.ErrInvalidConfig, "")
	f := newStarFixture(t)
	_, _, err := f.run("star", starJSON(2, 0), []int32{stContext})
	wantErr(t, err, kvplug.ErrInvalidArgument, "query_pos_starts")
	_, _, err = f.run("star", starJSON(1, 0), []int32{1, 2})
	wantErr(t, err, kvplug.ErrInvalidArgument, "ContextLens")
	_, _, err = f.run("star", starJSON(1, 0), []int32{-1})
	wantErr(t, err, kvplug.ErrInvalidArgument, "")
}

// AllocateStar: a document whose middle context block differs still hits the anchor's block and
// the block after the change.
func TestAllocateStar(t *testing.T) {
	bm, err := kvplug.NewBlockManager(kvplug.BlockManagerOptions{BlockSize: 4, NumDeviceBlocks: 32, EnablePrefixCaching: true})
	if err != nil {
		t.Fatal(err)
	}
	defer bm.Close()
	doc := func(middle int32) []int32 {
		var d []int32
		for i := int32(0); i < 8; i++ {
			d = append(d, 100+i)
		}
		for i := int32(0); i < 8; i++ {
			d = append(d, middle+i)
		}
		for i := int32(0); i < 8; i++ {
			d = append(d, 300+i)
		}
		return append(d, 900, 901, 902, 903, 904)
	}
	layout := kvplug.StarLayout{ContextLen: 24, ContextBlockSize: 8, AnchorSize: 4}
	cached, n, err := bm.AllocateStar(1, 29, doc(200), 0, layout)
	if err != nil || n != 0 || fmt.Sprint(cached) != fmt.Sprint(make([]bool, 8)) {
		t.Fatalf("first: %v %d %v", cached, n, err)
	}
	if err := bm.MarkComputed(1, 29); err != nil {
		t.Fatal(err)
	}
	cached, n, err = bm.AllocateStar(2, 29, doc(250), 0, layout)
	if err != nil || n != 16 || fmt.Sprint(cached) != fmt.Sprint([]bool{true, true, false, false, true, true, false, false}) {
		t.Fatalf("second: %v %d %v", cached, n, err)
	}
	for _, c := range []struct {
		l    kvplug.StarLayout
		want string
	}{
		{kvplug.StarLayout{ContextLen: 24, ContextBlockSize: 6, AnchorSize: 4}, "context_block_size"},
		{kvplug.StarLayout{ContextLen: 24, ContextBlockSize: 8, AnchorSize: 0}, "anchor_size"},
		{kvplug.StarLayout{ContextLen: -1, ContextBlockSize: 8, AnchorSize: 4}, "context_len"},
	} {
		_, _, err := bm.AllocateStar(3, 29, doc(200), 0, c.l)
		wantErr(t, err, kvplug.ErrInvalidArgument, c.want)
	}
	_, _, err = bm.AllocateStar(3, 29, nil, 0, layout)
	wantErr(t, err, kvplug.ErrInvalidArgument, "token_ids")
	_, _, err = bm.AllocateStar(2, 29, doc(200), 0, layout)
	wantErr(t, err, kvplug.ErrAlreadyExists, "")
	_, _, err = bm.AllocateStar(3, 28, doc(200), 0, layout)
	wantErr(t, err, kvplug.ErrInvalidArgument, "len(tokenIDs)")
}
