// The CPU engine of the kernel family: runs any variant (key sets + VariantParams) over a paged
// layer, and merges partial attention states. Two implementations of the same contract: the fast
// one (cpu_fast_engine.cc: tiles of queries x keys, vectorised, dispatched at run time to the
// machine's instruction set) and the plain one (cpu_engine.cc: fp32 online softmax one key row at
// a time), kept as a simple check and an A/B. Tests hold both to the harness's double reference.
#pragma once

#include "absl/status/status.h"
#include "kvplug/attention/batch_plan.h"
#include "kvplug/attention/key_sets.h"
#include "kvplug/attention/thread_pool.h"
#include "kvplug/attention/variant.h"
#include "kvplug/kv_cache/kv_cache.h"
#include "kvplug/kv_cache/tensor_view.h"

namespace kvplug::attn {

// The outputs of one run: out is required; lse ([T, Hq] float32, natural log) and entropy
// ([T, Hq] float32, nats: H = -sum_j a_j log a_j = lse - sum_j a_j s_j) are optional.
struct AttentionOutputs {
  const TensorView* out = nullptr;
  const TensorView* lse = nullptr;
  const TensorView* entropy = nullptr;
  const TensorView* entropy_summary = nullptr;  // [Hq, kEntropySummaryFields] (telemetry.h)
};

struct CpuAttentionArgs {
  const BatchPlan& plan;
  const KeySets& keys;
  const kv::PagedLayer& pages;
  const TensorView& query;  // [T, Hq, D]
  AttentionOutputs outputs;
  VariantParams variant;
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;
  ThreadPool* pool = nullptr;
};

// The fast engine, or the plain one when the environment has KVP_CPU_ENGINE=plain (read once).
void RunPagedAttentionCpu(const CpuAttentionArgs& args);
void RunPagedAttentionFast(const CpuAttentionArgs& args);
void RunPagedAttentionPlain(const CpuAttentionArgs& args);
// The instruction set the fast engine dispatched to on this machine (Highway's name: "AVX2",
// "AVX3" for AVX-512, "SSE4", "NEON", "EMU128", ...).
const char* CpuEngineIsa();

// Partial attention states over disjoint key sets of the same queries, merged exactly:
// lse = logsumexp_i lse_i (max first), out = sum_i exp(lse_i - lse) out_i, and the entropy from
// each partial's mean logit (lse_i - H_i) merged with the same weights. A partial with lse = -inf
// (it saw no key) has weight 0, so merging it with another gives that other exactly; if every
// partial is empty, out = 0, lse = -inf, entropy = 0.
struct MergeStatesArgs {
  const TensorView* partial_out = nullptr;      // [S, T, H, D] (float32, float16 or bfloat16)
  const TensorView* partial_lse = nullptr;      // [S, T, H] float32
  const TensorView* partial_entropy = nullptr;  // optional [S, T, H] float32 (needed for entropy)
  const TensorView* out = nullptr;              // [T, H, D]
  const TensorView* lse = nullptr;              // optional [T, H] float32
  const TensorView* entropy = nullptr;          // optional [T, H] float32
};

// Shapes and dtypes checked by the caller (ValidateMergeStates).
absl::Status ValidateMergeStates(const MergeStatesArgs& args);
void MergeStatesCpu(const MergeStatesArgs& args, ThreadPool* pool);

}  // namespace kvplug::attn
