// Package naive is the reference every attention result of the Go binding is checked against:
// causal attention over the contiguous K/V of one sequence, in float64, written as plainly as
// possible. It mirrors tests/common/naive_attention.h.
package naive

import "math"

// Params describes the heads and the attention variant.
type Params struct {
	NumQHeads  int
	NumKVHeads int
	HeadSize   int
	Scale      float64 // softmax scale
	WindowLeft int     // keys at positions >= pos - WindowLeft are seen; < 0: unbounded
	SoftCap    float64 // > 0: logits become cap * tanh(logits / cap); 0: off
}

// NewParams is Params with an unbounded window and no soft cap.
func NewParams(numQHeads, numKVHeads, headSize int, scale float64) Params {
	return Params{NumQHeads: numQHeads, NumKVHeads: numKVHeads, HeadSize: headSize, Scale: scale, WindowLeft: -1}
}

// Attention computes the last qLen positions of a sequence of seqLen tokens.
// k, v: [seqLen][NumKVHeads][HeadSize]; q: [qLen][NumQHeads][HeadSize].
// Returns out [qLen][NumQHeads][HeadSize] and lse [qLen][NumQHeads] (natural log).
func Attention(p Params, seqLen, qLen int, q, k, v []float64) (out, lse []float64) {
	out, lse, _ = States(p, seqLen, qLen, q, k, v)
	return out, lse
}

// States is Attention plus each row's attention entropy [qLen][NumQHeads] in nats,
// H = -sum_j a_j log a_j over the softmax weights a_j.
func States(p Params, seqLen, qLen int, q, k, v []float64) (out, lse, entropy []float64) {
	d := p.HeadSize
	group := p.NumQHeads / p.NumKVHeads
	out = make([]float64, qLen*p.NumQHeads*d)
	lse = make([]float64, qLen*p.NumQHeads)
	entropy = make([]float64, qLen*p.NumQHeads)
	logits := make([]float64, 0, seqLen)
	for i := 0; i < qLen; i++ {
		pos := seqLen - qLen + i
		lo := 0
		if p.WindowLeft >= 0 && pos-p.WindowLeft > 0 {
			lo = pos - p.WindowLeft
		}
		for h := 0; h < p.NumQHeads; h++ {
			g := h / group
			qrow := q[(i*p.NumQHeads+h)*d : (i*p.NumQHeads+h+1)*d]
			logits = logits[:0]
			m := math.Inf(-1)
			for j := lo; j <= pos; j++ {
				krow := k[(j*p.NumKVHeads+g)*d : (j*p.NumKVHeads+g+1)*d]
				dot := 0.0
				for x := range qrow {
					dot += qrow[x] * krow[x]
				}
				s := dot * p.Scale
				if p.SoftCap > 0 {
					s = p.SoftCap * math.Tanh(s/p.SoftCap)
				}
				logits = append(logits, s)
				m = math.Max(m, s)
			}
			sum := 0.0
			for _, s := range logits {
				sum += math.Exp(s - m)
			}
			orow := out[(i*p.NumQHeads+h)*d : (i*p.NumQHeads+h+1)*d]
			ent := 0.0
			for j := lo; j <= pos; j++ {
				w := math.Exp(logits[j-lo]-m) / sum
				if w > 0 { // 0 log 0 = 0
					ent -= w * math.Log(w)
				}
				vrow := v[(j*p.NumKVHeads+g)*d : (j*p.NumKVHeads+g+1)*d]
				for x := range orow {
					orow[x] += w * vrow[x]
				}
			}
			lse[i*p.NumQHeads+h] = m + math.Log(sum)
			entropy[i*p.NumQHeads+h] = ent
		}
	}
	return out, lse, entropy
}
