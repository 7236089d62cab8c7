// The family's paged write with the previous-token mix (K^_i = a K_i + b K_{i-1}, V alike): exact
// across one-step prefill, chunked prefill with chunks off block boundaries, decodes and a fork
// (state slot copied), against the formula evaluated over each whole sequence.
#include "kvplug/attention/kv_write.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kvplug/attention/thread_pool.h"

namespace kvplug::attn {
namespace {

constexpr int32_t kH = 2, kD = 16, kBs = 4;

TensorView Rows(float* data, int64_t tokens) {
  TensorView v;
  v.data = data;
  v.ndim = 3;
  v.shape = {tokens, kH, kD};
  v.strides = {kH * kD, kD, 1};
  return v;
}

struct Fixture {
  // Sequences: raw K/V per position; block tables; state slots.
  std::vector<int32_t> lens;
  std::vector<std::vector<float>> k, v;  // [seq][pos][h][d]
  std::vector<std::vector<int32_t>> tables;
  std::vector<float> coef;  // k_cur, k_prev, v_cur, v_prev: [4][kH]
  std::unique_ptr<kv::KvCache> cache;
  ThreadPool pool{2};

  explicit Fixture(std::vector<int32_t> seq_lens, DType dtype = DType::kF32, uint32_t seed = 3) : lens(seq_lens) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal;
    std::uniform_real_distribution<float> wide(-3.0f, 3.0f);  // any sign and size
    for (int i = 0; i < 4 * kH; ++i) coef.push_back(wide(rng));
    int32_t blocks = 0;
    for (int32_t len : lens) blocks += (len + kBs - 1) / kBs;
    std::vector<int32_t> ids(blocks + 4);
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = int32_t(i);
    std::shuffle(ids.begin(), ids.end(), rng);
    size_t next = 0;
    for (int32_t len : lens) {
      k.emplace_back(size_t(len) * kH * kD);
      v.emplace_back(size_t(len) * kH * kD);
      for (auto& x : k.back()) x = normal(rng);
      for (auto& x : v.back()) x = normal(rng);
      tables.emplace_back();
      for (int j = 0; j < (len + kBs - 1) / kBs; ++j) tables.back().push_back(ids[next++]);
    }
    kv::KvCacheOptions o;
    o.num_layers = 1;
    o.num_blocks = static_cast<int32_t>(ids.size());
    o.block_size = kBs;
    o.num_kv_heads = kH;
    o.head_size = kD;
    o.dtype = dtype;
    o.num_state_slots = static_cast<int32_t>(lens.size()) + 2;
    o.state_bytes_per_layer = PrevTokenStateBytes(kH, kD);
    cache = std::move(*kv::KvCache::Create(o));
  }

  PrevTokenMix Mix() const { return {coef.data(), coef.data() + kH, coef.data() + 2 * kH, coef.data() + 3 * kH}; }

  // One step: sequence b writes positions [from[b], to[b]) with state slot slots[b].
  absl::Status Step(const std::vector<int32_t>& from, const std::vector<int32_t>& to,
                    const std::vector<int32_t>& slots, const std::vector<int32_t>& seq_ids) {
    std::vector<int32_t> qsl{0}, seq_lens, indptr{0}, indices;
    std::vector<int64_t> slot_map;
    std::vector<float> kin, vin;
    for (size_t i = 0; i < seq_ids.size(); ++i) {
      const int32_t b = seq_ids[i];
      qsl.push_back(qsl.back() + to[i] - from[i]);
      seq_lens.push_back(to[i]);
      for (int j = 0; j < (to[i] + kBs - 1) / kBs; ++j) indices.push_back(tables[b][j]);
      indptr.push_back(int32_t(indices.size()));
      for (int32_t p = from[i]; p < to[i]; ++p) {
        slot_map.push_back(int64_t{tables[b][p / kBs]} * kBs + p % kBs);
        kin.insert(kin.end(), k[b].begin() + size_t(p) * kH * kD, k[b].begin() + size_t(p + 1) * kH * kD);
        vin.insert(vin.end(), v[b].begin() + size_t(p) * kH * kD, v[b].begin() + size_t(p + 1) * kH * kD);
      }
    }
    const int32_t tokens = qsl.back();
    BatchPlan plan(PlanCapacity{int32_t(seq_ids.size()), std::max(tokens, 1), std::max(int32_t(indices.size()), 1)});
    BatchInput in;
    in.num_seqs = int32_t(seq_ids.size());
    in.block_size = kBs;
    in.query_start_loc = qsl.data();
    in.seq_lens = seq_lens.data();
    in.kv_indptr = indptr.data();
    in.kv_indices = indices.data();
    in.slot_mapping = slot_map.data();
    in.state_slots = slots.empty() ? nullptr : slots.data();
    if (absl::Status s = plan.Update(in); !s.ok()) return s;
    const ExecContext exec{Device::kCpu, 0, &pool, nullptr};
    TensorView kt = Rows(kin.data(), tokens), vt = Rows(vin.data(), tokens);
    const PrevTokenMix mix = Mix();
    return WritePagedKv(WriteArgs{plan, *cache, 0, kt, vt, exec}, &mix);
  }

  // The stored row of sequence b, position p, head h, K (kv = 0) or V.
  float Stored(int b, int p, int h, int kv, int d) const {
    return LoadAsFloat(cache->layer(0).Row(kv, tables[b][p / kBs], p % kBs, h), cache->layer(0).dtype, d);
  }
  double Expected(int b, int p, int h, int kv, int d) const {
    const auto& raw = kv == 0 ? k[b] : v[b];
    const double c = coef[(2 * kv) * kH + h], w = coef[(2 * kv + 1) * kH + h];
    const double cur = raw[(size_t(p) * kH + h) * kD + d];
    const double prev = p > 0 ? raw[(size_t(p - 1) * kH + h) * kD + d] : 0.0;
    return c * cur + w * prev;
  }
  double MaxError() const {
    double e = 0;
    for (size_t b = 0; b < lens.size(); ++b)
      for (int p = 0; p < lens[b]; ++p)
        for (int h = 0; h < kH; ++h)
          for (int kv = 0; kv < 2; ++kv)
            for (int d = 0; d < kD; ++d) e = std::max(e, std::abs(Stored(int(b), p, h, kv, d) - Expected(int(b), p, h, kv, d)));
    return e;
  }
};

TEST(KvWriteMix, OneStepPrefillFollowsTheFormula) {
  Fixture f({9, 1, 16});
  ASSERT_TRUE(f.Step({0, 0, 0}, {9, 1, 16}, {0, 1, 2}, {0, 1, 2}).ok());
  EXPECT_LE(f.MaxError(), 1e-5);
}

TEST(KvWriteMix, ChunkedPrefillAndDecodesEqualOnePrefill) {
  // The paper's listing keeps the shifted K after prefill; prefill(n) then decode(m) must equal
  // prefill(n + m), which needs the raw K/V of the last token in the state.
  Fixture one({23, 14, 6}), chunked({23, 14, 6});
  ASSERT_TRUE(one.Step({0, 0, 0}, {23, 14, 6}, {0, 1, 2}, {0, 1, 2}).ok());
  // Chunks off block boundaries (block 4), decodes, a sequence absent from a step.
  ASSERT_TRUE(chunked.Step({0, 0, 0}, {7, 5, 1}, {0, 1, 2}, {0, 1, 2}).ok());
  ASSERT_TRUE(chunked.Step({7, 5}, {13, 6}, {0, 1}, {0, 1}).ok());
  ASSERT_TRUE(chunked.Step({13, 6, 1}, {14, 13, 5}, {0, 1, 2}, {0, 1, 2}).ok());
  ASSERT_TRUE(chunked.Step({14, 13, 5}, {15, 14, 6}, {0, 1, 2}, {0, 1, 2}).ok());  // three decodes
  for (int p = 15; p < 23; ++p) ASSERT_TRUE(chunked.Step({p}, {p + 1}, {0}, {0}).ok());
  EXPECT_LE(chunked.MaxError(), 1e-5);
  for (size_t b = 0; b < 3; ++b)
    for (int p = 0; p < one.lens[b]; ++p)
      for (int d = 0; d < kD; ++d) ASSERT_EQ(one.Stored(int(b), p, 1, 0, d), chunked.Stored(int(b), p, 1, 0, d));
}

TEST(KvWriteMix, AForkContinuesFromTheCopiedState) {
  // Sequence 1 is a fork of sequence 0 after 10 tokens (same tokens, its own blocks): the state slot
  // is copied, then both continue with the same tokens.
  Fixture f({15, 15});
  f.k[1] = f.k[0];
  f.v[1] = f.v[0];
  ASSERT_TRUE(f.Step({0}, {10}, {0}, {0}).ok());
  ASSERT_TRUE(f.Step({0}, {10}, {1}, {1}).ok());  // the child's first 10 tokens land in its blocks
  ASSERT_TRUE(f.cache->CopyState(0, 3).ok());     // the fork: child continues from slot 3
  ASSERT_TRUE(f.Step({10, 10}, {15, 15}, {0, 3}, {0, 1}).ok());
  EXPECT_LE(f.MaxError(), 1e-5);
}

TEST(KvWriteMix, BFloat16PagesRoundTheMixedValue) {
  Fixture f({12, 3}, DType::kBF16);
  ASSERT_TRUE(f.Step({0, 0}, {5, 3}, {0, 1}, {0, 1}).ok());
  ASSERT_TRUE(f.Step({5}, {12}, {0}, {0}).ok());
  EXPECT_LE(f.MaxError(), 0.1);  // |values| up to ~20: bf16 keeps 8 bits
  EXPECT_GT(f.MaxError(), 0.0);  // and it did round
}

TEST(KvWriteMix, RejectsWhatWouldLoseTheRecurrence) {
  Fixture f({5});
  const absl::Status no_slots = f.Step({0}, {5}, {}, {0});
  EXPECT_EQ(no_slots.code(), absl::StatusCode::kFailedPrecondition) << no_slots;
  EXPECT_NE(std::string(no_slots.message()).find("state_slots"), std::string::npos);
  kv::KvCacheOptions o = f.cache->options();
  o.state_bytes_per_layer = 8;
  f.cache = std::move(*kv::KvCache::Create(o));
  const absl::Status small = f.Step({0}, {5}, {0}, {0});
  EXPECT_EQ(small.code(), absl::StatusCode::kFailedPrecondition) << small;
  EXPECT_NE(std::string(small.message()).find("state_bytes_per_layer=8"), std::string::npos) << small;
}

}  // namespace
}  // namespace kvplug::attn
