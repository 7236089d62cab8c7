// Star Attention on the CPU engine against an independent reference that builds the paper's
// anchor-prefixed sequences explicitly (phase 1) and full causal attention (phase 2), in double:
// ragged batches, anchors smaller than the block, contexts not divisible by the block, chunked
// prefill off block boundaries, blocks recomputed alone over a longer cache (prefix reuse), pages
// shared between sequences, a step crossing the context boundary, 1/2/3/8 shards merged.
#include <gtest/gtest.h>

#include <random>

#include "fmt/format.h"

#include "common/naive_attention.h"
#include "common/tensor_views.h"
#include "kvplug/attention/backend.h"
#include "kvplug/attention/cpu_engine.h"
#include "kvplug/attention/star/star.h"
#include "kvplug/attention/step_work.h"

namespace kvplug::attn {
namespace {

constexpr int kHq = 4, kHkv = 2, kD = 32;

using ::kvplug::testing::View;

// One document: K/V and queries for every global position (as if every token were a query).
struct Doc {
  int len = 0;
  std::vector<float> k, v, q;  // [len, H, D]
};

Doc MakeDoc(int len, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.f, 1.f);
  Doc d;
  d.len = len;
  d.k.resize(size_t(len) * kHkv * kD);
  d.v.resize(d.k.size());
  d.q.resize(size_t(len) * kHq * kD);
  for (auto* x : {&d.k, &d.v, &d.q})
    for (float& f : *x) f = normal(rng);
  return d;
}

std::vector<double> Rows(const std::vector<float>& x, int heads, const std::vector<int>& positions) {
  std::vector<double> out;
  for (int p : positions)
    for (int i = 0; i < heads * kD; ++i) out.push_back(x[size_t(p) * heads * kD + i]);
  return out;
}

// The paper's Star Attention for the token at global position p of a context of n tokens: in phase
// 1, block k > 0 is run as the explicit sequence [anchor ; block k up to p] (full causal attention,
// the anchor's outputs would be dropped); in phase 2, causal attention over everything up to p.
void StarReference(const Doc& d, int n, int bsz, int a, int p, double* out, double* lse) {
  std::vector<int> keys;
  if (p < n && p >= bsz) {
    for (int j = 0; j < a; ++j) keys.push_back(j);
    for (int j = p / bsz * bsz; j <= p; ++j) keys.push_back(j);
  } else {
    for (int j = 0; j <= p; ++j) keys.push_back(j);
  }
  testing::NaiveParams np{kHq, kHkv, kD, 1.0 / std::sqrt(double(kD))};
  std::vector<double> o, l;
  testing::NaiveAttention(np, int(keys.size()), 1, Rows(d.q, kHq, {p}), Rows(d.k, kHkv, keys), Rows(d.v, kHkv, keys),
                          &o, &l);
  std::copy(o.begin(), o.end(), out);
  std::copy(l.begin(), l.end(), lse);
}

// A CPU cache holding, per sequence, the keys of `positions` (its local layout) in shuffled pages.
struct ShardCache {
  std::unique_ptr<kv::KvCache> cache;
  std::vector<std::vector<int32_t>> pages;  // per sequence
};

ShardCache MakeCache(const std::vector<const Doc*>& docs, const std::vector<std::vector<int>>& layouts, int page,
                     std::mt19937& rng) {
  int total = 0;
  for (const auto& l : layouts) total += (int(l.size()) + page - 1) / page;
  kv::KvCacheOptions o;
  o.num_layers = 1;
  o.num_blocks = total + 2;
  o.block_size = page;
  o.num_kv_heads = kHkv;
  o.head_size = kD;
  o.dtype = DType::kF32;
  ShardCache sc;
  auto cache = kv::KvCache::Create(o);
  EXPECT_TRUE(cache.ok()) << cache.status();
  sc.cache = std::move(*cache);
  std::vector<int32_t> ids(o.num_blocks);
  for (int i = 0; i < o.num_blocks; ++i) ids[i] = i;
  std::shuffle(ids.begin(), ids.end(), rng);
  size_t next = 0;
  for (size_t b = 0; b < docs.size(); ++b) {
    const auto& l = layouts[b];
    std::vector<int32_t> pg((l.size() + page - 1) / page);
    for (auto& x : pg) x = ids[next++];
    std::vector<float> k = std::vector<float>(), v;
    std::vector<int64_t> slots;
    for (size_t i = 0; i < l.size(); ++i) {
      slots.push_back(int64_t{pg[i / page]} * page + int64_t(i % page));
      for (int x = 0; x < kHkv * kD; ++x) {
        k.push_back(docs[b]->k[size_t(l[i]) * kHkv * kD + x]);
        v.push_back(docs[b]->v[size_t(l[i]) * kHkv * kD + x]);
      }
    }
    if (!l.empty()) {
      const int64_t m = int64_t(l.size());
      EXPECT_TRUE(sc.cache->Write(0, View(k.data(), DType::kF32, {m, kHkv, kD}), View(v.data(), DType::kF32, {m, kHkv, kD}),
                                  slots).ok());
    }
    sc.pages.push_back(pg);
  }
  return sc;
}

// One batch entry of a step: sequence `doc` with `len` keys held, the last `tokens` of which (or,
// with explicit positions, `tokens` query tokens at `positions`) are this step's queries.
struct Entry {
  int doc = 0, len = 0, n = 0;
  std::vector<int> positions;  // global positions of this step's tokens
  int pos_start = -1;          // -1: no query_pos_starts
};

struct StepResult {
  std::vector<float> out, lse;
};

StepResult RunStar(const StarConfig& cfg, const ShardCache& sc, const std::vector<Entry>& entries,
                   const std::vector<const Doc*>& docs, bool explicit_positions, absl::Status* status = nullptr) {
  std::vector<int32_t> qsl{0}, lens, indptr{0}, indices, ctx, starts;
  indices.reserve(1);  // never NULL, even for shards holding no page
  std::vector<float> q;
  for (const Entry& e : entries) {
    qsl.push_back(qsl.back() + int(e.positions.size()));
    lens.push_back(e.len);
    ctx.push_back(e.n);
    starts.push_back(e.pos_start);
    const int need = (e.len + sc.cache->options().block_size - 1) / sc.cache->options().block_size;
    for (int j = 0; j < need; ++j) indices.push_back(sc.pages[e.doc][j]);
    indptr.push_back(int32_t(indices.size()));
    for (int p : e.positions)
      for (int x = 0; x < kHq * kD; ++x) q.push_back(docs[e.doc]->q[size_t(p) * kHq * kD + x]);
  }
  const int t = qsl.back(), nseq = int(entries.size());
  BatchPlan plan(PlanCapacity{nseq, std::max(t, 1), std::max<int>(int(indices.size()), 1)});
  BatchInput in;
  in.num_seqs = nseq;
  in.block_size = sc.cache->options().block_size;
  in.query_start_loc = qsl.data();
  in.seq_lens = lens.data();
  in.kv_indptr = indptr.data();
  in.kv_indices = indices.data();
  in.context_lens = ctx.data();
  if (explicit_positions) in.query_pos_starts = starts.data();
  EXPECT_TRUE(plan.Update(in).ok()) << plan.Update(in);
  HeadConfig heads{kHq, kHkv, kD, DType::kF32, 1.0f / std::sqrt(float(kD))};
  ThreadPool pool(2);
  ExecContext exec{Device::kCpu, 0, &pool, nullptr};
  auto backend = CreateBackend(*FindBackend("star"), heads, cfg, exec);
  EXPECT_TRUE(backend.ok()) << backend.status();
  StepWorkSet steps;
  auto work = steps.Get(StepKey(**backend, heads), **backend, heads, plan, exec);
  StepResult r;
  if (status) *status = work.status();
  if (!work.ok()) return r;
  r.out.assign(q.size(), -7.f);
  r.lse.assign(size_t(t) * kHq, -7.f);
  TensorView qv = View(q.data(), DType::kF32, {t, kHq, kD}), ov = View(r.out.data(), DType::kF32, {t, kHq, kD});
  TensorView lv = View(r.lse.data(), DType::kF32, {t, kHq});
  RunArgs args{plan, **work, *sc.cache, 0, qv, {&ov, &lv, nullptr}, exec};
  EXPECT_TRUE(ValidateRun(heads, args).ok()) << ValidateRun(heads, args);
  EXPECT_TRUE((*backend)->Run(args).ok());
  return r;
}

// Max abs error of a step's outputs against the reference at each entry's positions.
double StepError(const StepResult& r, const std::vector<Entry>& entries, const std::vector<const Doc*>& docs,
                 int bsz, int a) {
  double err = 0;
  size_t row = 0;
  for (const Entry& e : entries)
    for (int p : e.positions) {
      std::vector<double> o(kHq * kD), l(kHq);
      StarReference(*docs[e.doc], e.n, bsz, a, p, o.data(), l.data());
      for (int i = 0; i < kHq * kD; ++i) err = std::max(err, std::abs(o[i] - r.out[row * kHq * kD + i]));
      for (int h = 0; h < kHq; ++h) err = std::max(err, std::abs(l[h] - r.lse[row * kHq + h]));
      ++row;
    }
  return err;
}

std::vector<int> Range(int b, int e) {
  std::vector<int> v;
  for (int i = b; i < e; ++i) v.push_back(i);
  return v;
}

TEST(StarCpu, OneShardChunkedPrefillAndDecodeMatchThePaper) {
  std::mt19937 rng(7);
  struct Shape { int n, bsz, a, page, total; };
  for (const Shape s : {Shape{200, 64, 64, 16, 230}, Shape{203, 48, 17, 8, 240}, Shape{97, 32, 5, 16, 120},
                        Shape{64, 64, 64, 16, 80}, Shape{150, 40, 40, 16, 151}}) {
    SCOPED_TRACE(fmt::format("n={} block={} anchor={} page={}", s.n, s.bsz, s.a, s.page));
    std::vector<Doc> docs;
    docs.push_back(MakeDoc(s.total, rng));
    docs.push_back(MakeDoc(s.total, rng));
    std::vector<const Doc*> dp{&docs[0], &docs[1]};
    const ShardCache sc = MakeCache(dp, {Range(0, s.total), Range(0, s.total)}, s.page, rng);
    const StarConfig cfg{s.bsz, s.a, 1, 0, 0};
    // Chunks of odd sizes (off block boundaries, one crossing the context boundary), ragged with a
    // second sequence at another chunk size, then decodes.
    std::vector<int> cuts0{0}, cuts1{0};
    for (int p = 0; p < s.total;) p = std::min(s.total, p + 37), cuts0.push_back(p);
    for (int p = 0; p < s.total;) p = std::min(s.total, p + 23 + int(rng() % 40)), cuts1.push_back(p);
    for (size_t i = 0; i + 1 < std::max(cuts0.size(), cuts1.size()); ++i) {
      std::vector<Entry> step;
      if (i + 1 < cuts0.size()) step.push_back({0, cuts0[i + 1], s.n, Range(cuts0[i], cuts0[i + 1])});
      if (i + 1 < cuts1.size()) step.push_back({1, cuts1[i + 1], s.n, Range(cuts1[i], cuts1[i + 1])});
      const StepResult r = RunStar(cfg, sc, step, dp, false);
      EXPECT_LT(StepError(r, step, dp, s.bsz, s.a), 2e-5) << "step " << i;
    }
  }
}

TEST(StarCpu, BlocksRecomputedAloneOverALongerCacheAndSharedAnchorPages) {
  // Prefix reuse: a Star block depends only on the anchor and itself, so a block whose neighbours
  // come from the prefix cache is computed with the cache truncated after it; two documents share
  // the anchor's physical pages.
  std::mt19937 rng(11);
  const int n = 256, bsz = 64, a = 32, page = 16;
  std::vector<Doc> docs;
  docs.push_back(MakeDoc(n + 8, rng));
  docs.push_back(MakeDoc(n + 8, rng));
  for (int i = 0; i < a * kHkv * kD; ++i) docs[1].k[i] = docs[0].k[i], docs[1].v[i] = docs[0].v[i];
  std::vector<const Doc*> dp{&docs[0], &docs[1]};
  ShardCache sc = MakeCache(dp, {Range(0, n + 8), Range(0, n + 8)}, page, rng);
  for (int j = 0; j < a / page; ++j) sc.pages[1][j] = sc.pages[0][j];  // the same anchor pages
  const StarConfig cfg{bsz, a, 1, 0, 0};
  std::vector<Entry> step{{0, 3 * bsz, n, Range(2 * bsz, 3 * bsz)}, {1, 2 * bsz, n, Range(bsz, 2 * bsz)},
                          {1, 4 * bsz, n, Range(3 * bsz + 5, 4 * bsz)}, {0, n + 8, n, Range(n, n + 8)}};
  const StepResult r = RunStar(cfg, sc, step, dp, false);
  EXPECT_LT(StepError(r, step, dp, bsz, a), 2e-5);
}

TEST(StarCpu, BlockCoveringTheContextEqualsDense) {
  std::mt19937 rng(3);
  const int total = 150, n = 120, page = 16;
  std::vector<Doc> docs;
  docs.push_back(MakeDoc(total, rng));
  std::vector<const Doc*> dp{&docs[0]};
  const ShardCache sc = MakeCache(dp, {Range(0, total)}, page, rng);
  std::vector<Entry> step{{0, 100, n, Range(0, 100)}};
  std::vector<Entry> step2{{0, total, n, Range(100, total)}};
  for (const auto& st : {step, step2}) {
    const StepResult star = RunStar(StarConfig{128, 64, 1, 0, 0}, sc, st, dp, false);
    // Dense reference: the same tokens with no context marker (all phase 2).
    std::vector<Entry> as_query = st;
    for (auto& e : as_query) e.n = 0;
    const StepResult dense = RunStar(StarConfig{128, 64, 1, 0, 0}, sc, as_query, dp, false);
    ASSERT_EQ(star.out.size(), dense.out.size());
    for (size_t i = 0; i < star.out.size(); ++i) EXPECT_NEAR(star.out[i], dense.out[i], 1e-6);
    EXPECT_LT(StepError(star, as_query, dp, 128, 64), 2e-5);
  }
}

// Shard r's local layout of a document (context n, blocks bsz, anchor a), as the config documents.
std::vector<int> ShardLayout(int n, int bsz, int a, int shards, int r, bool anchor, int query_keys, int appender) {
  std::vector<int> l;
  if (r != 0 && anchor) l = Range(0, std::min(a, n));
  for (int k = r; k * bsz < n; k += shards) {
    const auto blk = Range(k * bsz, std::min(n, (k + 1) * bsz));
    l.insert(l.end(), blk.begin(), blk.end());
  }
  if (r == appender)
    for (int i = 0; i < query_keys; ++i) l.push_back(n + i);
  return l;
}

TEST(StarCpu, ShardsPhaseOneMatchesAndPhaseTwoMergesToOneShard) {
  std::mt19937 rng(5);
  const int n = 300, bsz = 40, a = 24, page = 8, q = 9;
  std::vector<Doc> docs;
  docs.push_back(MakeDoc(n + q, rng));
  docs.push_back(MakeDoc(n + q, rng));
  std::vector<const Doc*> dp{&docs[0], &docs[1]};
  for (int shards : {1, 2, 3, 8}) {
    SCOPED_TRACE(fmt::format("{} shards", shards));
    const int appender = shards - 1;
    std::vector<StepResult> partials;
    for (int r = 0; r < shards; ++r) {
      const StarConfig cfg{bsz, a, shards, r, appender};
      // Phase 1: the shard encodes the anchor (r != 0) and its blocks, in two chunks.
      std::vector<std::vector<int>> p1{ShardLayout(n, bsz, a, shards, r, true, 0, -1),
                                       ShardLayout(n, bsz, a, shards, r, true, 0, -1)};
      const ShardCache c1 = MakeCache(dp, p1, page, rng);
      const int len = int(p1[0].size()), half = len / 2 + 3;
      if (shards > 1) {
        std::vector<Entry> chunk_a{{0, half, n, {p1[0].begin(), p1[0].begin() + half}, p1[0][0]},
                                   {1, len, n, p1[1], p1[1][0]}};
        std::vector<Entry> chunk_b{{0, len, n, {p1[0].begin() + half, p1[0].end()}, p1[0][half]}};
        for (const auto& st : {chunk_a, chunk_b}) {
          const StepResult r1 = RunStar(cfg, c1, st, dp, true);
          EXPECT_LT(StepError(r1, st, dp, bsz, a), 2e-5) << "rank " << r;
        }
      }
      // Phase 2: the anchor dropped on r != 0; the query's K/V on the appending shard only.
      std::vector<std::vector<int>> p2{ShardLayout(n, bsz, a, shards, r, false, q, appender),
                                       ShardLayout(n, bsz, a, shards, r, false, 2, appender)};
      const ShardCache c2 = MakeCache(dp, p2, page, rng);
      std::vector<Entry> st{{0, int(p2[0].size()), n, Range(n, n + q), n}, {1, int(p2[1].size()), n, {n + 1}, n + 1}};
      partials.push_back(RunStar(cfg, c2, st, dp, shards > 1));
    }
    // Merge the shards' partials exactly and compare with the reference (= one shard).
    const int t = q + 1, s = shards;
    std::vector<float> po(size_t(s) * t * kHq * kD), pl(size_t(s) * t * kHq), out(size_t(t) * kHq * kD), lse(t * kHq);
    for (int r = 0; r < s; ++r) {
      std::copy(partials[r].out.begin(), partials[r].out.end(), po.begin() + size_t(r) * t * kHq * kD);
      std::copy(partials[r].lse.begin(), partials[r].lse.end(), pl.begin() + size_t(r) * t * kHq);
    }
    TensorView pov = View(po.data(), DType::kF32, {s, t, kHq, kD}), plv = View(pl.data(), DType::kF32, {s, t, kHq});
    TensorView ov = View(out.data(), DType::kF32, {t, kHq, kD}), lv = View(lse.data(), DType::kF32, {t, kHq});
    MergeStatesArgs m{&pov, &plv, nullptr, &ov, &lv, nullptr};
    ThreadPool pool(1);
    ASSERT_TRUE(ValidateMergeStates(m).ok()) << ValidateMergeStates(m);
    MergeStatesCpu(m, &pool);
    StepResult merged{out, lse};
    std::vector<Entry> st{{0, 0, n, Range(n, n + q)}, {1, 0, n, {n + 1}}};
    EXPECT_LT(StepError(merged, st, dp, bsz, a), 2e-5);
  }
}

TEST(StarCpu, EmptyShardGivesAnEmptyPartial) {
  // 8 shards over a 3-block context: shards 3..6 hold nothing of it and do not append.
  std::mt19937 rng(9);
  const int n = 90, bsz = 32, a = 32, page = 8;
  std::vector<Doc> docs;
  docs.push_back(MakeDoc(n + 1, rng));
  std::vector<const Doc*> dp{&docs[0]};
  const ShardCache c = MakeCache(dp, {{}}, page, rng);
  const std::vector<Entry> step{{0, 0, n, {n}, n}};
  const StepResult r = RunStar(StarConfig{bsz, a, 8, 4, 7}, c, step, dp, true);
  for (float x : r.out) EXPECT_EQ(x, 0.f);
  for (float x : r.lse) EXPECT_EQ(x, -std::numeric_limits<float>::infinity());
}

TEST(StarCpu, BadLayoutsAreRejectedWithTheirValues) {
  std::mt19937 rng(2);
  const int n = 100, bsz = 32, a = 16, page = 8;
  std::vector<Doc> docs;
  docs.push_back(MakeDoc(n + 4, rng));
  std::vector<const Doc*> dp{&docs[0]};
  const ShardCache c = MakeCache(dp, {Range(0, n + 4)}, page, rng);
  absl::Status s;
  // Shards need explicit positions.
  RunStar(StarConfig{bsz, a, 2, 1, 1}, c, {{0, 20, n, Range(0, 20)}}, dp, false, &s);
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_NE(s.message().find("query_pos_starts"), std::string::npos) << s;
  // A non-appending shard holding more than its context.
  RunStar(StarConfig{bsz, a, 2, 0, 1}, c, {{0, n + 4, n, {n}, n}}, dp, true, &s);
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_NE(s.message().find("seq_lens=104"), std::string::npos) << s;
  // One shard: positions must be the cache's last.
  RunStar(StarConfig{bsz, a, 1, 0, 0}, c, {{0, 50, n, Range(40, 50), 41}}, dp, true, &s);
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_NE(s.message().find("query_pos_starts=41"), std::string::npos) << s;
  // Config checks.
  HeadConfig heads{kHq, kHkv, kD, DType::kF32, 0.125f};
  ExecContext exec;
  EXPECT_FALSE(CreateBackend(*FindBackend("star"), heads, StarConfig{16, 32, 1, 0, 0}, exec).ok());
  EXPECT_FALSE(CreateBackend(*FindBackend("star"), heads, StarConfig{16, 8, 2, 2, 1}, exec).ok());
  EXPECT_FALSE(CreateBackend(*FindBackend("star"), heads, DenseConfig{}, exec).ok());
}

TEST(StarCpu, OwnedContextCountsRoundRobinBlocks) {
  const star::StarPlanner p0(StarConfig{10, 5, 3, 0, 2}), p2(StarConfig{10, 5, 3, 2, 2});
  EXPECT_EQ(p0.OwnedContext(0), 0);
  EXPECT_EQ(p0.OwnedContext(35), 15);  // blocks 0, 3 (half)
  EXPECT_EQ(p0.OwnedContext(31), 11);
  EXPECT_EQ(p2.OwnedContext(35), 10);  // block 2
  EXPECT_EQ(p2.OwnedContext(20), 0);
  EXPECT_EQ(p2.OwnedContext(61), 20);  // blocks 2, 5
}

}  // namespace
}  // namespace kvplug::attn
