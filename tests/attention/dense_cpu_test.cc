// Dense CPU attention against the double-precision reference on random ragged batches: prefill with
// cached prefixes, decode, odd lengths, block boundaries, GQA ratios, head sizes, cache dtypes.
#include <gtest/gtest.h>

#include <random>

#include "common/naive_attention.h"
#include "kvplug/attention/backend.h"
#include "kvplug/attention/dense/dense.h"
#include "kvplug/attention/step_work.h"

namespace kvplug::attn {
namespace {

struct Case {
  int num_q_heads, num_kv_heads, head_size, block_size;
  DType kv_dtype;
  DType q_dtype;
  std::vector<std::pair<int, int>> seqs;  // (seq_len, q_len)
  DenseConfig config;
  int threads = 2;
};

TensorView View3(void* data, DType dt, int64_t a, int64_t b, int64_t c) {
  TensorView v;
  v.data = data;
  v.dtype = dt;
  v.ndim = 3;
  v.shape = {a, b, c};
  v.strides = {b * c, c, 1};
  return v;
}

// Rounds through the storage dtype, as the cache will hold it.
double Round(double x, DType t) {
  float f = static_cast<float>(x);
  switch (t) {
    case DType::kF16: return F16ToFloat(FloatToF16(f));
    case DType::kBF16: return Bf16ToFloat(FloatToBf16(f));
    default: return f;
  }
}

// Returns the max abs error of out and lse against the reference.
std::pair<double, double> RunCase(const Case& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int nb_seq = static_cast<int>(c.seqs.size());
  const int d = c.head_size;
  int total_blocks = 0, total_tokens = 0;
  for (auto [len, ql] : c.seqs) {
    total_blocks += (len + c.block_size - 1) / c.block_size;
    total_tokens += ql;
  }
  kv::KvCacheOptions o;
  o.num_layers = 2;
  o.num_blocks = total_blocks + 3;
  o.block_size = c.block_size;
  o.num_kv_heads = c.num_kv_heads;
  o.head_size = d;
  o.dtype = c.kv_dtype;
  auto cache = kv::KvCache::Create(o);
  EXPECT_TRUE(cache.ok()) << cache.status();

  // Scatter blocks: a random permutation of block ids, so tables are not contiguous.
  std::vector<int32_t> ids(o.num_blocks);
  for (int i = 0; i < o.num_blocks; ++i) ids[i] = i;
  std::shuffle(ids.begin(), ids.end(), rng);
  std::vector<int32_t> qsl{0}, lens, indptr{0}, indices;
  std::vector<std::vector<double>> ks(nb_seq), vs(nb_seq), qs(nb_seq);
  size_t next_id = 0;
  const int layer = 1;
  for (int b = 0; b < nb_seq; ++b) {
    auto [len, ql] = c.seqs[b];
    lens.push_back(len);
    qsl.push_back(qsl.back() + ql);
    const int nblk = (len + c.block_size - 1) / c.block_size;
    for (int j = 0; j < nblk; ++j) indices.push_back(ids[next_id++]);
    indptr.push_back(static_cast<int32_t>(indices.size()));
    // K/V written straight into the pages through a one-token-at-a-time cache write.
    std::vector<float> kf(static_cast<size_t>(len) * c.num_kv_heads * d), vf(kf.size());
    for (auto& x : kf) x = normal(rng);
    for (auto& x : vf) x = normal(rng);
    std::vector<int64_t> slots(len);
    for (int p = 0; p < len; ++p) slots[p] = int64_t{indices[indptr[b] + p / c.block_size]} * c.block_size + p % c.block_size;
    EXPECT_TRUE((*cache)->Write(layer, View3(kf.data(), DType::kF32, len, c.num_kv_heads, d),
                                View3(vf.data(), DType::kF32, len, c.num_kv_heads, d), slots).ok());
    for (float x : kf) ks[b].push_back(Round(x, c.kv_dtype));
    for (float x : vf) vs[b].push_back(Round(x, c.kv_dtype));
  }
  // Queries, in the query dtype.
  const size_t qn = static_cast<size_t>(total_tokens) * c.num_q_heads * d;
  std::vector<uint8_t> qbuf(qn * DTypeSize(c.q_dtype)), obuf(qbuf.size());
  for (size_t i = 0; i < qn; ++i) StoreFromFloat(qbuf.data(), c.q_dtype, i, normal(rng));
  std::vector<float> lse(static_cast<size_t>(total_tokens) * c.num_q_heads, -1.0f);

  BatchPlan plan(PlanCapacity{nb_seq, std::max(total_tokens, 1), std::max(total_blocks, 1)});
  BatchInput in;
  in.num_seqs = nb_seq;
  in.block_size = c.block_size;
  in.query_start_loc = qsl.data();
  in.seq_lens = lens.data();
  in.kv_indptr = indptr.data();
  in.kv_indices = indices.data();
  EXPECT_TRUE(plan.Update(in).ok());

  HeadConfig heads{c.num_q_heads, c.num_kv_heads, d, c.kv_dtype, 1.0f / std::sqrt(static_cast<float>(d))};
  ThreadPool pool(c.threads);
  ExecContext exec{Device::kCpu, 0, &pool, nullptr};
  auto backend = CreateBackend(*FindBackend("dense"), heads, c.config, exec);
  EXPECT_TRUE(backend.ok()) << backend.status();
  StepWorkSet steps;
  auto work = steps.Get(StepKey(**backend, heads), **backend, heads, plan, exec);
  EXPECT_TRUE(work.ok()) << work.status();
  TensorView q = View3(qbuf.data(), c.q_dtype, total_tokens, c.num_q_heads, d);
  TensorView out = View3(obuf.data(), c.q_dtype, total_tokens, c.num_q_heads, d);
  TensorView lse_view;
  lse_view.data = lse.data();
  lse_view.ndim = 2;
  lse_view.shape = {total_tokens, c.num_q_heads};
  lse_view.strides = {c.num_q_heads, 1};
  RunArgs args{plan, **work, **cache, layer, q, {&out, &lse_view, nullptr}, exec};
  EXPECT_TRUE(ValidateRun(heads, args).ok()) << ValidateRun(heads, args);
  EXPECT_TRUE((*backend)->Run(args).ok());

  testing::NaiveParams np{c.num_q_heads, c.num_kv_heads, d, heads.sm_scale, c.config.window_left,
                          c.config.logits_soft_cap};
  double max_out = 0, max_lse = 0;
  for (int b = 0; b < nb_seq; ++b) {
    auto [len, ql] = c.seqs[b];
    std::vector<double> qd, ref, ref_lse;
    for (size_t i = size_t(qsl[b]) * c.num_q_heads * d; i < size_t(qsl[b + 1]) * c.num_q_heads * d; ++i)
      qd.push_back(LoadAsFloat(qbuf.data(), c.q_dtype, i));
    testing::NaiveAttention(np, len, ql, qd, ks[b], vs[b], &ref, &ref_lse);
    for (size_t i = 0; i < ref.size(); ++i)
      max_out = std::max(max_out, std::abs(ref[i] - LoadAsFloat(obuf.data(), c.q_dtype, size_t(qsl[b]) * c.num_q_heads * d + i)));
    for (size_t i = 0; i < ref_lse.size(); ++i)
      max_lse = std::max(max_lse, std::abs(ref_lse[i] - lse[size_t(qsl[b]) * c.num_q_heads + i]));
  }
  return {max_out, max_lse};
}

// Output tolerance by the dtype the output is stored in (the K/V rounding is in the reference).
double OutTolerance(DType q) { return q == DType::kF32 ? 1e-5 : q == DType::kF16 ? 2e-3 : 1.6e-2; }

TEST(DenseCpu, RaggedMixedBatchFp32AllGqaRatios) {
  for (auto [hq, hkv] : std::vector<std::pair<int, int>>{{4, 4}, {8, 2}, {8, 1}, {16, 2}, {32, 4}}) {
    Case c{hq, hkv, 64, 16, DType::kF32, DType::kF32, {{1, 1}, {17, 17}, {33, 5}, {16, 1}, {100, 1}, {48, 48}}, {}};
    auto [err, lse_err] = RunCase(c, 7 + hq * hkv);
    EXPECT_LE(err, 1e-5) << hq << "/" << hkv;
    EXPECT_LE(lse_err, 1e-5) << hq << "/" << hkv;
  }
}

TEST(DenseCpu, HeadSizesAndBlockSizes) {
  for (int d : {32, 64, 80, 128, 256})
    for (int bs : {1, 7, 16, 64}) {
      Case c{8, 2, d, bs, DType::kF32, DType::kF32, {{bs, 1}, {2 * bs + 1, 3}, {bs - 1 > 0 ? bs - 1 : 1, 1}}, {}};
      auto [err, lse_err] = RunCase(c, 100 + d + bs);
      EXPECT_LE(err, 1e-5) << "d=" << d << " bs=" << bs;
      EXPECT_LE(lse_err, 1e-5);
    }
}

TEST(DenseCpu, HalfPrecisionCachesAndQueries) {
  for (DType kv : {DType::kF16, DType::kBF16})
    for (DType q : {DType::kF32, DType::kF16, DType::kBF16}) {
      Case c{8, 4, 128, 16, kv, q, {{31, 31}, {64, 2}, {5, 1}}, {}};
      auto [err, lse_err] = RunCase(c, 3);
      EXPECT_LE(err, OutTolerance(q)) << DTypeName(kv) << " " << DTypeName(q);
      // LSE is fp32 from fp32 accumulation over rounded inputs; the query rounding shows in it.
      EXPECT_LE(lse_err, q == DType::kF32 ? 1e-4 : 0.1);
    }
}

TEST(DenseCpu, SlidingWindowAndSoftCap) {
  Case c{8, 2, 64, 8, DType::kF32, DType::kF32, {{40, 40}, {9, 1}, {100, 3}}, {}};
  c.config.window_left = 5;
  auto [err, lse_err] = RunCase(c, 11);
  EXPECT_LE(err, 1e-5);
  EXPECT_LE(lse_err, 1e-5);
  c.config = DenseConfig{-1, 2.5f};
  std::tie(err, lse_err) = RunCase(c, 12);
  EXPECT_LE(err, 1e-5);
  EXPECT_LE(lse_err, 1e-5);
}

TEST(DenseCpu, RandomRaggedBatchesSingleAndMultiThreaded) {
  std::mt19937 rng(2024);
  for (int trial = 0; trial < 25; ++trial) {
    std::vector<std::pair<int, int>> seqs;
    const int n = 1 + static_cast<int>(rng() % 6);
    for (int i = 0; i < n; ++i) {
      const int len = 1 + static_cast<int>(rng() % 150);
      const int ql = rng() % 3 == 0 ? 1 : 1 + static_cast<int>(rng() % len);
      seqs.push_back({len, ql});
    }
    const int hkv = 1 << (rng() % 3);
    const int group = 1 + static_cast<int>(rng() % 4);
    Case c{hkv * group, hkv, rng() % 2 ? 64 : 128, 1 + static_cast<int>(rng() % 33), DType::kF32, DType::kF32, seqs, {}};
    c.threads = 1 + trial % 3;
    auto [err, lse_err] = RunCase(c, 500 + trial);
    EXPECT_LE(err, 1e-5) << "trial " << trial;
    EXPECT_LE(lse_err, 1e-5) << "trial " << trial;
  }
}

TEST(DenseCpu, LongSequence) {
  Case c{4, 1, 64, 16, DType::kF32, DType::kF32, {{4099, 2}}, {}};
  auto [err, lse_err] = RunCase(c, 99);
  EXPECT_LE(err, 1e-5);
  EXPECT_LE(lse_err, 2e-5);
}

TEST(DenseCpu, RejectsWhatItCannotRun) {
  ThreadPool pool(1);
  const ExecContext cpu{Device::kCpu, 0, &pool, nullptr};
  const BackendInfo& dense = *FindBackend("dense");
  auto create = [&](const HeadConfig& h, const BackendConfig& c = {}) {
    return CreateBackend(dense, h, c, cpu).status().code();
  };
  EXPECT_EQ(create(HeadConfig{6, 4, 64, DType::kF32, 0.1f}), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(create(HeadConfig{4, 4, 100, DType::kF32, 0.1f}), absl::StatusCode::kUnimplemented);
  EXPECT_EQ(create(HeadConfig{4, 4, 64, DType::kFP8E4M3, 0.1f}), absl::StatusCode::kUnimplemented);
  EXPECT_EQ(create(HeadConfig{4, 4, 64, DType::kF32, 0.1f}, DenseConfig{-1, -1.0f}),
            absl::StatusCode::kInvalidArgument);
  EXPECT_NE(FindBackend("dense"), nullptr);
  EXPECT_EQ(FindBackend("nope"), nullptr);
}

}  // namespace
}  // namespace kvplug::attn
