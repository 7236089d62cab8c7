// Entropy-guided attention on the CPU engine against a reference that builds the full probability
// matrix in double: logits q.k / (t[h, p] sqrt(d)) with a [heads, T] temperature table (positions
// past T use the last entry), outputs, lse, per-row entropy -sum a log a, and the per-head summary
// (rows, mean H, informative rows, mean H / E_max, collapse and overload band counts). Ragged
// batches with prefill, chunked prefill over a cached prefix, decode; t = 1 equals dense.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "fmt/format.h"
#include "common/tensor_views.h"
#include "kvplug/attention/backend.h"
#include "kvplug/attention/step_work.h"
#include "kvplug/attention/telemetry.h"

namespace kvplug::attn {
namespace {

constexpr int kHq = 4, kHkv = 2, kD = 32, kPage = 8;

using ::kvplug::testing::View;

struct Outputs {
  std::vector<float> out, lse, entropy, summary;
  absl::Status status;
};

struct Batch {
  std::vector<std::pair<int, int>> seqs;  // (seq_len, q_len)
  std::vector<std::vector<float>> k, v;   // per sequence [len, Hkv, D]
  std::vector<float> q;                   // [T, Hq, D]
  int tokens = 0;
};

Batch MakeBatch(std::vector<std::pair<int, int>> seqs, std::mt19937& rng, float scale = 1.f) {
  std::normal_distribution<float> normal(0.f, scale);
  Batch b;
  b.seqs = std::move(seqs);
  for (auto [len, q] : b.seqs) {
    b.k.emplace_back(size_t(len) * kHkv * kD);
    b.v.emplace_back(size_t(len) * kHkv * kD);
    for (float& x : b.k.back()) x = normal(rng);
    for (float& x : b.v.back()) x = normal(rng);
    b.tokens += q;
  }
  b.q.resize(size_t(b.tokens) * kHq * kD);
  for (float& x : b.q) x = normal(rng);
  return b;
}

Outputs RunBackend(const Batch& b, const char* backend, const BackendConfig& config, bool with_entropy, bool with_summary) {
  int pages = 0;
  for (auto [len, q] : b.seqs) pages += (len + kPage - 1) / kPage;
  kv::KvCacheOptions o;
  o.num_layers = 1;
  o.num_blocks = pages + 1;
  o.block_size = kPage;
  o.num_kv_heads = kHkv;
  o.head_size = kD;
  o.dtype = DType::kF32;
  auto cache = kv::KvCache::Create(o);
  EXPECT_TRUE(cache.ok());
  std::vector<int32_t> qsl{0}, lens, indptr{0}, indices;
  int next = pages;  // pages in reverse order: tables are not contiguous
  for (size_t s = 0; s < b.seqs.size(); ++s) {
    auto [len, q] = b.seqs[s];
    qsl.push_back(qsl.back() + q);
    lens.push_back(len);
    std::vector<int64_t> slots(len);
    const int first = int(indices.size());
    for (int j = 0; j < (len + kPage - 1) / kPage; ++j) indices.push_back(--next);
    indptr.push_back(int(indices.size()));
    for (int p = 0; p < len; ++p) slots[p] = int64_t{indices[first + p / kPage]} * kPage + p % kPage;
    EXPECT_TRUE((*cache)->Write(0, View(const_cast<float*>(b.k[s].data()), DType::kF32, {len, kHkv, kD}),
                                View(const_cast<float*>(b.v[s].data()), DType::kF32, {len, kHkv, kD}), slots).ok());
  }
  BatchPlan plan(PlanCapacity{int(b.seqs.size()), b.tokens, pages});
  BatchInput in;
  in.num_seqs = int(b.seqs.size());
  in.block_size = kPage;
  in.query_start_loc = qsl.data();
  in.seq_lens = lens.data();
  in.kv_indptr = indptr.data();
  in.kv_indices = indices.data();
  EXPECT_TRUE(plan.Update(in).ok());
  HeadConfig heads{kHq, kHkv, kD, DType::kF32, 1.0f / std::sqrt(float(kD))};
  ThreadPool pool(2);
  ExecContext exec{Device::kCpu, 0, &pool, nullptr};
  Outputs r;
  auto be = CreateBackend(*FindBackend(backend), heads, config, exec);
  r.status = be.status();
  if (!be.ok()) return r;
  StepWorkSet steps;
  auto work = steps.Get(StepKey(**be, heads), **be, heads, plan, exec);
  EXPECT_TRUE(work.ok()) << work.status();
  r.out.assign(b.q.size(), -9.f);
  r.lse.assign(size_t(b.tokens) * kHq, -9.f);
  r.entropy.assign(r.lse.size(), -9.f);
  r.summary.assign(size_t(kHq) * kEntropySummaryFields, -9.f);
  TensorView qv = View(const_cast<float*>(b.q.data()), DType::kF32, {b.tokens, kHq, kD});
  TensorView ov = View(r.out.data(), DType::kF32, {b.tokens, kHq, kD}), lv = View(r.lse.data(), DType::kF32, {b.tokens, kHq});
  TensorView ev = View(r.entropy.data(), DType::kF32, {b.tokens, kHq});
  TensorView sv = View(r.summary.data(), DType::kF32, {kHq, kEntropySummaryFields});
  RunArgs args{plan, **work, **cache, 0, qv, {&ov, &lv, with_entropy ? &ev : nullptr, with_summary ? &sv : nullptr},
               exec};
  EXPECT_TRUE(ValidateRun(heads, args).ok()) << ValidateRun(heads, args);
  r.status = (*be)->Run(args);
  return r;
}

// Full probability rows in double; the summary from the reference's entropies.
Outputs Reference(const Batch& b, const std::vector<float>& temperature) {
  const int positions = temperature.empty() ? 1 : int(temperature.size()) / kHq;
  Outputs r;
  r.out.assign(b.q.size(), 0.0);
  r.lse.assign(size_t(b.tokens) * kHq, 0.0);
  r.entropy.assign(r.lse.size(), 0.0);
  std::vector<double> acc(size_t(kHq) * kEntropySummaryFields, 0.0);
  int t = 0;
  for (size_t s = 0; s < b.seqs.size(); ++s) {
    auto [len, ql] = b.seqs[s];
    for (int i = 0; i < ql; ++i, ++t) {
      const int pos = len - ql + i;
      for (int h = 0; h < kHq; ++h) {
        const int g = h / (kHq / kHkv);
        const double temp = temperature.empty() ? 1.0 : temperature[size_t(h) * positions + std::min(pos, positions - 1)];
        std::vector<double> logit(pos + 1);
        for (int j = 0; j <= pos; ++j) {
          double dot = 0;
          for (int x = 0; x < kD; ++x)
            dot += double(b.q[(size_t(t) * kHq + h) * kD + x]) * b.k[s][(size_t(j) * kHkv + g) * kD + x];
          logit[j] = dot / (temp * std::sqrt(double(kD)));
        }
        const double m = *std::max_element(logit.begin(), logit.end());
        double z = 0;
        for (double l : logit) z += std::exp(l - m);
        double ent = 0;
        for (int j = 0; j <= pos; ++j) {
          const double a = std::exp(logit[j] - m) / z;
          if (a > 0) ent -= a * std::log(a);
          for (int x = 0; x < kD; ++x)
            r.out[(size_t(t) * kHq + h) * kD + x] += float(a * b.v[s][(size_t(j) * kHkv + g) * kD + x]);
        }
        r.lse[size_t(t) * kHq + h] = float(m + std::log(z));
        r.entropy[size_t(t) * kHq + h] = float(ent);
        double* sm = &acc[size_t(h) * kEntropySummaryFields];
        const int keys = pos + 1;
        sm[0] += 1;
        sm[1] += ent;
        if (keys >= 2) {
          const double e_max = std::log(double(keys));
          sm[2] += 1;
          sm[3] += ent / e_max;
          sm[4] += ent <= e_max / 4;
          sm[5] += ent >= 3 * e_max / 4;
        }
      }
    }
  }
  for (int h = 0; h < kHq; ++h) {
    const double* sm = &acc[size_t(h) * kEntropySummaryFields];
    r.summary.insert(r.summary.end(), {float(sm[0]), float(sm[0] ? sm[1] / sm[0] : 0), float(sm[2]),
                                       float(sm[2] ? sm[3] / sm[2] : 0), float(sm[4]), float(sm[5])});
  }
  return r;
}

double MaxDiff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double d = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) d = std::max(d, double(std::abs(a[i] - b[i])));
  return d;
}

TEST(EntropyCpu, TemperatureTablesAndEntropyMatchTheFullProbabilities) {
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(0.25f, 3.0f);
  // Prefill, chunked prefill over a cached prefix, decodes, odd lengths.
  const std::vector<std::pair<int, int>> seqs{{37, 37}, {90, 13}, {64, 1}, {5, 5}, {129, 1}};
  for (int positions : {1, 7, 200}) {  // 7: most query positions lie past the table
    SCOPED_TRACE(fmt::format("T={}", positions));
    const Batch b = MakeBatch(seqs, rng);
    std::vector<float> temperature(size_t(kHq) * positions);
    for (float& t : temperature) t = u(rng);
    const Outputs got = RunBackend(b, "entropy", EntropyConfig{temperature, false}, true, true);
    ASSERT_TRUE(got.status.ok()) << got.status;
    const Outputs ref = Reference(b, temperature);
    EXPECT_LT(MaxDiff(got.out, ref.out), 2e-6);  // float32 accumulators: 1e-6 is not reached
    EXPECT_LT(MaxDiff(got.lse, ref.lse), 2e-6);
    EXPECT_LT(MaxDiff(got.entropy, ref.entropy), 2e-6);
    for (int h = 0; h < kHq; ++h)
      for (int f = 0; f < kEntropySummaryFields; ++f)
        EXPECT_NEAR(got.summary[h * kEntropySummaryFields + f], ref.summary[h * kEntropySummaryFields + f], 2e-6)
            << "head " << h << " field " << f;
  }
}

TEST(EntropyCpu, BandsCountCollapsedAndOverloadedRows) {
  // Sharp keys (large logits) collapse the entropy; a near-zero query spreads it: both bands are hit.
  std::mt19937 rng(4);
  Batch sharp = MakeBatch({{64, 64}}, rng, 3.0f);
  const Outputs s = RunBackend(sharp, "entropy", EntropyConfig{{0.1f, 0.1f, 0.1f, 0.1f}, false}, false, true);
  ASSERT_TRUE(s.status.ok());
  Batch flat = MakeBatch({{64, 64}}, rng, 0.05f);
  const Outputs f = RunBackend(flat, "entropy", EntropyConfig{{}, false}, false, true);
  ASSERT_TRUE(f.status.ok());
  const Outputs rs = Reference(sharp, {0.1f, 0.1f, 0.1f, 0.1f}), rf = Reference(flat, {});
  for (int h = 0; h < kHq; ++h) {
    EXPECT_GT(s.summary[h * 6 + 4], 10) << h;  // collapse
    EXPECT_GT(f.summary[h * 6 + 5], 10) << h;  // overload
    for (int x = 0; x < 6; ++x) {
      EXPECT_NEAR(s.summary[h * 6 + x], rs.summary[h * 6 + x], 2e-6);
      EXPECT_NEAR(f.summary[h * 6 + x], rf.summary[h * 6 + x], 2e-6);
    }
  }
}

TEST(EntropyCpu, UnitTemperatureEqualsDenseAndDenseHasTheTelemetry) {
  std::mt19937 rng(2);
  const Batch b = MakeBatch({{50, 50}, {70, 3}}, rng);
  const Outputs e = RunBackend(b, "entropy", EntropyConfig{std::vector<float>(kHq, 1.0f), false}, true, true);
  const Outputs d = RunBackend(b, "dense", DenseConfig{}, true, true);
  ASSERT_TRUE(e.status.ok() && d.status.ok());
  EXPECT_EQ(MaxDiff(e.out, d.out), 0.0);
  EXPECT_EQ(MaxDiff(e.entropy, d.entropy), 0.0);
  EXPECT_EQ(MaxDiff(e.summary, d.summary), 0.0);
  // The summary alone (no per-row entropy requested) is the same.
  const Outputs only = RunBackend(b, "dense", DenseConfig{}, false, true);
  EXPECT_EQ(MaxDiff(only.summary, d.summary), 0.0);
  EXPECT_LT(MaxDiff(d.summary, Reference(b, {}).summary), 2e-6);
}

TEST(EntropyCpu, BadTemperatureTablesAreRejected) {
  std::mt19937 rng(3);
  const Batch b = MakeBatch({{8, 8}}, rng);
  for (const std::vector<float>& t : std::vector<std::vector<float>>{
           {1, 1, 1}, {1, 1, 1, 0}, {1, -1, 1, 1}, {1, 1, NAN, 1}, {1, 1, 1, INFINITY}, {1e-39f, 1, 1, 1}}) {
    const Outputs r = RunBackend(b, "entropy", EntropyConfig{t, false}, false, false);
    EXPECT_TRUE(absl::IsInvalidArgument(r.status)) << r.status;
  }
  EXPECT_NE(RunBackend(b, "entropy", EntropyConfig{{1, 1, 1}, false}, false, false).status.message().find("multiple"),
            std::string::npos);
  EXPECT_NE(RunBackend(b, "entropy", EntropyConfig{{1, 1, 1, -2}, false}, false, false).status.message().find("temperature[3]"),
            std::string::npos);
}

TEST(EntropyCpu, VisibleKeysFollowMasksAndPositionMaps) {
  KeySets keys(KeySetBounds{4, 8, 16, 3});
  const KeySegment causal{0, 0, 10, 0, -1, 0, kUnboundedLag};
  const KeySegment window{0, 0, 10, 0, -1, 0, 2};
  ASSERT_TRUE(keys.AddSpan(QuerySpan{0, 0, 2, 4, 0, 0}, {&causal, 1}));   // positions 4, 5: 5 and 6 keys
  ASSERT_TRUE(keys.AddSpan(QuerySpan{0, 2, 3, 9, 0, 0}, {&window, 1}));   // position 9, keys 7..9
  const int32_t map[] = {0, 0, 3, 8, 8};
  const int32_t off = keys.AddPositions(map);
  const KeySegment mapped{0, 0, 5, 0, off, 0, kUnboundedLag};
  ASSERT_TRUE(keys.AddSpan(QuerySpan{0, 3, 4, 3, 0, 0}, {&mapped, 1}));   // position 3: map entries 0, 0, 3
  std::vector<int32_t> n(4);
  CountVisibleKeys(keys, absl::MakeSpan(n));
  EXPECT_EQ(n, (std::vector<int32_t>{5, 6, 3, 3}));
}

}  // namespace
}  // namespace kvplug::attn
