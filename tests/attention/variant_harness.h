// The variant harness every backend of the kernel family plugs into: a random ragged batch over
// shuffled pages, key sets from a planner (the backend's, or one of the harness's: causal, window,
// Star-like anchor + block, random segments with position maps), a variant's parameters (scale
// table, soft cap, entropy), run through the engine of a device and compared with a reference in
// double precision that evaluates the key sets as an explicit boolean mask per (token, key) and
// computes full probability rows.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/tensor_views.h"
#include "fmt/format.h"
#include "kvplug/attention/backend.h"
#include "kvplug/attention/engine.h"
#include "kvplug/attention/key_sets.h"
#include "kvplug/attention/step_work.h"
#include "kvplug/kv_cache/kv_cache.h"

namespace kvplug::testing {

using attn::KeySegment;
using attn::KeySetBounds;
using attn::KeySets;
using attn::QuerySpan;

// Planner from a function (the harness's own key-set shapes).
class FnPlanner final : public attn::KeySetPlanner {
 public:
  using Fn = std::function<absl::Status(const attn::BatchPlan&, KeySets*)>;
  FnPlanner(std::string key, int32_t segs_per_span, int64_t pos_map, Fn fn)
      : key_(std::move(key)), segs_(segs_per_span), pos_map_(pos_map), fn_(std::move(fn)) {}
  std::string Key() const override { return key_; }
  KeySetBounds Bounds(const attn::PlanCapacity& c) const override {
    return {c.max_num_tokens, int64_t{c.max_num_tokens} * segs_, pos_map_, segs_};
  }
  absl::Status Build(const attn::BatchPlan& plan, KeySets* out) const override { return fn_(plan, out); }

 private:
  std::string key_;
  int32_t segs_;
  int64_t pos_map_;
  Fn fn_;
};

// A backend that is nothing but a planner and variant parameters, run by RunVariant.
class HarnessBackend final : public attn::AttentionBackend {
 public:
  HarnessBackend(std::shared_ptr<const attn::KeySetPlanner> planner, attn::HeadConfig heads, attn::VariantParams v)
      : planner_(std::move(planner)), heads_(heads), variant_(v) {}
  std::shared_ptr<const attn::KeySetPlanner> planner() const override { return planner_; }
  absl::Status Run(const attn::RunArgs& a) const override { return attn::RunVariant(a, heads_, variant_); }

 private:
  std::shared_ptr<const attn::KeySetPlanner> planner_;
  attn::HeadConfig heads_;
  attn::VariantParams variant_;
};

// Star-like: each sequence's query tokens cut into blocks of `block` positions; a block starting
// at position >= block sees the anchor [0, anchor) plus itself causally; the first block itself.
inline std::shared_ptr<attn::KeySetPlanner> StarLikePlanner(int32_t block, int32_t anchor) {
  return std::make_shared<FnPlanner>(
      fmt::format("starlike/{}/{}", block, anchor), 2, 0, [=](const attn::BatchPlan& plan, KeySets* out) {
        out->Clear();
        const auto qsl = plan.query_start_loc();
        for (int32_t b = 0; b < plan.num_seqs(); ++b) {
          const int32_t q_len = qsl[b + 1] - qsl[b], len = plan.seq_lens()[b];
          int32_t t = qsl[b];
          while (t < qsl[b + 1]) {
            const int32_t pos = len - q_len + (t - qsl[b]);
            const int32_t blk = pos / block;
            const int32_t end_pos = std::min((blk + 1) * block, len);
            const int32_t t_end = t + (end_pos - pos);
            KeySegment segs[2];
            int n = 0;
            const int32_t page0 = plan.kv_indptr()[b];
            if (blk > 0) segs[n++] = KeySegment{page0, 0, std::min(anchor, len), 0, -1, 0, attn::kUnboundedLag};
            segs[n++] = KeySegment{page0, blk * block, end_pos, 0, -1, 0, attn::kUnboundedLag};
            if (!out->AddSpan(QuerySpan{b, t, t_end, pos, 0, 0}, {segs, size_t(n)}))
              return absl::InternalError("bounds");
            t = t_end;
          }
        }
        return absl::OkStatus();
      });
}

// Random key sets: each sequence's query tokens cut into random spans, each span seeing 1-3
// random segments of its page list (random ranges, random lag bounds, some through a random
// non-decreasing position map). Keys may repeat across segments; the reference counts them as
// many times as the kernel does.
inline std::shared_ptr<attn::KeySetPlanner> RandomPlanner(uint32_t seed) {
  return std::make_shared<FnPlanner>(
      fmt::format("random/{}", seed), 3, 1 << 16, [=](const attn::BatchPlan& plan, KeySets* out) {
        std::mt19937 rng(seed);
        out->Clear();
        const auto qsl = plan.query_start_loc();
        for (int32_t b = 0; b < plan.num_seqs(); ++b) {
          const int32_t q_len = qsl[b + 1] - qsl[b], len = plan.seq_lens()[b];
          int32_t t = qsl[b];
          while (t < qsl[b + 1]) {
            const int32_t n_tok = 1 + static_cast<int32_t>(rng() % std::min(q_len, 40));
            const int32_t t_end = std::min(t + n_tok, qsl[b + 1]);
            const int32_t pos = len - q_len + (t - qsl[b]);
            KeySegment segs[3];
            const int n = 1 + static_cast<int>(rng() % 3);
            for (int i = 0; i < n; ++i) {
              KeySegment& g = segs[i];
              g.page_offset = plan.kv_indptr()[b];
              g.key_begin = static_cast<int32_t>(rng() % len);
              g.key_end = g.key_begin + 1 + static_cast<int32_t>(rng() % (len - g.key_begin));
              g.lag_min = rng() % 4 == 0 ? static_cast<int32_t>(rng() % 8) : 0;
              g.lag_max = rng() % 3 == 0 ? g.lag_min + static_cast<int32_t>(rng() % 64) : attn::kUnboundedLag;
              if (rng() % 3 == 0) {
                std::vector<int32_t> map(g.key_end - g.key_begin);
                int32_t p = static_cast<int32_t>(rng() % 8);
                for (auto& x : map) x = (p += static_cast<int32_t>(rng() % 3));
                g.pos_map = out->AddPositions(map);
                if (g.pos_map < 0) return absl::InternalError("pos map bounds");
              } else {
                g.pos_base = static_cast<int32_t>(rng() % 5) - 2;
              }
            }
            if (!out->AddSpan(QuerySpan{b, t, t_end, pos, 0, 0}, {segs, size_t(n)}))
              return absl::InternalError("bounds");
            t = t_end;
          }
        }
        return absl::OkStatus();
      });
}

struct HarnessCase {
  int32_t num_q_heads = 8, num_kv_heads = 2, head_size = 64, block_size = 16;
  std::vector<std::pair<int32_t, int32_t>> seqs;  // (seq_len, q_len)
  DType kv_dtype = DType::kF32;
  DType q_dtype = DType::kF32;
  float soft_cap = 0.0f;
  bool scale_table = false;
  bool entropy = true;
  std::shared_ptr<attn::KeySetPlanner> planner;  // default: causal
  uint32_t seed = 1;
  std::vector<int32_t> context_lens;      // optional [num_seqs] (kvp_batch.context_lens)
  std::vector<int32_t> query_pos_starts;  // optional [num_seqs] (kvp_batch.query_pos_starts)
};

// Everything a device run needs, on the host: pages (as written into a CPU cache), queries, the
// plan's inputs, the reference outputs.
struct HarnessData {
  HarnessCase c;
  std::unique_ptr<kv::KvCache> cache;  // CPU
  std::vector<int32_t> qsl, lens, indptr, indices;
  std::vector<float> q;                // [T, Hq, D] as float (already rounded to q_dtype)
  std::vector<float> scale_table;      // [Hq, table_len]
  int32_t table_len = 0;
  int32_t num_tokens = 0;
  std::vector<double> ref_out, ref_lse, ref_entropy;
  int64_t visible_pairs = 0;
};

inline float RoundTo(float x, DType t) {
  if (t == DType::kF16) return F16ToFloat(FloatToF16(x));
  if (t == DType::kBF16) return Bf16ToFloat(FloatToBf16(x));
  return x;
}

inline attn::BatchInput InputOf(const HarnessData& d) {
  attn::BatchInput in;
  in.num_seqs = static_cast<int32_t>(d.lens.size());
  in.block_size = d.c.block_size;
  in.query_start_loc = d.qsl.data();
  in.seq_lens = d.lens.data();
  in.kv_indptr = d.indptr.data();
  in.kv_indices = d.indices.data();
  if (!d.c.context_lens.empty()) in.context_lens = d.c.context_lens.data();
  if (!d.c.query_pos_starts.empty()) in.query_pos_starts = d.c.query_pos_starts.data();
  return in;
}

inline attn::PlanCapacity CapacityOf(const HarnessData& d) {
  return {static_cast<int32_t>(d.lens.size()), std::max(d.num_tokens, 1),
          std::max(static_cast<int32_t>(d.indices.size()), 1)};
}

// Builds the batch and computes the reference from the planner's key sets.
inline void BuildHarness(const HarnessCase& c, HarnessData* d) {
  d->c = c;
  if (!d->c.planner) d->c.planner = std::make_shared<attn::CausalPlanner>(-1);
  std::mt19937 rng(c.seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int32_t D = c.head_size, Hq = c.num_q_heads, Hk = c.num_kv_heads, bs = c.block_size;
  int32_t total_blocks = 0;
  for (auto [len, ql] : c.seqs) total_blocks += (len + bs - 1) / bs;
  kv::KvCacheOptions o;
  o.num_layers = 1;
  o.num_blocks = total_blocks + 3;
  o.block_size = bs;
  o.num_kv_heads = Hk;
  o.head_size = D;
  o.dtype = c.kv_dtype;
  d->cache = std::move(*kv::KvCache::Create(o));
  std::vector<int32_t> ids(o.num_blocks);
  for (int i = 0; i < o.num_blocks; ++i) ids[i] = i;
  std::shuffle(ids.begin(), ids.end(), rng);
  d->qsl = {0};
  d->indptr = {0};
  d->indices.reserve(1);  // never NULL, even when no sequence holds a page
  size_t next = 0;
  for (auto [len, ql] : c.seqs) {
    d->lens.push_back(len);
    d->qsl.push_back(d->qsl.back() + ql);
    for (int j = 0; j < (len + bs - 1) / bs; ++j) d->indices.push_back(ids[next++]);
    d->indptr.push_back(static_cast<int32_t>(d->indices.size()));
    std::vector<float> k(size_t(len) * Hk * D), v(k.size());
    for (auto& x : k) x = normal(rng);
    for (auto& x : v) x = normal(rng);
    std::vector<int64_t> slots(len);
    const int32_t* pages = d->indices.data() + d->indptr[d->indptr.size() - 2];
    for (int p = 0; p < len; ++p) slots[p] = int64_t{pages[p / bs]} * bs + p % bs;
    TensorView kv[2];
    for (int i = 0; i < 2; ++i) {
      kv[i].data = i == 0 ? k.data() : v.data();
      kv[i].ndim = 3;
      kv[i].shape = {len, Hk, D};
      kv[i].strides = {int64_t{Hk} * D, D, 1};
    }
    if (len > 0 && !d->cache->Write(0, kv[0], kv[1], slots).ok()) std::abort();
  }
  d->num_tokens = d->qsl.back();
  d->q.resize(size_t(d->num_tokens) * Hq * D);
  for (auto& x : d->q) x = RoundTo(normal(rng), c.q_dtype);
  if (c.scale_table) {
    d->table_len = 1 + static_cast<int32_t>(rng() % 48);
    d->scale_table.resize(size_t(Hq) * d->table_len);
    std::uniform_real_distribution<float> u(0.3f, 2.5f);
    for (auto& x : d->scale_table) x = u(rng);
  }

  // Key sets from the planner on a CPU plan, then the reference, one explicit mask row at a time.
  attn::BatchPlan plan(CapacityOf(*d));
  if (!plan.Update(InputOf(*d)).ok()) std::abort();
  KeySets keys(d->c.planner->Bounds(plan.capacity()));
  if (absl::Status s = d->c.planner->Build(plan, &keys); !s.ok() || !keys.Validate(plan).ok()) std::abort();
  const kv::PagedLayer& pages = d->cache->layer(0);
  const double sm_scale = 1.0 / std::sqrt(double(D));
  const int32_t group = Hq / Hk;
  d->ref_out.assign(d->q.size(), 0.0);
  d->ref_lse.assign(size_t(d->num_tokens) * Hq, -std::numeric_limits<double>::infinity());
  d->ref_entropy.assign(d->ref_lse.size(), 0.0);
  for (const QuerySpan& s : keys.spans()) {
    for (int32_t t = s.token_begin; t < s.token_end; ++t) {
      const int32_t q_pos = s.pos_begin + (t - s.token_begin);
      // The mask row: every (segment, key) pair this token sees.
      std::vector<std::pair<int32_t, int32_t>> seen;  // (page, row in page)
      for (int32_t si = s.segment_begin; si < s.segment_end; ++si) {
        const KeySegment& g = keys.segments()[si];
        for (int32_t j = g.key_begin; j < g.key_end; ++j) {
          const int64_t k_pos = g.pos_map >= 0 ? keys.pos_map()[g.pos_map + j - g.key_begin] : int64_t{g.pos_base} + j;
          const int64_t lag = q_pos - k_pos;
          const bool visible = lag >= g.lag_min && lag <= g.lag_max;
          if (visible) seen.emplace_back(d->indices[g.page_offset + j / bs], j % bs);
        }
      }
      d->visible_pairs += static_cast<int64_t>(seen.size());
      for (int32_t h = 0; h < Hq; ++h) {
        const int32_t kh = h / group;
        double scale = sm_scale;
        if (c.scale_table) scale *= d->scale_table[size_t(h) * d->table_len + std::min(q_pos, d->table_len - 1)];
        std::vector<double> logits;
        for (auto [page, row] : seen) {
          const void* krow = pages.Row(0, page, row, kh);
          double dot = 0;
          for (int32_t x = 0; x < D; ++x)
            dot += double(d->q[(size_t(t) * Hq + h) * D + x]) * LoadAsFloat(krow, pages.dtype, x);
          double logit = dot * scale;
          if (c.soft_cap > 0) logit = c.soft_cap * std::tanh(logit / c.soft_cap);
          logits.push_back(logit);
        }
        if (logits.empty()) continue;  // out 0, lse -inf, entropy 0
        const double m = *std::max_element(logits.begin(), logits.end());
        double sum = 0;
        for (double x : logits) sum += std::exp(x - m);
        double entropy = 0;
        for (size_t i = 0; i < seen.size(); ++i) {
          const double a = std::exp(logits[i] - m) / sum;
          if (a > 0) entropy -= a * std::log(a);
          const void* vrow = pages.Row(1, seen[i].first, seen[i].second, kh);
          for (int32_t x = 0; x < D; ++x)
            d->ref_out[(size_t(t) * Hq + h) * D + x] += a * LoadAsFloat(vrow, pages.dtype, x);
        }
        d->ref_lse[size_t(t) * Hq + h] = m + std::log(sum);
        d->ref_entropy[size_t(t) * Hq + h] = entropy;
      }
    }
  }
}

struct HarnessErrors {
  double out = 0, lse = 0, entropy = 0;
};

// Compares device results (as float) with the reference; lse = -inf must match exactly.
inline HarnessErrors Compare(const HarnessData& d, const std::vector<float>& out, const std::vector<float>& lse,
                             const std::vector<float>& entropy) {
  HarnessErrors e;
  for (size_t i = 0; i < d.ref_out.size(); ++i) e.out = std::max(e.out, std::abs(d.ref_out[i] - out[i]));
  for (size_t i = 0; i < d.ref_lse.size(); ++i) {
    const bool ref_inf = std::isinf(d.ref_lse[i]);
    if (ref_inf != std::isinf(lse[i])) e.lse = std::numeric_limits<double>::infinity();
    else if (!ref_inf) e.lse = std::max(e.lse, std::abs(d.ref_lse[i] - lse[i]));
    if (!entropy.empty()) e.entropy = std::max(e.entropy, std::abs(d.ref_entropy[i] - entropy[i]));
  }
  if (std::any_of(out.begin(), out.end(), [](float x) { return std::isnan(x); }))
    e.out = std::numeric_limits<double>::infinity();
  return e;
}

// A random ragged batch: prefill chunks starting mid-block, decodes, block-boundary lengths.
inline std::vector<std::pair<int32_t, int32_t>> RandomSeqs(std::mt19937& rng, int32_t block_size, int32_t max_len) {
  std::vector<std::pair<int32_t, int32_t>> seqs;
  const int n = 1 + static_cast<int>(rng() % 5);
  for (int i = 0; i < n; ++i) {
    int32_t len;
    switch (rng() % 4) {
      case 0: len = block_size * (1 + static_cast<int32_t>(rng() % 4)); break;  // on a block boundary
      case 1: len = block_size * (1 + static_cast<int32_t>(rng() % 4)) + 1; break;
      default: len = 1 + static_cast<int32_t>(rng() % max_len);
    }
    int32_t q;
    switch (rng() % 3) {
      case 0: q = 1; break;                                                        // decode
      case 1: q = len; break;                                                      // whole prefill
      default: q = 1 + static_cast<int32_t>(rng() % len);                         // a chunk mid-sequence
    }
    seqs.emplace_back(len, q);
  }
  return seqs;
}

}  // namespace kvplug::testing
