package kvplug_test

import (
	"errors"
	"fmt"
	"math"
	"math/rand"

	"kvplug.dev/kvplug/internal/naive"
	"kvplug.dev/kvplug/kvplug"
)

// config is one test model: heads, cache, backend. Tests start from baseConfig and change a field.
type config struct {
	layers, qHeads, kvHeads, head    int
	blockSize, numBlocks, hostBlocks int
	cacheDType, queryDType           kvplug.DType
	layout                           kvplug.Layout
	configJSON                       string
	window                           int     // mirrors configJSON for the reference; -1 unbounded
	softCap                          float64 // mirrors configJSON for the reference
	smScale                          float32 // 0: default 1/sqrt(head)
	threads                          int
	seed                             int64
}

func baseConfig() config {
	return config{layers: 2, qHeads: 4, kvHeads: 2, head: 64, blockSize: 16, numBlocks: 64,
		cacheDType: kvplug.Float32, queryDType: kvplug.Float32, layout: kvplug.LayoutKVFirst, window: -1,
		threads: 1, seed: 1}
}

// env is a block manager, cache, plan and attention instance, plus the ground truth: every K/V row
// the test generated for each sequence, which the reference attends over.
type env struct {
	c     config
	rng   *rand.Rand
	ctx   *kvplug.Context
	bm    *kvplug.BlockManager
	cache *kvplug.KvCache
	plan  *kvplug.Plan
	attn  *kvplug.Attention
	batch *kvplug.Batch          // the last step's, for tests that plan it again
	k, v  map[uint64][][]float32 // seq -> layer -> [pos][kv head][dim] as generated (float32)
}

func newEnv(c config) (e *env, err error) {
	e = &env{c: c, rng: rand.New(rand.NewSource(c.seed)), k: map[uint64][][]float32{}, v: map[uint64][][]float32{}}
	defer func() {
		if err != nil {
			e.close()
		}
	}()
	if e.ctx, err = kvplug.NewContext(&kvplug.ContextOptions{NumThreads: c.threads}); err != nil {
		return nil, err
	}
	if e.bm, err = kvplug.NewBlockManager(kvplug.BlockManagerOptions{BlockSize: c.blockSize, NumDeviceBlocks: c.numBlocks,
		NumHostBlocks: c.hostBlocks}); err != nil {
		return nil, err
	}
	if e.cache, err = e.ctx.NewKvCache(kvplug.KvCacheOptions{NumLayers: c.layers, NumBlocks: c.numBlocks,
		BlockSize: c.blockSize, NumKVHeads: c.kvHeads, HeadSize: c.head, DType: c.cacheDType, Layout: c.layout,
		NumHostBlocks: c.hostBlocks}); err != nil {
		return nil, err
	}
	if e.plan, err = e.ctx.NewPlan(kvplug.PlanOptions{MaxNumSeqs: 16, MaxNumTokens: 512, MaxNumBlocks: c.numBlocks}); err != nil {
		return nil, err
	}
	if e.attn, err = e.ctx.NewAttention(kvplug.AttentionOptions{Backend: "dense", NumQHeads: c.qHeads,
		NumKVHeads: c.kvHeads, HeadSize: c.head, KVDType: c.cacheDType, SmScale: c.smScale,
		ConfigJSON: c.configJSON}); err != nil {
		return nil, err
	}
	return e, nil
}

// close releases everything, dependents before the context (whose Close would refuse otherwise).
func (e *env) close() error {
	for _, c := range []interface{ Close() error }{e.attn, e.plan, e.cache, e.bm} {
		if c != nil && !isNilHandle(c) {
			if err := c.Close(); err != nil {
				return err
			}
		}
	}
	if e.ctx != nil {
		return e.ctx.Close()
	}
	return nil
}

func isNilHandle(c interface{ Close() error }) bool {
	switch h := c.(type) {
	case *kvplug.Attention:
		return h == nil
	case *kvplug.Plan:
		return h == nil
	case *kvplug.KvCache:
		return h == nil
	case *kvplug.BlockManager:
		return h == nil
	}
	return false
}

func (e *env) rowLen() int { return e.c.kvHeads * e.c.head }

func (e *env) numRows(id uint64) int {
	if len(e.k[id]) == 0 {
		return 0
	}
	return len(e.k[id][0]) / e.rowLen()
}

// grow appends n random K/V rows to the ground truth of id, every layer.
func (e *env) grow(id uint64, n int) {
	if e.k[id] == nil {
		e.k[id], e.v[id] = make([][]float32, e.c.layers), make([][]float32, e.c.layers)
	}
	for l := 0; l < e.c.layers; l++ {
		for i := 0; i < n*e.rowLen(); i++ {
			e.k[id][l] = append(e.k[id][l], float32(e.rng.Float64()*2-1))
			e.v[id][l] = append(e.v[id][l], float32(e.rng.Float64()*2-1))
		}
	}
}

// fork gives child a copy of parent's ground truth (shared blocks hold the same K/V).
func (e *env) fork(parent, child uint64) {
	e.k[child], e.v[child] = make([][]float32, e.c.layers), make([][]float32, e.c.layers)
	for l := 0; l < e.c.layers; l++ {
		e.k[child][l] = append([]float32(nil), e.k[parent][l]...)
		e.v[child][l] = append([]float32(nil), e.v[parent][l]...)
	}
}

// admit allocates a sequence of n tokens in the block manager and generates its K/V.
func (e *env) admit(id uint64, n int) error {
	if _, err := e.bm.Allocate(id, n, nil, 0); err != nil {
		return err
	}
	e.grow(id, n)
	return nil
}

// writeDirect writes rows [start, start+count) of id to the cache with KvCache.Write (K/V of
// context that an earlier step would have computed).
func (e *env) writeDirect(id uint64, start, count int) error {
	slots := make([]int64, count)
	if err := e.bm.SlotMapping(id, start, slots); err != nil {
		return err
	}
	r := e.rowLen()
	for l := 0; l < e.c.layers; l++ {
		k := kvplug.Float32Tensor(e.k[id][l][start*r:(start+count)*r], count, e.c.kvHeads, e.c.head)
		v := kvplug.Float32Tensor(e.v[id][l][start*r:(start+count)*r], count, e.c.kvHeads, e.c.head)
		if err := e.cache.Write(l, k, v, slots); err != nil {
			return err
		}
	}
	return nil
}

type item struct {
	id   uint64
	qLen int // this step's tokens: the last qLen rows of the sequence
}

// result of one step: the largest deviations from the reference over all layers.
type result struct {
	maxErr, maxLseErr, maxEntErr float64
	maxEnt                       float64     // the largest reference entropy: shows the check saw spread rows
	out                          [][]float32 // per layer, as returned
}

// round is what the cache stores for x.
func round(d kvplug.DType, x float32) float64 {
	switch d {
	case kvplug.BFloat16:
		return float64(kvplug.BFloat16ToFloat32(kvplug.BFloat16FromFloat32(x)))
	case kvplug.Float16:
		return float64(kvplug.Float16ToFloat32(kvplug.Float16FromFloat32(x)))
	}
	return float64(x)
}

// step runs one batch step: plan from the block manager (dense table or CSR), this step's K/V
// through Attention.WriteKV, random queries through Attention.RunWith (out, lse and entropy), and
// compares every layer with the reference. The block manager and ground truth must already hold every row.
func (e *env) step(items []item, csr bool) (result, error) {
	n := len(items)
	qsl := []int32{0}
	ids := make([]uint64, n)
	for b, it := range items {
		ids[b] = it.id
		qsl = append(qsl, qsl[b]+int32(it.qLen))
	}
	T := int(qsl[n])
	batch := &kvplug.Batch{BlockSize: e.c.blockSize, QueryStartLoc: qsl, SeqLens: make([]int32, n),
		SlotMapping: make([]int64, T)}
	if csr {
		batch.KVIndptr = []int32{0}
		for b, id := range ids {
			table, err := e.bm.BlockTable(id)
			if err != nil {
				return result{}, err
			}
			batch.KVIndices = append(batch.KVIndices, table...)
			batch.KVIndptr = append(batch.KVIndptr, int32(len(batch.KVIndices)))
			nt, err := e.bm.NumTokens(id)
			if err != nil {
				return result{}, err
			}
			batch.SeqLens[b] = int32(nt)
		}
	} else {
		batch.BlockTableStride = e.c.numBlocks
		batch.BlockTable = make([]int32, n*e.c.numBlocks)
		if err := e.bm.BlockTables(ids, e.c.numBlocks, batch.BlockTable, batch.SeqLens); err != nil {
			return result{}, err
		}
	}
	for b, it := range items {
		if int(batch.SeqLens[b]) != e.numRows(it.id) {
			return result{}, fmt.Errorf("seq %d: block manager has %d tokens, ground truth %d", it.id, batch.SeqLens[b], e.numRows(it.id))
		}
		start := int(batch.SeqLens[b]) - it.qLen
		if err := e.bm.SlotMapping(it.id, start, batch.SlotMapping[qsl[b]:qsl[b+1]]); err != nil {
			return result{}, err
		}
	}
	if err := e.plan.Update(batch); err != nil {
		return result{}, err
	}
	e.batch = batch
	var res result
	r, qRow := e.rowLen(), e.c.qHeads*e.c.head
	scale := 1 / math.Sqrt(float64(e.c.head))
	if e.c.smScale > 0 {
		scale = float64(e.c.smScale)
	}
	p := naive.NewParams(e.c.qHeads, e.c.kvHeads, e.c.head, scale)
	p.WindowLeft, p.SoftCap = e.c.window, e.c.softCap
	for l := 0; l < e.c.layers; l++ {
		k, v := make([]float32, 0, T*r), make([]float32, 0, T*r)
		for b, it := range items {
			start := int(batch.SeqLens[b]) - it.qLen
			k = append(k, e.k[it.id][l][start*r:(start+it.qLen)*r]...)
			v = append(v, e.v[it.id][l][start*r:(start+it.qLen)*r]...)
		}
		kt, vt := kvplug.Float32Tensor(k, T, e.c.kvHeads, e.c.head), kvplug.Float32Tensor(v, T, e.c.kvHeads, e.c.head)
		if err := e.attn.WriteKV(e.plan, e.cache, l, kt, vt); err != nil {
			return result{}, err
		}
		q := make([]float32, T*qRow)
		for i := range q {
			q[i] = float32(e.rng.Float64()*2 - 1)
		}
		out, lse, ent := make([]float32, T*qRow), make([]float32, T*e.c.qHeads), make([]float32, T*e.c.qHeads)
		var qt, ot kvplug.Tensor
		var outHalf []uint16
		if e.c.queryDType == kvplug.Float32 {
			qt, ot = kvplug.Float32Tensor(q, T, e.c.qHeads, e.c.head), kvplug.Float32Tensor(out, T, e.c.qHeads, e.c.head)
		} else {
			qh := make([]uint16, len(q))
			for i, x := range q {
				qh[i] = toHalf(e.c.queryDType, x)
				q[i] = fromHalf(e.c.queryDType, qh[i]) // the reference sees what the kernel sees
			}
			outHalf = make([]uint16, len(out))
			qt = kvplug.HalfTensor(qh, e.c.queryDType, T, e.c.qHeads, e.c.head)
			ot = kvplug.HalfTensor(outHalf, e.c.queryDType, T, e.c.qHeads, e.c.head)
		}
		if err := e.attn.RunWith(e.plan, e.cache, l, qt, kvplug.Outputs{Out: ot, LSE: lse, Entropy: ent}); err != nil {
			return result{}, err
		}
		for i := range outHalf {
			out[i] = fromHalf(e.c.queryDType, outHalf[i])
		}
		res.out = append(res.out, out)
		for b, it := range items {
			seqLen := int(batch.SeqLens[b])
			kd, vd := make([]float64, seqLen*r), make([]float64, seqLen*r)
			for i := range kd {
				kd[i], vd[i] = round(e.c.cacheDType, e.k[it.id][l][i]), round(e.c.cacheDType, e.v[it.id][l][i])
			}
			qd := make([]float64, it.qLen*qRow)
			for i := range qd {
				qd[i] = float64(q[int(qsl[b])*qRow+i])
			}
			ref, refLse, refEnt := naive.States(p, seqLen, it.qLen, qd, kd, vd)
			for i, x := range ref {
				res.maxErr = math.Max(res.maxErr, math.Abs(x-float64(out[int(qsl[b])*qRow+i])))
			}
			for i, x := range refLse {
				res.maxLseErr = math.Max(res.maxLseErr, math.Abs(x-float64(lse[int(qsl[b])*e.c.qHeads+i])))
			}
			for i, x := range refEnt {
				res.maxEntErr = math.Max(res.maxEntErr, math.Abs(x-float64(ent[int(qsl[b])*e.c.qHeads+i])))
				res.maxEnt = math.Max(res.maxEnt, x)
			}
		}
	}
	if math.IsNaN(res.maxErr) || math.IsNaN(res.maxLseErr) || math.IsNaN(res.maxEntErr) {
		return res, errors.New("NaN in the output")
	}
	return res, nil
}

func toHalf(d kvplug.DType, x float32) uint16 {
	if d == kvplug.BFloat16 {
		return kvplug.BFloat16FromFloat32(x)
	}
	return kvplug.Float16FromFloat32(x)
}

func fromHalf(d kvplug.DType, h uint16) float32 {
	if d == kvplug.BFloat16 {
		return kvplug.BFloat16ToFloat32(h)
	}
	return kvplug.Float16ToFloat32(h)
}

// raggedBatch admits a seeded ragged batch mixing a one-token sequence, prefills, a chunk after
// context and decodes, writes each sequence's context directly, and returns this step's items.
func (e *env) raggedBatch(base uint64) ([]item, error) {
	shapes := []struct{ total, q int }{
		{1, 1},   // a single token
		{17, 5},  // a chunk crossing a block boundary
		{40, 40}, // a whole prompt
		{100, 1}, // decode over many blocks
		{33, 16}, // a chunk right after a full block
		{16, 16}, // exactly one block
	}
	var items []item
	for i, s := range shapes {
		id := base + uint64(i)
		if err := e.admit(id, s.total); err != nil {
			return nil, err
		}
		if ctxLen := s.total - s.q; ctxLen > 0 {
			if err := e.writeDirect(id, 0, ctxLen); err != nil {
				return nil, err
			}
		}
		items = append(items, item{id, s.q})
	}
	return items, nil
}
