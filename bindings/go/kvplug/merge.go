package kvplug

/*
#include "kvplug_go.h"
*/
import "C"

// MergeArgs are the partial attention states of the same queries over disjoint key sets (split
// KV, shards of a sequence held elsewhere, a caller's own partials) and where their merge goes
// (kvp_merge_states_args). The float32 slices are shaped after the tensors: the partial ones
// [S, T, H] after PartialOut, the merged ones [T, H] after Out.
type MergeArgs struct {
	PartialOut     Tensor    // [S, T, H, D] float32, float16 or bfloat16
	PartialLSE     []float32 // [S, T, H] natural log; -Inf marks an empty partial (weight 0)
	PartialEntropy []float32 // optional [S, T, H]; required for Entropy
	Out            Tensor    // [T, H, D], any of the three float dtypes
	LSE            []float32 // optional [T, H]
	Entropy        []float32 // optional [T, H]
}

// MergeStates merges S partial states into one, exactly and stably: lse = max_i lse_i + log sum_i
// exp(lse_i - max), out = sum_i exp(lse_i - lse) out_i, and with entropies H = lse - sum_i w_i
// (lse_i - H_i). Partial log-sum-exps in base 2 (FlashInfer's) must be multiplied by ln 2 first.
// ErrInvalidArgument for shapes, dtypes, or outputs that overlap each other or the inputs.
func (c *Context) MergeStates(a MergeArgs) error {
	const op = "Context.MergeStates"
	pod, pop, err := a.PartialOut.desc(op, "partial_out")
	if err != nil {
		return err
	}
	od, optr, err := a.Out.desc(op, "out")
	if err != nil {
		return err
	}
	if len(a.PartialOut.shape) != 4 {
		return invalid(op, "partial_out: ndim=%d, expected 4 [S, T, H, D]", len(a.PartialOut.shape))
	}
	if a.PartialLSE == nil {
		return invalid(op, "PartialLSE is required")
	}
	partialShape := a.PartialOut.shape[:3]
	var rowShape []int64
	if a.LSE != nil || a.Entropy != nil {
		if len(a.Out.shape) != 3 {
			return invalid(op, "out: ndim=%d, expected 3 [T, H, D]", len(a.Out.shape))
		}
		rowShape = a.Out.shape[:2]
	}
	pld, plp, err := optionalDesc(op, "partial_lse", a.PartialLSE, partialShape)
	if err != nil {
		return err
	}
	ped, pep, err := optionalDesc(op, "partial_entropy", a.PartialEntropy, partialShape)
	if err != nil {
		return err
	}
	ld, lp, err := optionalDesc(op, "lse", a.LSE, rowShape)
	if err != nil {
		return err
	}
	ed, ep, err := optionalDesc(op, "entropy", a.Entropy, rowShape)
	if err != nil {
		return err
	}
	ctx, err := c.h.shared(op)
	if err != nil {
		return err
	}
	defer c.h.mu.RUnlock()
	return call(op, func() C.kvp_status {
		return C.kvpg_merge_states(ctx, pop, &pod, plp, pld, pep, ped, optr, &od, lp, ld, ep, ed)
	})
}
