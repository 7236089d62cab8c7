// The kernel family on the CPU engine: variants (key sets x transforms x accumulators) against the
// double-precision mask reference, and merge_states.
#include "variant_harness.h"

#include <gtest/gtest.h>

#include "kvplug/attention/cpu_engine.h"
#include "kvplug/attention/thread_pool.h"

namespace kvplug::testing {
namespace {

using attn::ExecContext;
using attn::HeadConfig;


struct CpuResult {
  std::vector<float> out, lse, entropy;
};

CpuResult RunOnCpu(const HarnessData& d, int threads = 2) {
  const HarnessCase& c = d.c;
  attn::ThreadPool pool(threads);
  const ExecContext exec{Device::kCpu, 0, &pool, nullptr};
  const HeadConfig heads{c.num_q_heads, c.num_kv_heads, c.head_size, c.kv_dtype,
                         1.0f / std::sqrt(static_cast<float>(c.head_size))};
  attn::VariantParams v{heads.sm_scale, c.soft_cap, c.scale_table ? d.scale_table.data() : nullptr, d.table_len};
  HarnessBackend backend(c.planner, heads, v);
  attn::BatchPlan plan(CapacityOf(d));
  EXPECT_TRUE(plan.Update(InputOf(d)).ok());
  attn::StepWorkSet steps;
  auto work = steps.Get(attn::StepKey(backend, heads), backend, heads, plan, exec);
  EXPECT_TRUE(work.ok()) << work.status();
  const int64_t T = d.num_tokens, Hq = c.num_q_heads, D = c.head_size;
  std::vector<uint8_t> qbuf(size_t(T * Hq * D) * DTypeSize(c.q_dtype)), obuf(qbuf.size());
  for (size_t i = 0; i < d.q.size(); ++i) StoreFromFloat(qbuf.data(), c.q_dtype, int64_t(i), d.q[i]);
  CpuResult r;
  r.lse.assign(size_t(T * Hq), 7.0f);
  r.entropy.assign(c.entropy ? size_t(T * Hq) : 0, 7.0f);
  TensorView q = View(qbuf.data(), c.q_dtype, {T, Hq, D}), o = View(obuf.data(), c.q_dtype, {T, Hq, D});
  TensorView l = View(r.lse.data(), DType::kF32, {T, Hq}), e = View(r.entropy.data(), DType::kF32, {T, Hq});
  const attn::RunArgs args{plan, **work, *d.cache, 0, q, {&o, &l, c.entropy ? &e : nullptr}, exec};
  EXPECT_TRUE(attn::ValidateRun(heads, args).ok());
  EXPECT_TRUE(backend.Run(args).ok());
  r.out.resize(size_t(T * Hq * D));
  for (size_t i = 0; i < r.out.size(); ++i) r.out[i] = LoadAsFloat(obuf.data(), c.q_dtype, int64_t(i));
  return r;
}

double OutTolerance(DType q) { return q == DType::kF32 ? 2e-5 : q == DType::kF16 ? 2e-3 : 1.6e-2; }

void Check(const HarnessCase& c, const char* what) {
  HarnessData d;
  BuildHarness(c, &d);
  const CpuResult r = RunOnCpu(d);
  const HarnessErrors e = Compare(d, r.out, r.lse, r.entropy);
  SCOPED_TRACE(fmt::format("{}: Hq={} Hkv={} D={} bs={} seqs={} pairs={}", what, c.num_q_heads, c.num_kv_heads,
                           c.head_size, c.block_size, c.seqs.size(), d.visible_pairs));
  EXPECT_LE(e.out, OutTolerance(c.q_dtype));
  EXPECT_LE(e.lse, 2e-5);
  if (c.entropy) EXPECT_LE(e.entropy, 5e-5);
}

TEST(VariantHarnessCpu, RandomBatchesEveryPlannerAndFeature) {
  std::mt19937 rng(2024);
  const int32_t gqa[][2] = {{4, 4}, {8, 2}, {8, 1}, {16, 2}};
  const int32_t heads[] = {64, 128, 256};
  for (int trial = 0; trial < 24; ++trial) {
    HarnessCase c;
    const auto& g = gqa[trial % 4];
    c.num_q_heads = g[0];
    c.num_kv_heads = g[1];
    c.head_size = heads[trial % 3];
    c.block_size = trial % 5 == 0 ? 7 : 16;
    c.seqs = RandomSeqs(rng, c.block_size, 90);
    c.kv_dtype = trial % 2 ? DType::kBF16 : DType::kF32;
    c.soft_cap = trial % 4 == 1 ? 2.5f : 0.0f;
    c.scale_table = trial % 3 == 2;
    c.entropy = true;
    c.seed = 100 + trial;
    switch (trial % 4) {
      case 0: c.planner = std::make_shared<attn::CausalPlanner>(-1); break;
      case 1: c.planner = std::make_shared<attn::CausalPlanner>(static_cast<int32_t>(rng() % 40)); break;
      case 2: c.planner = StarLikePlanner(8 + static_cast<int32_t>(rng() % 24), 1 + static_cast<int32_t>(rng() % 12)); break;
      default: c.planner = RandomPlanner(static_cast<uint32_t>(rng())); break;
    }
    Check(c, c.planner->Key().c_str());
  }
}

TEST(VariantHarnessCpu, FastEngineOnEveryHeadSizeDtypeAndGroup) {
  // The tiled engine's edges: every CPU head size, each cache and query dtype, groups from 1 to
  // more query heads than one work item takes (136 > 128 rows), sequences over many key tiles and
  // query tiles, pages that are not a multiple of the key tile, decode rows (part of one vector of
  // rows) and prefill rows (many vectors) in one batch.
  std::mt19937 rng(77);
  const int32_t head_sizes[] = {32, 64, 80, 96, 112, 128, 160, 192, 256};
  const int32_t gqa[][2] = {{32, 8}, {2, 2}, {12, 4}, {136, 1}, {6, 1}};
  const DType kv_dtypes[] = {DType::kF32, DType::kF16, DType::kBF16};
  for (int trial = 0; trial < 18; ++trial) {
    HarnessCase c;
    c.head_size = head_sizes[trial % 9];
    const auto& g = gqa[trial % 5];
    c.num_q_heads = g[0];
    c.num_kv_heads = g[1];
    c.block_size = trial % 3 == 0 ? 5 : 16;
    c.kv_dtype = kv_dtypes[trial % 3];
    c.q_dtype = trial % 4 == 3 ? DType::kBF16 : DType::kF32;
    c.seqs = RandomSeqs(rng, c.block_size, c.num_q_heads > 32 ? 70 : 260);
    c.seqs.push_back({c.num_q_heads > 32 ? 90 : 301, 1});  // a long decode
    c.soft_cap = trial % 5 == 4 ? 4.0f : 0.0f;
    c.scale_table = trial % 4 == 1;
    c.entropy = trial % 2 == 0;
    c.seed = 500 + trial;
    c.planner = trial % 6 == 5 ? RandomPlanner(static_cast<uint32_t>(rng()))
                               : std::make_shared<attn::CausalPlanner>(trial % 6 == 2 ? 45 : -1);
    Check(c, c.planner->Key().c_str());
  }
}

TEST(VariantHarnessCpu, StarLikeBlocksSeeOnlyTheAnchorAndThemselves) {
  // A direct property, independent of the reference: with anchor + block key sets, changing a key in
  // block 1 changes nothing for tokens of block 2.
  HarnessCase c;
  c.seqs = {{96, 96}};
  c.planner = StarLikePlanner(32, 16);
  HarnessData a, b;
  BuildHarness(c, &a);
  BuildHarness(c, &b);
  // Perturb block 1's keys (positions 32..63) in b's cache.
  for (int32_t p = 32; p < 64; ++p)
    for (int32_t h = 0; h < c.num_kv_heads; ++h) {
      auto* row = static_cast<float*>(b.cache->layer(0).Row(0, b.indices[p / c.block_size], p % c.block_size, h));
      for (int32_t x = 0; x < c.head_size; ++x) row[x] += 1.0f;
    }
  const CpuResult ra = RunOnCpu(a), rb = RunOnCpu(b);
  const size_t row = size_t(c.num_q_heads) * c.head_size;
  bool block1_changed = false;
  for (size_t i = 32 * row; i < 64 * row; ++i) block1_changed |= ra.out[i] != rb.out[i];
  EXPECT_TRUE(block1_changed);
  for (size_t i = 64 * row; i < 96 * row; ++i) ASSERT_EQ(ra.out[i], rb.out[i]) << i;
  for (size_t i = 0; i < 32 * row; ++i) ASSERT_EQ(ra.out[i], rb.out[i]) << i;
}

TEST(VariantHarnessCpu, RowsThatSeeNoKeyGiveZerosAndMinusInfinity) {
  // A planner whose only segment lies after every query: nothing is visible.
  HarnessCase c;
  c.seqs = {{40, 3}};
  c.planner = std::make_shared<FnPlanner>("none", 1, 0, [](const attn::BatchPlan& plan, KeySets* out) {
    out->Clear();
    const KeySegment g{plan.kv_indptr()[0], 0, 40, 100, -1, 0, attn::kUnboundedLag};
    out->AddSpan(QuerySpan{0, 0, 3, 37, 0, 0}, {&g, 1});
    return absl::OkStatus();
  });
  HarnessData d;
  BuildHarness(c, &d);
  const CpuResult r = RunOnCpu(d);
  for (float x : r.out) ASSERT_EQ(x, 0.0f);
  for (float x : r.lse) ASSERT_TRUE(std::isinf(x) && x < 0);
  for (float x : r.entropy) ASSERT_EQ(x, 0.0f);
}

TEST(VariantHarnessCpu, KeySetsThatLeaveTokensUncoveredAreRejected) {
  HarnessCase c;
  c.seqs = {{20, 4}};
  HarnessData d;
  BuildHarness(c, &d);
  attn::BatchPlan plan(CapacityOf(d));
  ASSERT_TRUE(plan.Update(InputOf(d)).ok());
  KeySets keys(KeySetBounds{4, 4, 0, 1});
  const KeySegment g{0, 0, 20, 0, -1, 0, attn::kUnboundedLag};
  keys.AddSpan(QuerySpan{0, 0, 3, 16, 0, 0}, {&g, 1});  // token 3 uncovered
  EXPECT_FALSE(keys.Validate(plan).ok());
  keys.Clear();
  const KeySegment past{0, 0, 40, 0, -1, 0, attn::kUnboundedLag};  // reads pages the sequence lacks
  keys.AddSpan(QuerySpan{0, 0, 4, 16, 0, 0}, {&past, 1});
  EXPECT_FALSE(keys.Validate(plan).ok());
  keys.Clear();
  keys.AddSpan(QuerySpan{0, 0, 4, -1, 0, 0}, {&g, 1});  // a negative position (planners may place spans
  EXPECT_FALSE(keys.Validate(plan).ok());                // anywhere else: Star shards' are not contiguous)
}

// merge_states: shards of a sequence's keys, run separately and merged, equal the whole.
TEST(MergeStatesCpu, ShardsMergeToTheWholeSequence) {
  for (int shards : {1, 2, 3, 8}) {
    HarnessCase whole;
    whole.seqs = {{203, 5}, {77, 1}, {130, 130}};
    whole.num_q_heads = 8;
    whole.num_kv_heads = 2;
    whole.seed = 7;
    HarnessData dw;
    BuildHarness(whole, &dw);
    const CpuResult full = RunOnCpu(dw);
    const int64_t T = dw.num_tokens, H = whole.num_q_heads, D = whole.head_size;
    std::vector<float> po(size_t(shards * T * H * D)), pl(size_t(shards * T * H)), pe(pl.size());
    for (int s = 0; s < shards; ++s) {
      HarnessCase part = whole;
      part.planner = std::make_shared<FnPlanner>(
          fmt::format("shard{}/{}", s, shards), 1, 0, [s, shards](const attn::BatchPlan& plan, KeySets* out) {
            out->Clear();
            const auto qsl = plan.query_start_loc();
            for (int32_t b = 0; b < plan.num_seqs(); ++b) {
              const int32_t len = plan.seq_lens()[b], q_len = qsl[b + 1] - qsl[b];
              const KeySegment g{plan.kv_indptr()[b], len * s / shards, len * (s + 1) / shards, 0, -1, 0,
                                 attn::kUnboundedLag};
              out->AddSpan(QuerySpan{b, qsl[b], qsl[b + 1], len - q_len, 0, 0}, {&g, 1});
            }
            return absl::OkStatus();
          });
      HarnessData dp;
      BuildHarness(part, &dp);
      const CpuResult r = RunOnCpu(dp);
      std::copy(r.out.begin(), r.out.end(), po.begin() + s * T * H * D);
      std::copy(r.lse.begin(), r.lse.end(), pl.begin() + s * T * H);
      std::copy(r.entropy.begin(), r.entropy.end(), pe.begin() + s * T * H);
    }
    std::vector<float> out(size_t(T * H * D)), lse(size_t(T * H)), ent(lse.size());
    TensorView vpo = View(po.data(), DType::kF32, {shards, T, H, D}), vpl = View(pl.data(), DType::kF32, {shards, T, H}),
               vpe = View(pe.data(), DType::kF32, {shards, T, H}), vo = View(out.data(), DType::kF32, {T, H, D}),
               vl = View(lse.data(), DType::kF32, {T, H}), ve = View(ent.data(), DType::kF32, {T, H});
    const attn::MergeStatesArgs m{&vpo, &vpl, &vpe, &vo, &vl, &ve};
    ASSERT_TRUE(attn::ValidateMergeStates(m).ok());
    attn::ThreadPool pool(2);
    attn::MergeStatesCpu(m, &pool);
    double eo = 0, el = 0, ee = 0;
    for (size_t i = 0; i < out.size(); ++i) eo = std::max(eo, double(std::abs(out[i] - full.out[i])));
    for (size_t i = 0; i < lse.size(); ++i) {
      el = std::max(el, double(std::abs(lse[i] - full.lse[i])));
      ee = std::max(ee, double(std::abs(ent[i] - full.entropy[i])));
    }
    EXPECT_LE(eo, 1e-6) << shards << " shards";
    EXPECT_LE(el, 2e-6) << shards << " shards";
    EXPECT_LE(ee, 1e-5) << shards << " shards";
  }
}

TEST(MergeStatesCpu, EmptyPartialsAndHugeGapsAreExact) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  const int64_t T = 3, H = 2, D = 16;
  std::vector<float> po(size_t(3 * T * H * D)), pl(size_t(3 * T * H)), pe(pl.size());
  for (auto& x : po) x = normal(rng);
  for (auto& x : pe) x = std::abs(normal(rng));
  for (int64_t i = 0; i < T * H; ++i) {
    pl[i] = -std::numeric_limits<float>::infinity();  // partial 0 empty everywhere
    pl[T * H + i] = normal(rng);
    pl[2 * T * H + i] = pl[T * H + i] - 150.0f;  // 150 nats below: weight e^-150 underflows, no NaN
  }
  std::vector<float> out(size_t(T * H * D)), lse(size_t(T * H)), ent(lse.size());
  TensorView vpo = View(po.data(), DType::kF32, {3, T, H, D}), vpl = View(pl.data(), DType::kF32, {3, T, H}),
             vpe = View(pe.data(), DType::kF32, {3, T, H}), vo = View(out.data(), DType::kF32, {T, H, D}),
             vl = View(lse.data(), DType::kF32, {T, H}), ve = View(ent.data(), DType::kF32, {T, H});
  attn::ThreadPool pool(1);
  attn::MergeStatesCpu({&vpo, &vpl, &vpe, &vo, &vl, &ve}, &pool);
  for (int64_t i = 0; i < T * H; ++i) {
    EXPECT_EQ(lse[i], pl[T * H + i]);
    EXPECT_NEAR(ent[i], pe[T * H + i], 1e-6);
    for (int64_t x = 0; x < D; ++x) EXPECT_EQ(out[i * D + x], po[(T * H + i) * D + x]);
  }
  // Every partial empty: zeros, -inf, entropy 0.
  std::fill(pl.begin(), pl.end(), -std::numeric_limits<float>::infinity());
  attn::MergeStatesCpu({&vpo, &vpl, &vpe, &vo, &vl, &ve}, &pool);
  for (float x : out) EXPECT_EQ(x, 0.0f);
  for (float x : lse) EXPECT_TRUE(std::isinf(x) && x < 0);
  for (float x : ent) EXPECT_EQ(x, 0.0f);
}

TEST(MergeStatesCpu, BadShapesAreRejected) {
  std::vector<float> buf(4096);
  TensorView po = View(buf.data(), DType::kF32, {2, 3, 4, 8}), pl = View(buf.data(), DType::kF32, {2, 3, 5}),
             o = View(buf.data(), DType::kF32, {3, 4, 8});
  EXPECT_FALSE(attn::ValidateMergeStates({&po, &pl, nullptr, &o, nullptr, nullptr}).ok());
  pl = View(buf.data(), DType::kF32, {2, 3, 4});
  EXPECT_TRUE(attn::ValidateMergeStates({&po, &pl, nullptr, &o, nullptr, nullptr}).ok());
  TensorView e = View(buf.data(), DType::kF32, {3, 4});
  EXPECT_FALSE(attn::ValidateMergeStates({&po, &pl, nullptr, &o, nullptr, &e}).ok());  // no partial entropy
  o = View(buf.data(), DType::kF32, {3, 4, 9});
  EXPECT_FALSE(attn::ValidateMergeStates({&po, &pl, nullptr, &o, nullptr, nullptr}).ok());
}

}  // namespace
}  // namespace kvplug::testing
