#include "kvplug/attention/star/star.h"

#include <algorithm>

#include "fmt/format.h"
#include "kvplug/attention/engine.h"

namespace kvplug::attn::star {
namespace {

absl::Status Bad(std::string msg) { return absl::InvalidArgumentError("star: " + std::move(msg)); }

KeySegment Causal(int32_t page_offset, int32_t key_begin, int32_t key_end, int32_t pos_base) {
  return KeySegment{page_offset, key_begin, key_end, pos_base, -1, 0, kUnboundedLag};
}

}  // namespace

absl::Status ValidateConfig(const StarConfig& c) {
  if (c.context_block_size <= 0 || c.anchor_block_size <= 0 || c.anchor_block_size > c.context_block_size)
    return Bad(fmt::format("context_block_size={} and anchor_block_size={} must satisfy 0 < anchor <= block",
                           c.context_block_size, c.anchor_block_size));
  if (c.num_shards < 1 || c.shard_rank < 0 || c.shard_rank >= c.num_shards || c.append_shard < 0 ||
      c.append_shard >= c.num_shards)
    return Bad(fmt::format("num_shards={} shard_rank={} append_shard={}: ranks must be in [0, num_shards)",
                           c.num_shards, c.shard_rank, c.append_shard));
  return absl::OkStatus();
}

StarPlanner::StarPlanner(const StarConfig& config) : config_(config) {}

std::string StarPlanner::Key() const {
  return fmt::format("star/b{}/a{}/s{}/r{}/p{}", config_.context_block_size, config_.anchor_block_size,
                     config_.num_shards, config_.shard_rank, config_.append_shard);
}

KeySetBounds StarPlanner::Bounds(const PlanCapacity& c) const {
  // A sequence's step splits at each block boundary it crosses, plus the anchor run and the
  // context/query boundary; every span holds at least one token.
  const int64_t spans = std::min<int64_t>(c.max_num_tokens,
                                          int64_t{3} * c.max_num_seqs + c.max_num_tokens / config_.context_block_size);
  return {spans, 2 * spans, 0, 2};
}

int64_t StarPlanner::OwnedContext(int64_t n) const {
  const int64_t bsz = config_.context_block_size, s = config_.num_shards, r = config_.shard_rank;
  const int64_t full = n / bsz, rest = n % bsz;
  int64_t owned = full > r ? ((full - 1 - r) / s + 1) * bsz : 0;
  if (rest > 0 && full % s == r) owned += rest;
  return owned;
}

absl::Status StarPlanner::Build(const BatchPlan& plan, KeySets* out) const {
  out->Clear();
  if (config_.num_shards > 1 && !plan.has_query_pos_starts())
    return Bad(fmt::format("num_shards={} needs kvp_batch.query_pos_starts to tell phase-1 steps from phase-2 "
                           "steps", config_.num_shards));
  const auto qsl = plan.query_start_loc();
  for (int32_t b = 0; b < plan.num_seqs(); ++b) {
    if (qsl[b + 1] == qsl[b]) continue;
    absl::Status s = config_.num_shards == 1 ? BuildSingleShard(plan, b, out) : BuildShard(plan, b, out);
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

// One shard: a sequence's cache index is its position; a step may cross the context boundary.
absl::Status StarPlanner::BuildSingleShard(const BatchPlan& plan, int32_t b, KeySets* out) const {
  const int32_t t0 = plan.query_start_loc()[b], q = plan.query_start_loc()[b + 1] - t0;
  const int32_t len = plan.seq_lens()[b], n = plan.context_len(b), page = plan.kv_indptr()[b];
  if (plan.query_pos_start(b) != len - q)
    return Bad(fmt::format("sequence {}: query_pos_starts={} but with one shard its {} tokens are the cache's "
                           "last (positions from seq_lens - q_len = {})", b, plan.query_pos_start(b), q, len - q));
  const int32_t bsz = config_.context_block_size, a = config_.anchor_block_size;
  for (int32_t p = len - q; p < len;) {
    KeySegment segs[2];
    int32_t num_segs = 0, e;
    if (p < n) {  // phase 1: block k's tokens see the anchor and their block, causally
      const int32_t k = p / bsz;
      e = static_cast<int32_t>(std::min<int64_t>({len, n, int64_t{k + 1} * bsz}));
      if (k > 0) segs[num_segs++] = Causal(page, 0, a, 0);
      segs[num_segs++] = Causal(page, k * bsz, e, 0);
    } else {  // phase 2: the whole context and, causally, the query keys
      e = len;
      segs[num_segs++] = Causal(page, 0, len, 0);
    }
    if (!out->AddSpan(QuerySpan{b, t0 + (p - (len - q)), t0 + (e - (len - q)), p, 0, 0}, {segs, size_t(num_segs)}))
      return absl::InternalError("star planner: key set bounds exceeded");
    p = e;
  }
  return absl::OkStatus();
}

absl::Status StarPlanner::BuildShard(const BatchPlan& plan, int32_t b, KeySets* out) const {
  const int32_t t0 = plan.query_start_loc()[b], q = plan.query_start_loc()[b + 1] - t0;
  const int32_t len = plan.seq_lens()[b], n = plan.context_len(b), page = plan.kv_indptr()[b];
  const int32_t p0 = plan.query_pos_start(b);
  const int32_t bsz = config_.context_block_size, a = config_.anchor_block_size;
  const int32_t s = config_.num_shards, r = config_.shard_rank;
  const int64_t owned = OwnedContext(n);
  auto add = [&](int32_t local_begin, int32_t local_end, int32_t pos, const KeySegment* segs, int32_t num) {
    const QuerySpan span{b, t0 + (local_begin - (len - q)), t0 + (local_end - (len - q)), pos, 0, 0};
    return out->AddSpan(span, {segs, size_t(num)}) ? absl::OkStatus()
                                                   : absl::InternalError("star planner: key set bounds exceeded");
  };
  if (p0 >= n) {  // phase 2: query tokens
    if (r == config_.append_shard) {
      const int64_t stored = len - owned;  // query keys held, this step's included
      if (stored < q || p0 != n + stored - q)
        return Bad(fmt::format("sequence {}: the appending shard {} holds {} context keys of context_lens={} and "
                               "seq_lens={}, so this step's {} query tokens would start at position {}, but "
                               "query_pos_starts={}", b, r, owned, n, len, q, n + stored - q, p0));
      KeySegment segs[2];
      int32_t num = 0;
      if (owned > 0) segs[num++] = Causal(page, 0, static_cast<int32_t>(owned), 0);  // positions < n <= p0: all seen
      segs[num++] = Causal(page, static_cast<int32_t>(owned), len, n - static_cast<int32_t>(owned));
      return add(len - q, len, p0, segs, num);
    }
    if (len != owned)
      return Bad(fmt::format("sequence {}: shard {} does not append (append_shard={}) and holds its {} context keys "
                             "of context_lens={}, but seq_lens={}", b, r, config_.append_shard, owned, n, len));
    // Every context key, none of the query's; an empty partial (lse = -inf) when the shard holds none.
    const KeySegment all = Causal(page, 0, len, 0);
    const QuerySpan span{b, t0, t0 + q, p0, 0, 0};
    return out->AddSpan(span, {&all, 1}) ? absl::OkStatus()
                                         : absl::InternalError("star planner: key set bounds exceeded");
  }
  // Phase 1: [anchor (r != 0)] [own blocks]; this step's tokens are the last q of them. The anchor's
  // pages are dropped after phase 1, so its own blocks must not share a page with it.
  if (r != 0 && a % plan.block_size() != 0)
    return Bad(fmt::format("anchor_block_size={} must be a multiple of the page size {} on shard {} of {}: its "
                           "anchor pages are dropped after phase 1", a, plan.block_size(), r, s));
  const int32_t resident = r != 0 ? std::min(a, n) : 0;
  if (len > resident + owned || len < q)
    return Bad(fmt::format("sequence {}: in phase 1 shard {} holds at most {} keys (anchor {} + its {} context "
                           "positions of context_lens={}) and this step's {} tokens, but seq_lens={}", b, r,
                           resident + owned, resident, owned, n, q, len));
  auto position = [&](int32_t local) -> int32_t {
    if (local < resident) return local;
    const int32_t o = local - resident, j = o / bsz;
    return (r + j * s) * bsz + o % bsz;
  };
  if (p0 != position(len - q))
    return Bad(fmt::format("sequence {}: query_pos_starts={} but shard {}'s key {} is at position {}", b, p0, r,
                           len - q, position(len - q)));
  for (int32_t i = len - q; i < len;) {
    KeySegment segs[2];
    int32_t num = 0, e;
    if (i < resident) {  // the anchor, recomputed on this shard for the next layers: causal in itself
      e = std::min(len, resident);
      segs[num++] = Causal(page, 0, e, 0);
    } else {
      const int32_t j = (i - resident) / bsz, block_begin = resident + j * bsz, k = r + j * s;
      e = std::min(len, block_begin + bsz);
      if (k == 0) {
        segs[num++] = Causal(page, 0, e, 0);
      } else {
        segs[num++] = Causal(page, 0, a, 0);  // the anchor sits at the shard's first keys (block 0 on shard 0)
        segs[num++] = Causal(page, block_begin, e, k * bsz - block_begin);
      }
    }
    if (absl::Status st = add(i, e, position(i), segs, num); !st.ok()) return st;
    i = e;
  }
  return absl::OkStatus();
}

namespace {

// Star changes only the key sets: the plain variant over its planner.
class Star final : public VariantBackend {
 public:
  Star(const HeadConfig& heads, const StarConfig& config, Device device)
      : VariantBackend(heads, device, std::make_shared<StarPlanner>(config)) {}
};

}  // namespace

BackendInfo Info() {
  BackendInfo info = FamilyBackendInfo("star");
  info.create = [](const HeadConfig& heads, const BackendConfig& config,
                   const ExecContext& exec) -> absl::StatusOr<std::unique_ptr<AttentionBackend>> {
    auto parsed = ConfigOrDefault<StarConfig>(config, "star", "StarConfig");
    if (!parsed.ok()) return parsed.status();
    StarConfig star = *std::move(parsed);
    if (star.append_shard == -1) star.append_shard = star.num_shards - 1;
    if (absl::Status s = ValidateConfig(star); !s.ok()) return s;
    if (exec.device == Device::kCuda)
      if (absl::Status s = CheckCudaEngineSupport(heads); !s.ok()) return s;
    return std::make_unique<Star>(heads, star, exec.device);
  };
  return info;
}

}  // namespace kvplug::attn::star
