// Command demo is bench/demo.cc through the Go binding: what an engine does with kvplug, end to
// end. A block manager with prefix caching and a paged KV cache serve a small batch through the
// dense backend: ragged prompts sharing a system prompt, admitted over several steps (the later
// ones hit the prefix cache), chunked prefill mixed with decode, a forked sequence whose first
// append copies its shared block (copy-on-write through KvCache.CopyBlocks), then decode steps.
// Every output is checked against a naive contiguous attention in float64. Exits 2 if an error is
// over tolerance (1e-5 for a float32 cache, 1e-4 for bfloat16), 1 on a failed call.
//
//	CGO_LDFLAGS="-L$BUILD/abi -Wl,-rpath,$BUILD/abi" go run ./cmd/demo
package main

import (
	"fmt"
	"math"
	"os"
	"time"

	"kvplug.dev/kvplug/internal/naive"
	"kvplug.dev/kvplug/kvplug"
)

const (
	layers, qHeads, kvHeads, headSize, blockSize, numBlocks = 2, 8, 2, 128, 16, 96
	chunk                                                   = 32 // prefill tokens per sequence per step
)

func check(err error, what string) {
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s failed: %v\n", what, err)
		os.Exit(1)
	}
}

// feature: K, V and Q are functions of (token, position, layer, head, i), so a shared prefix has
// the same K/V in every sequence, as a real model's would. Bit for bit bench/demo.cc's Feature.
func feature(token uint64, pos, layer, head, i, which int) float32 {
	x := token*0x9E3779B97F4A7C15 ^ uint64(pos)<<20 ^ uint64(layer)<<40 ^ uint64(head)<<48 ^ uint64(i)<<8 ^ uint64(which)<<60
	x ^= x >> 33
	x *= 0xff51afd7ed558ccd
	x ^= x >> 33
	x *= 0xc4ceb9fe1a85ec53
	x ^= x >> 33
	return float32(float64(x>>11)/9007199254740992.0*2.0 - 1.0)
}

type sequence struct {
	id         uint64
	tokens     []int32 // all tokens so far
	computed   int     // tokens whose K/V is in the cache
	decodeLeft int
}

type row struct {
	dtype                                                      kvplug.DType
	seqs, prefillTokens, decodeTokens, cachedTokens, cowCopies int
	kvBytes                                                    int64
	ms, maxErr                                                 float64
}

func serve(ctx *kvplug.Context, kvDType kvplug.DType) row {
	r := row{dtype: kvDType}
	bm, err := kvplug.NewBlockManager(kvplug.BlockManagerOptions{BlockSize: blockSize, NumDeviceBlocks: numBlocks,
		EnablePrefixCaching: true, Watermark: 0.01})
	check(err, "NewBlockManager")
	defer bm.Close()
	cache, err := ctx.NewKvCache(kvplug.KvCacheOptions{NumLayers: layers, NumBlocks: numBlocks, BlockSize: blockSize,
		NumKVHeads: kvHeads, HeadSize: headSize, DType: kvDType, Layout: kvplug.LayoutKVFirst})
	check(err, "NewKvCache")
	defer cache.Close()
	attn, err := ctx.NewAttention(kvplug.AttentionOptions{Backend: "dense", NumQHeads: qHeads, NumKVHeads: kvHeads,
		HeadSize: headSize, KVDType: kvDType})
	check(err, "NewAttention")
	defer attn.Close()
	plan, err := ctx.NewPlan(kvplug.PlanOptions{MaxNumSeqs: 16, MaxNumTokens: 512, MaxNumBlocks: numBlocks})
	check(err, "NewPlan")
	defer plan.Close()

	// A 48-token system prompt shared by every request, then ragged user prompts. Request r
	// arrives at step arrival[r]: the later ones find the system prompt already computed.
	system := make([]int32, 48)
	for i := range system {
		system[i] = int32(1000 + i)
	}
	userLens := []int{13, 29, 7, 50}
	arrival := []int{0, 2, 2, 3}
	var seqs []*sequence
	admitted := 0
	admit := func(step int) {
		for ; admitted < 4 && arrival[admitted] <= step; admitted++ {
			req := admitted
			s := &sequence{id: uint64(req + 1), tokens: append([]int32(nil), system...), decodeLeft: 8}
			for i := 0; i < userLens[req]; i++ {
				s.tokens = append(s.tokens, int32(5000+100*req+i))
			}
			cached, err := bm.Allocate(s.id, len(s.tokens), s.tokens, 0)
			check(err, "BlockManager.Allocate")
			s.computed = cached
			r.cachedTokens += cached
			seqs = append(seqs, s)
		}
	}
	p := naive.NewParams(qHeads, kvHeads, headSize, 1/math.Sqrt(headSize))
	// What the cache holds for a float32 value: the reference is fed the same rounded K/V.
	round := func(f float32) float64 {
		if kvDType == kvplug.BFloat16 {
			return float64(kvplug.BFloat16ToFloat32(kvplug.BFloat16FromFloat32(f)))
		}
		return float64(f)
	}
	forked := false
	peakUsed := 0
	for step := 0; ; step++ {
		admit(step)
		// Schedule: each sequence contributes its next prefill chunk, or one decode token.
		var batch []*sequence
		var qLens []int
		for _, s := range seqs {
			if pending := len(s.tokens) - s.computed; pending > 0 {
				batch = append(batch, s)
				qLens = append(qLens, min(pending, chunk))
				continue
			}
			if s.decodeLeft == 0 {
				continue
			}
			// Decode: append the next token (greedy stand-in: a function of the sequence and step).
			next := int32(7 + (s.id*131+uint64(len(s.tokens))*17)%9000)
			cp, needed, err := bm.Append(s.id, 1, []int32{next})
			check(err, "BlockManager.Append")
			if needed {
				check(cache.CopyBlocks([]kvplug.BlockCopy{cp}), "KvCache.CopyBlocks")
				r.cowCopies++
			}
			s.tokens = append(s.tokens, next)
			s.decodeLeft--
			r.decodeTokens++
			batch = append(batch, s)
			qLens = append(qLens, 1)
		}
		if len(batch) == 0 && admitted == 4 {
			break
		}
		if len(batch) == 0 {
			continue
		}
		n := len(batch)
		ids := make([]uint64, n)
		qsl := []int32{0}
		for b, s := range batch {
			ids[b] = s.id
			qsl = append(qsl, qsl[b]+int32(qLens[b]))
		}
		T := int(qsl[n])
		table, lens := make([]int32, n*numBlocks), make([]int32, n)
		check(bm.BlockTables(ids, numBlocks, table, lens), "BlockManager.BlockTables")
		// seq_lens for attention: tokens computed after this step (the rest of a prompt comes later).
		slots := make([]int64, T)
		for b, s := range batch {
			lens[b] = int32(s.computed + qLens[b])
			check(bm.SlotMapping(s.id, s.computed, slots[qsl[b]:qsl[b+1]]), "BlockManager.SlotMapping")
		}
		t0 := time.Now()
		check(plan.Update(&kvplug.Batch{BlockSize: blockSize, QueryStartLoc: qsl, SeqLens: lens, BlockTable: table,
			BlockTableStride: numBlocks, SlotMapping: slots}), "Plan.Update")
		r.ms += float64(time.Since(t0).Microseconds()) / 1000
		for layer := 0; layer < layers; layer++ {
			k, v := make([]float32, T*kvHeads*headSize), make([]float32, T*kvHeads*headSize)
			q, out := make([]float32, T*qHeads*headSize), make([]float32, T*qHeads*headSize)
			lse := make([]float32, T*qHeads)
			for b, s := range batch {
				for i := 0; i < qLens[b]; i++ {
					pos, t := s.computed+i, int(qsl[b])+i
					tok := uint64(s.tokens[pos])
					for h := 0; h < kvHeads; h++ {
						for x := 0; x < headSize; x++ {
							k[(t*kvHeads+h)*headSize+x] = feature(tok, pos, layer, h, x, 0)
							v[(t*kvHeads+h)*headSize+x] = feature(tok, pos, layer, h, x, 1)
						}
					}
					for h := 0; h < qHeads; h++ {
						for x := 0; x < headSize; x++ {
							q[(t*qHeads+h)*headSize+x] = feature(tok^s.id, pos, layer, h, x, 2)
						}
					}
				}
			}
			t1 := time.Now()
			check(attn.WriteKV(plan, cache, layer, kvplug.Float32Tensor(k, T, kvHeads, headSize),
				kvplug.Float32Tensor(v, T, kvHeads, headSize)), "Attention.WriteKV")
			check(attn.Run(plan, cache, layer, kvplug.Float32Tensor(q, T, qHeads, headSize),
				kvplug.Float32Tensor(out, T, qHeads, headSize), lse), "Attention.Run")
			r.ms += float64(time.Since(t1).Microseconds()) / 1000
			// Reference: contiguous K/V of each sequence rebuilt from the features, in float64.
			for b, s := range batch {
				seqLen := int(lens[b])
				kd, vd := make([]float64, 0, seqLen*kvHeads*headSize), make([]float64, 0, seqLen*kvHeads*headSize)
				for pos := 0; pos < seqLen; pos++ {
					for h := 0; h < kvHeads; h++ {
						for x := 0; x < headSize; x++ {
							kd = append(kd, round(feature(uint64(s.tokens[pos]), pos, layer, h, x, 0)))
							vd = append(vd, round(feature(uint64(s.tokens[pos]), pos, layer, h, x, 1)))
						}
					}
				}
				lo, hi := int(qsl[b])*qHeads*headSize, int(qsl[b+1])*qHeads*headSize
				qd := make([]float64, hi-lo)
				for i := range qd {
					qd[i] = float64(q[lo+i])
				}
				ref, _ := naive.Attention(p, seqLen, qLens[b], qd, kd, vd)
				for i, x := range ref {
					if d := math.Abs(x - float64(out[lo+i])); d > r.maxErr || math.IsNaN(d) {
						r.maxErr = d
					}
				}
			}
		}
		for b, s := range batch {
			s.computed += qLens[b]
			check(bm.MarkComputed(s.id, s.computed), "BlockManager.MarkComputed")
		}
		st, err := bm.Stats()
		check(err, "BlockManager.Stats")
		peakUsed = max(peakUsed, st.NumUsedBlocks)
		// Once request 1's prompt is in, fork it (parallel sampling): its partial last block is
		// shared until the first append copies it.
		if !forked && seqs[0].computed == len(seqs[0].tokens) {
			check(bm.Fork(1, 99), "BlockManager.Fork")
			child := *seqs[0]
			child.id, child.decodeLeft = 99, 8
			child.tokens = append([]int32(nil), seqs[0].tokens...)
			seqs = append(seqs, &child)
			forked = true
		}
	}
	bytesPerBlock := int64(2*blockSize*kvHeads*headSize*kvDType.Size()) * layers
	r.kvBytes = int64(peakUsed) * bytesPerBlock // peak, all layers
	r.seqs = len(seqs)
	promptTotal := 0
	for _, n := range userLens {
		promptTotal += 48 + n
	}
	r.prefillTokens = promptTotal - r.cachedTokens
	for _, s := range seqs {
		check(bm.Free(s.id), "BlockManager.Free")
	}
	end, err := bm.Stats()
	check(err, "BlockManager.Stats")
	if end.NumUsedBlocks != 0 {
		fmt.Fprintf(os.Stderr, "block leak: %d used after freeing all\n", end.NumUsedBlocks)
		os.Exit(1)
	}
	return r
}

func min(a, b int) int {
	if a < b {
		return a
	}
	return b
}

func max(a, b int) int {
	if a > b {
		return a
	}
	return b
}

func main() {
	major, minor, patch := kvplug.ABIVersion()
	fmt.Printf("kvplug %s (ABI %d.%d.%d) through the Go binding\n", kvplug.VersionString(), major, minor, patch)
	names, err := kvplug.Backends()
	check(err, "Backends")
	fmt.Printf("backends: %v (this demo serves dense)\n", names)
	fmt.Printf("model: %d layers, %d query / %d KV heads, head size %d, block size %d; 4 requests sharing a "+
		"48-token system prompt, chunked prefill (%d tokens), a fork, 8 decode steps each\n\n",
		layers, qHeads, kvHeads, headSize, blockSize, chunk)
	ctx, err := kvplug.NewContext(nil)
	check(err, "NewContext")
	info, err := kvplug.GetBackendInfo("dense")
	check(err, "GetBackendInfo")
	rows := []row{serve(ctx, kvplug.Float32)}
	if info.SupportsDType(kvplug.BFloat16) {
		rows = append(rows, serve(ctx, kvplug.BFloat16))
	}
	check(ctx.Close(), "Context.Close")

	fmt.Printf("%-10s %-6s %-9s %5s %8s %7s %7s %4s %10s %9s %12s\n", "backend", "device", "kv dtype", "seqs",
		"prefill", "cached", "decode", "cow", "KV bytes", "time ms", "max |err|")
	ok := true
	for _, r := range rows {
		tol := 1e-5
		if r.dtype != kvplug.Float32 {
			tol = 1e-4
		}
		flag := ""
		if !(r.maxErr <= tol) {
			ok, flag = false, "  <-- over tolerance"
		}
		fmt.Printf("%-10s %-6s %-9s %5d %8d %7d %7d %4d %10d %9.2f %12.3g%s\n", "dense", "cpu", r.dtype, r.seqs,
			r.prefillTokens, r.cachedTokens, r.decodeTokens, r.cowCopies, r.kvBytes, r.ms, r.maxErr, flag)
	}
	fmt.Printf("\nmax |err|: against naive contiguous attention in float64 (tolerance 1e-5 for a float32 cache; " +
		"1e-4 for bfloat16, with the reference fed the same rounded K/V).\n")
	if !ok {
		os.Exit(2)
	}
}
