// `star`: Star Attention (arXiv 2411.17116) as a variant of the kernel family: only the key sets
// differ from dense, so only the planner is Star's.
//
// Phase 1 (context tokens: positions below kvp_batch.context_lens[b]): the context is cut into
// blocks of context_block_size; block 0 attends causally to itself, block k > 0 to the anchor (the
// first anchor_block_size tokens, read from their own pages at their positions 0..a-1: computed
// once, never copied or recomputed, unlike the reference code which prepends and recomputes it per
// block) and causally to itself. Phase 2 (query and generated tokens): every context key the shard
// holds (non-causal toward the context on every shard: the reference's bottom-right causal
// alignment on context-only shards hides keys from early query tokens) and, causally, the query
// keys (stored on the appending shard only). Shards' partials (out, lse) are merged exactly by a
// kvp_comm (the reference's lse + log(1 + exp(d)) overflows for large gaps and gives NaN for an
// empty partial).
//
// Shard layout (num_shards S, shard_rank r): context block k lives on shard k % S. The keys of a
// sequence on shard r are [the anchor: shards r != 0, in phase-1 steps only] [its context blocks,
// in order] [the query and generated keys: the appending shard only]. With S > 1 every step of a
// sequence is either phase 1 (its blocks' tokens, the anchor's first on r != 0) or phase 2 (query
// tokens), told apart by kvp_batch.query_pos_starts, which is then required.
#pragma once

#include <memory>
#include <string>

#include "kvplug/attention/backend.h"

namespace kvplug::attn::star {

BackendInfo Info();

// The step planner (public for tests and the engines' capacity planning).
class StarPlanner final : public KeySetPlanner {
 public:
  explicit StarPlanner(const StarConfig& config);  // config already checked
  std::string Key() const override;
  KeySetBounds Bounds(const PlanCapacity& capacity) const override;
  absl::Status Build(const BatchPlan& plan, KeySets* out) const override;

  // Context positions below `context_len` held by shard `rank` (its blocks k % S == rank).
  int64_t OwnedContext(int64_t context_len) const;

 private:
  absl::Status BuildSingleShard(const BatchPlan& plan, int32_t b, KeySets* out) const;
  absl::Status BuildShard(const BatchPlan& plan, int32_t b, KeySets* out) const;
  StarConfig config_;
};

// Checks a StarConfig (the ABI checks the same at parse time; this guards C++ callers).
absl::Status ValidateConfig(const StarConfig& config);

}  // namespace kvplug::attn::star
