// Attamba (`attamba`) on the CPU against a straightforward reference.
//  - Attention: every layer's full-length K/V, a dense boolean mask written from the paper's rule
//    (key k seen by query t iff (k < t and k is a chunk end) or t - L <= k <= t, chunk ends {0} and
//    j P + P - 1 - off_l), full probabilities in double. The backend sees only the compressed cache
//    (chunk-end rows + the window's token pages, older token pages freed and reused), through ragged
//    batches of prefill, chunked prefill split at and off chunk ends, decode across chunk ends,
//    forks (full pages shared, partial ones copied) and prefix-cache hits (shared pages, the
//    recompute rule, context_lens rows never rewritten); P in {1, 4, 8, 64}, L in {0, 1, 8, 64},
//    cyclic and uniform offsets, several layers; P = 1 with a full window equals dense.
//  - The SSM: a sequential double-precision Mamba-2 block with explicit resets at chunk starts
//    against kvplug's, over the same step shapes, forks (state copied) and conv widths 1-4.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <set>
#include <tuple>

#include "common/tensor_views.h"
#include "fmt/format.h"
#include "kvplug/attention/attamba/attamba.h"
#include "kvplug/attention/backend.h"
#include "kvplug/attention/step_work.h"

namespace kvplug::attn {
namespace {

using ::kvplug::testing::View;
using attamba::ChunkGeometry;
using attamba::Layout;
using attamba::SsmShape;

constexpr int kHq = 4, kHkv = 2, kD = 32;

// The chunk ends of a layer, from the definition (not from the backend's arithmetic).
std::set<int> ChunkEnds(int P, int off, int n) {
  std::set<int> ends{0};
  for (int j = 0; j * P + P - 1 - off < n; ++j) ends.insert(j * P + P - 1 - off);
  return ends;
}

int Offset(const AttambaConfig& c, int layer) {
  return c.chunk_offsets == ChunkOffsets::kUniform ? 0 : std::min(c.chunk_size - 1, layer * (c.chunk_size / c.num_layers));
}

struct Doc {
  int len = 0;
  std::vector<std::vector<float>> k, v, q;  // per layer: [len][H][D]
  std::vector<int32_t> compressed;          // compressed pages
  std::map<int, int32_t> token_pages;       // token page index -> physical page
  std::map<int, int32_t> retired;           // token pages dropped from the list, still cached
};

struct Entry {
  int doc, from, to;
  int cached_rows = 0;    // context_lens: compressed rows held in shared pages
  int unstored_to = -1;   // positions < this write nothing to the window (shared token pages)
  int bad_slot = 0;       // added to the last token's slot (a wrong slot)
  int seq_len_delta = 0;  // added to seq_lens (a wrong layout)
};

class World {
 public:
  World(AttambaConfig cfg, int num_layers, int bs, DType dtype = DType::kF32, int num_blocks = 400, uint32_t seed = 3)
      : cfg_(cfg), layers_(num_layers), bs_(bs), rng_(seed) {
    heads_ = HeadConfig{kHq, kHkv, kD, dtype, 1.0f / std::sqrt(float(kD))};
    for (int l = 0; l < num_layers; ++l) {
      AttambaConfig c = cfg;
      c.layer_index = l;
      c.num_layers = num_layers;
      auto b = CreateBackend(*FindBackend("attamba"), heads_, BackendConfig{c}, exec_);
      EXPECT_TRUE(b.ok()) << b.status();
      backends_.push_back(std::move(*b));
    }
    kv::KvCacheOptions o;
    o.num_layers = num_layers;
    o.num_blocks = num_blocks;
    o.block_size = bs;
    o.num_kv_heads = kHkv;
    o.head_size = kD;
    o.dtype = dtype;
    cache_ = std::move(*kv::KvCache::Create(o));
    for (int i = 0; i < num_blocks; ++i) free_.push_back(i);
    std::shuffle(free_.begin(), free_.end(), rng_);
    // Garbage everywhere: only rows the backend wrote may be read.
    for (int l = 0; l < num_layers; ++l)
      for (int b = 0; b < num_blocks; ++b)
        for (int s = 0; s < bs; ++s)
          for (int h = 0; h < kHkv; ++h)
            for (int kv = 0; kv < 2; ++kv)
              for (int x = 0; x < kD; ++x) StoreFromFloat(cache_->layer(l).Row(kv, b, s, h), dtype, x, 1e4f);
  }

  int AddDoc(int len) {
    std::normal_distribution<float> normal;
    Doc d;
    d.len = len;
    for (int l = 0; l < layers_; ++l) {
      d.k.emplace_back(size_t(len) * kHkv * kD);
      d.v.emplace_back(size_t(len) * kHkv * kD);
      d.q.emplace_back(size_t(len) * kHq * kD);
      for (auto* x : {&d.k[l], &d.v[l], &d.q[l]})
        for (float& f : *x) f = normal(rng_);
    }
    docs_.push_back(std::move(d));
    return int(docs_.size()) - 1;
  }
  // A doc sharing doc src's first `shared` positions (every layer's K/V/Q: the same tokens).
  int AddDerived(int src, int shared, int len) {
    const int id = AddDoc(len);
    for (int l = 0; l < layers_; ++l) {
      std::copy_n(docs_[src].k[l].begin(), size_t(shared) * kHkv * kD, docs_[id].k[l].begin());
      std::copy_n(docs_[src].v[l].begin(), size_t(shared) * kHkv * kD, docs_[id].v[l].begin());
      std::copy_n(docs_[src].q[l].begin(), size_t(shared) * kHq * kD, docs_[id].q[l].begin());
    }
    return id;
  }
  Doc& doc(int i) { return docs_[i]; }
  int pages_in_use() const { return cache_->options().num_blocks - int(free_.size()); }

  // Child of `parent` at its current length c: full pages (immutable) shared, partial ones copied.
  // The child's tokens continue differently from position c on.
  int Fork(int parent, int c, int len) {
    const int id = AddDerived(parent, c, len);
    Doc& p = docs_[parent];
    Doc& d = docs_[id];
    const CacheLayout lay = backends_[0]->Layout(bs_, c, c);
    for (size_t i = 0; i < p.compressed.size(); ++i) {
      if (int64_t(i + 1) * bs_ <= lay.stable_rows) {
        d.compressed.push_back(p.compressed[i]);
        ++refs_[p.compressed[i]];
      } else {
        d.compressed.push_back(CopyPage(p.compressed[i]));
      }
    }
    for (const auto& [j, page] : p.token_pages) {
      if ((j + 1) * bs_ <= c) {
        d.token_pages[j] = page;
        ++refs_[page];
      } else {
        d.token_pages[j] = CopyPage(page);
      }
    }
    return id;
  }

  // A prefix-cache hit: `src` computed its first c tokens (c a multiple of the page size); the new
  // doc shares its full stable compressed pages and its full token pages, and resumes at the
  // position the recompute rule gives. Returns {doc, resume position, cached rows}.
  std::tuple<int, int, int> Hit(int src, int c, int len) {
    const int id = AddDerived(src, c, len);
    Doc& s = docs_[src];
    Doc& d = docs_[id];
    const CacheLayout lay = backends_[0]->Layout(bs_, c, c);
    const int k = lay.stable_rows / bs_;
    for (int i = 0; i < k; ++i) {
      d.compressed.push_back(s.compressed[i]);
      ++refs_[s.compressed[i]];
    }
    // Resume where every layer's chunk state starts over (the SSM) and every chunk end before it is
    // in a shared compressed row.
    int r = c;
    for (int l = 0; l < layers_; ++l) {
      const int off = Offset(Cfg(l), l);
      const ChunkGeometry g{cfg_.chunk_size, off};
      r = std::min<int>(r, int(g.ChunkStart(c)));
    }
    auto covered = [&](int pos) {
      for (int l = 0; l < layers_; ++l)
        if (ChunkGeometry{cfg_.chunk_size, Offset(Cfg(l), l)}.EndsBefore(pos) > int64_t(k) * bs_) return false;
      return true;
    };
    while (r > 0 && !covered(r)) --r;
    // The window of the recomputed tokens reaches back to r - L: those token pages are shared.
    for (int j = std::max(0, r - cfg_.window) / bs_; j < c / bs_; ++j) {
      const int32_t page = s.token_pages.count(j) ? s.token_pages.at(j) : s.retired.at(j);
      d.token_pages[j] = page;
      ++refs_[page];
    }
    return {id, r, k * bs_};
  }

  // The plan of one step (pages taken and released as the layouts say); its Update status in *status.
  std::unique_ptr<BatchPlan> MakePlan(const std::vector<Entry>& entries, absl::Status* status) {
    std::vector<int32_t> qsl{0}, lens, indptr{0}, indices, p0s, cached;
    std::vector<int64_t> slots;
    for (const Entry& e : entries) {
      Doc& d = docs_[e.doc];
      const CacheLayout lay = backends_[0]->Layout(bs_, e.to, e.from);
      // Token pages the window no longer reaches go back to the pool (and are reused by others).
      for (auto it = d.token_pages.begin(); it != d.token_pages.end();) {
        if (it->first < lay.window_first_page) {
          // A prefix cache keeps freed full pages until it evicts them: kept here (their reference
          // held) so that later hits find them; the pool reuses every other page.
          if (keep_freed_) d.retired[it->first] = it->second;
          else Release(it->second);
          it = d.token_pages.erase(it);
        } else {
          ++it;
        }
      }
      while (int(d.compressed.size()) < lay.compressed_pages) d.compressed.push_back(Take());
      for (int j = lay.window_first_page; j < lay.window_first_page + lay.window_pages; ++j)
        if (!d.token_pages.count(j)) d.token_pages[j] = Take();
      for (int i = 0; i < lay.compressed_pages; ++i) indices.push_back(d.compressed[i]);
      for (int j = lay.window_first_page; j < lay.window_first_page + lay.window_pages; ++j)
        indices.push_back(d.token_pages[j]);
      indptr.push_back(int32_t(indices.size()));
      qsl.push_back(qsl.back() + e.to - e.from);
      lens.push_back(lay.seq_len + e.seq_len_delta);
      p0s.push_back(e.from);
      cached.push_back(e.cached_rows);
      for (int p = e.from; p < e.to; ++p)
        slots.push_back(p < e.unstored_to ? -1
                                          : int64_t{d.token_pages[p / bs_]} * bs_ + p % bs_ + (p == e.to - 1 ? e.bad_slot : 0));
    }
    const int T = qsl.back(), n = int(entries.size());
    auto plan = std::make_unique<BatchPlan>(PlanCapacity{n, std::max(T, 1), std::max<int>(int(indices.size()), 1)});
    BatchInput in;
    in.num_seqs = n;
    in.block_size = bs_;
    in.query_start_loc = qsl.data();
    in.seq_lens = lens.data();
    in.kv_indptr = indptr.data();
    in.kv_indices = indices.data();
    in.slot_mapping = slots.data();
    in.query_pos_starts = p0s.data();
    in.context_lens = cached.data();
    *status = plan->Update(in);
    return plan;
  }

  // The step's compressed write slots from layer l's planner: the plan step's BuildWriteSlots, which
  // on CUDA runs once per step in kvp_plan_update and there also checks the slot_mapping against the
  // window slots (the CPU write checks it itself).
  absl::Status PlannerWriteSlots(const std::vector<Entry>& entries, int l, std::vector<int64_t>* slots) {
    absl::Status s;
    std::unique_ptr<BatchPlan> plan = MakePlan(entries, &s);
    if (!s.ok()) return s;
    slots->assign(size_t(plan->num_tokens()), -7);
    return backends_[l]->planner()->BuildWriteSlots(*plan, absl::MakeSpan(*slots));
  }

  // One step (write + attention on every layer); returns the max error against the reference.
  double Step(const std::vector<Entry>& entries, absl::Status* status = nullptr) {
    absl::Status s;
    std::unique_ptr<BatchPlan> owned = MakePlan(entries, &s);
    const BatchPlan& plan = *owned;
    const int T = plan.num_tokens();
    double err = 0;
    StepWorkSet steps;
    for (int l = 0; l < layers_ && s.ok(); ++l) {
      std::vector<float> k, v, q;
      for (const Entry& e : entries) {
        const Doc& d = docs_[e.doc];
        k.insert(k.end(), d.k[l].begin() + size_t(e.from) * kHkv * kD, d.k[l].begin() + size_t(e.to) * kHkv * kD);
        v.insert(v.end(), d.v[l].begin() + size_t(e.from) * kHkv * kD, d.v[l].begin() + size_t(e.to) * kHkv * kD);
        q.insert(q.end(), d.q[l].begin() + size_t(e.from) * kHq * kD, d.q[l].begin() + size_t(e.to) * kHq * kD);
      }
      TensorView kt = View(k.data(), DType::kF32, {T, kHkv, kD}), vt = View(v.data(), DType::kF32, {T, kHkv, kD});
      const WriteArgs w{plan, *cache_, l, kt, vt, exec_};
      s = ValidateWrite(heads_, w);
      if (s.ok()) s = backends_[l]->WriteKv(w);
      if (!s.ok()) break;
      auto got = steps.Get(StepKey(*backends_[l], heads_), *backends_[l], heads_, plan, exec_);
      if (!got.ok()) {
        s = got.status();
        break;
      }
      std::vector<float> out(q.size(), -7.f), lse(size_t(T) * kHq, -7.f);
      TensorView qv = View(q.data(), DType::kF32, {T, kHq, kD}), ov = View(out.data(), DType::kF32, {T, kHq, kD});
      TensorView lv = View(lse.data(), DType::kF32, {T, kHq});
      RunArgs args{plan, **got, *cache_, l, qv, {&ov, &lv, nullptr}, exec_};
      s = ValidateRun(heads_, args);
      if (s.ok()) s = backends_[l]->Run(args);
      if (!s.ok()) break;
      size_t row = 0;
      for (const Entry& e : entries) {
        for (int t = e.from; t < e.to; ++t, ++row) err = std::max(err, RowError(e.doc, l, t, &out[row * kHq * kD], &lse[row * kHq]));
      }
    }
    if (status) *status = s;
    else EXPECT_TRUE(s.ok()) << s;
    return s.ok() ? err : INFINITY;
  }

  // The reference output of query t of doc d at layer l, against what the backend gave.
  double RowError(int di, int l, int t, const float* out, const float* lse) const {
    const Doc& d = docs_[di];
    const std::set<int> ends = ChunkEnds(cfg_.chunk_size, Offset(Cfg(l), l), t + 1);
    const int group = kHq / kHkv;
    double err = 0;
    for (int h = 0; h < kHq; ++h) {
      const int g = h / group;
      std::vector<double> logits(size_t(t) + 1, -INFINITY);
      double m = -INFINITY;
      for (int k = 0; k <= t; ++k) {
        const bool seen = (k < t && ends.count(k)) || (t - cfg_.window <= k);
        if (!seen) continue;
        double dot = 0;
        for (int x = 0; x < kD; ++x)
          dot += double(d.q[l][(size_t(t) * kHq + h) * kD + x]) * d.k[l][(size_t(k) * kHkv + g) * kD + x];
        logits[k] = dot / std::sqrt(double(kD));
        m = std::max(m, logits[k]);
      }
      double sum = 0;
      for (int k = 0; k <= t; ++k) sum += std::exp(logits[k] - m);
      for (int x = 0; x < kD; ++x) {
        double o = 0;
        for (int k = 0; k <= t; ++k) o += std::exp(logits[k] - m) / sum * d.v[l][(size_t(k) * kHkv + g) * kD + x];
        err = std::max(err, std::abs(o - out[h * kD + x]));
      }
      err = std::max(err, std::abs(m + std::log(sum) - lse[h]));
    }
    return err;
  }

  const AttentionBackend& backend(int l) const { return *backends_[l]; }
  void set_keep_freed(bool v) { keep_freed_ = v; }

 private:
  AttambaConfig Cfg(int l) const {
    AttambaConfig c = cfg_;
    c.layer_index = l;
    c.num_layers = layers_;
    return c;
  }
  int32_t Take() {
    EXPECT_FALSE(free_.empty()) << "test pool exhausted";
    const int32_t p = free_.back();
    free_.pop_back();
    refs_[p] = 1;
    return p;
  }
  void Release(int32_t p) {
    if (--refs_[p] == 0) free_.push_back(p);
  }
  int32_t CopyPage(int32_t src) {
    const int32_t dst = Take();
    for (int l = 0; l < layers_; ++l)
      for (int s = 0; s < bs_; ++s)
        for (int h = 0; h < kHkv; ++h)
          for (int kv = 0; kv < 2; ++kv)
            std::memcpy(cache_->layer(l).Row(kv, dst, s, h), cache_->layer(l).Row(kv, src, s, h),
                        size_t(kD) * DTypeSize(cache_->layer(l).dtype));
    return dst;
  }

  AttambaConfig cfg_;
  int layers_, bs_;
  std::mt19937 rng_;
  HeadConfig heads_;
  ThreadPool pool_{2};
  ExecContext exec_{Device::kCpu, 0, &pool_};
  std::vector<std::unique_ptr<AttentionBackend>> backends_;
  std::unique_ptr<kv::KvCache> cache_;
  std::vector<int32_t> free_;
  std::map<int32_t, int> refs_;
  std::vector<Doc> docs_;
  bool keep_freed_ = false;
};

AttambaConfig Config(int P, int L, ChunkOffsets offsets = ChunkOffsets::kCyclic) {
  AttambaConfig c;
  c.chunk_size = P;
  c.window = L;
  c.chunk_offsets = offsets;
  return c;
}

constexpr double kTol = 2e-5;

TEST(AttambaGeometry, MatchesTheDefinition) {
  for (int P : {1, 2, 4, 7, 8, 64})
    for (int off = 0; off < P; ++off) {
      const ChunkGeometry g{P, off};
      const std::set<int> ends = ChunkEnds(P, off, 400);
      int count = 0, start = 0;
      for (int p = 0; p < 300; ++p) {
        ASSERT_EQ(g.IsChunkEnd(p), ends.count(p) == 1) << "P " << P << " off " << off << " p " << p;
        ASSERT_EQ(g.EndsBefore(p), count) << "P " << P << " off " << off << " p " << p;
        ASSERT_EQ(g.ChunkStart(p), start) << "P " << P << " off " << off << " p " << p;
        const int next = *ends.lower_bound(p);
        if (next < 290) {
          ASSERT_EQ(g.NextEnd(p), next) << "P " << P << " off " << off << " p " << p;
        }
        if (ends.count(p)) ++count, start = p + 1;
      }
    }
}

TEST(AttambaGeometry, CyclicOffsetsFollowTheReference) {
  AttambaConfig c = Config(8, 0);
  c.num_layers = 4;
  EXPECT_EQ(ChunkGeometry::Offset(c, 0), 0);
  EXPECT_EQ(ChunkGeometry::Offset(c, 1), 2);
  EXPECT_EQ(ChunkGeometry::Offset(c, 3), 6);
  c.num_layers = 16;  // P // n_layers = 0
  EXPECT_EQ(ChunkGeometry::Offset(c, 15), 0);
  c.num_layers = 2;
  c.chunk_size = 3;  // min(P - 1, l * 1)
  EXPECT_EQ(ChunkGeometry::Offset(c, 1), 1);
  c.chunk_offsets = ChunkOffsets::kUniform;
  EXPECT_EQ(ChunkGeometry::Offset(c, 1), 0);
}

TEST(AttambaLayout, RowsAndPagesShrinkByTheChunkSize) {
  AttambaConfig c = Config(8, 64);
  c.num_layers = 4;
  const CacheLayout l = Layout(c, 16, 32768, 32767);
  // 4096 or 4097 chunk ends per layer (position 0 plus one per chunk).
  EXPECT_GE(l.compressed_rows, 4096);
  EXPECT_LE(l.compressed_rows, 4097);
  EXPECT_EQ(l.compressed_pages, (l.compressed_rows + 15) / 16);
  EXPECT_EQ(l.window_first_page, (32767 - 64) / 16);
  EXPECT_EQ(l.window_pages, 2048 - l.window_first_page);
  EXPECT_EQ(l.num_pages, l.compressed_pages + l.window_pages);
  EXPECT_EQ(l.seq_len, l.compressed_pages * 16 + 32768 - l.window_first_page * 16);
  EXPECT_LE(l.stable_rows, l.compressed_rows);
  EXPECT_LT(l.num_pages, 2048 / 7);
}

struct Sweep {
  int P, L, layers, bs;
  ChunkOffsets offsets;
};

class AttambaSweep : public ::testing::TestWithParam<Sweep> {};

// Ragged batches: a long prefill in uneven chunks (some ending on chunk ends, some not), short
// docs prefilled at once, then decode steps across chunk ends, several docs per step.
TEST_P(AttambaSweep, PrefillChunkedPrefillAndDecodeMatchTheReference) {
  const Sweep sw = GetParam();
  World w(Config(sw.P, sw.L, sw.offsets), sw.layers, sw.bs);
  const int a = w.AddDoc(150), b = w.AddDoc(90), c = w.AddDoc(60);
  // Steps split at a chunk end (P - 1 - off... position 0 always) and off them.
  EXPECT_LT(w.Step({{a, 0, 1}, {c, 0, 40}}), kTol);               // a's one-token first chunk
  EXPECT_LT(w.Step({{a, 1, sw.P + 1}, {b, 0, 33}}), kTol);        // to a chunk boundary of layer 0 (uniform)
  EXPECT_LT(w.Step({{b, 33, 77}, {a, sw.P + 1, 70}}), kTol);      // off boundaries
  EXPECT_LT(w.Step({{a, 70, 100}}), kTol);
  for (int step = 0; step < 24; ++step) {
    std::vector<Entry> e{{a, 100 + step, 101 + step}, {b, 77 + step / 2, 78 + step / 2}};
    if (step % 2) e.pop_back();
    if (step < 8) e.push_back({c, 40 + step, 41 + step});
    EXPECT_LT(w.Step(e), kTol) << "decode step " << step;
  }
  // Memory stays compressed: the page pool holds about n/P + L + one page per doc and layer list.
  const CacheLayout lay = w.backend(0).Layout(sw.bs, 124, 123);
  EXPECT_LE(lay.num_pages, (124 / sw.P + 2) / sw.bs + 2 + (sw.L + 2 * sw.bs) / sw.bs);
}

TEST_P(AttambaSweep, ForksContinueIndependently) {
  const Sweep sw = GetParam();
  World w(Config(sw.P, sw.L, sw.offsets), sw.layers, sw.bs, DType::kF32, 400, 11);
  const int a = w.AddDoc(120);
  EXPECT_LT(w.Step({{a, 0, 37}}), kTol);
  const int child = w.Fork(a, 37, 120);
  EXPECT_LT(w.Step({{a, 37, 60}, {child, 37, 51}}), kTol);
  for (int s = 0; s < 10; ++s) EXPECT_LT(w.Step({{child, 51 + s, 52 + s}, {a, 60 + s, 61 + s}}), kTol);
}

TEST_P(AttambaSweep, PrefixCacheHitsResumeThroughTheRecomputeRule) {
  const Sweep sw = GetParam();
  World w(Config(sw.P, sw.L, sw.offsets), sw.layers, sw.bs, DType::kF32, 400, 17);
  w.set_keep_freed(true);
  const int src = w.AddDoc(140);
  EXPECT_LT(w.Step({{src, 0, 100}}), kTol);
  int src_len = 100;
  for (int c : {sw.bs * 2, (96 / sw.bs) * sw.bs}) {
    auto [id, r, rows] = w.Hit(src, c, 140);
    // Tokens [r, c) are recomputed over shared token pages (nothing stored); rows < `rows` are held.
    Entry e{id, r, c + 5, rows, c};
    EXPECT_LT(w.Step({e}), kTol) << "hit at " << c << " resumed at " << r;
    EXPECT_LT(w.Step({{id, c + 5, c + 6}}), kTol);
    // The source still reads its own pages intact.
    EXPECT_LT(w.Step({{src, src_len, src_len + 1}}), kTol);
    ++src_len;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, AttambaSweep,
    ::testing::Values(Sweep{1, 0, 1, 4, ChunkOffsets::kCyclic}, Sweep{4, 0, 3, 4, ChunkOffsets::kCyclic},
                      Sweep{4, 1, 2, 8, ChunkOffsets::kCyclic}, Sweep{8, 8, 4, 4, ChunkOffsets::kCyclic},
                      Sweep{8, 8, 2, 16, ChunkOffsets::kUniform}, Sweep{64, 8, 3, 8, ChunkOffsets::kCyclic},
                      Sweep{4, 64, 2, 4, ChunkOffsets::kUniform}, Sweep{64, 64, 2, 16, ChunkOffsets::kCyclic},
                      Sweep{8, 1, 1, 4, ChunkOffsets::kCyclic}),
    [](const auto& info) {
      const Sweep& s = info.param;
      return "P" + std::to_string(s.P) + "_L" + std::to_string(s.L) + "_layers" + std::to_string(s.layers) + "_bs" +
             std::to_string(s.bs) + (s.offsets == ChunkOffsets::kUniform ? "_uniform" : "_cyclic");
    });

// P = 1 keeps every token as a chunk end: with any window it is dense causal attention over the
// (SSM) keys, and the backend must agree with dense on the same K/V.
TEST(Attamba, ChunkSizeOneIsDenseAttention) {
  World w(Config(1, 3), 1, 4);
  const int a = w.AddDoc(50);
  EXPECT_LT(w.Step({{a, 0, 20}}), kTol);
  for (int s = 20; s < 30; ++s) EXPECT_LT(w.Step({{a, s, s + 1}}), kTol);
  // The layout is dense's plus nothing but the page alignment.
  const CacheLayout l = w.backend(0).Layout(4, 30, 29);
  EXPECT_EQ(l.compressed_rows, 30);
}

TEST(Attamba, BfloatCachesMatchWithinRounding) {
  World w(Config(4, 8), 2, 8, DType::kBF16);
  const int a = w.AddDoc(80);
  EXPECT_LT(w.Step({{a, 0, 45}}), 3e-2);
  for (int s = 45; s < 55; ++s) EXPECT_LT(w.Step({{a, s, s + 1}}), 3e-2);
}

TEST(Attamba, BadBatchesAreRefusedWithTheExpectedValues) {
  World w(Config(4, 2), 1, 4);
  const int a = w.AddDoc(40);
  EXPECT_LT(w.Step({{a, 0, 10}}), kTol);
  absl::Status s;
  Entry wrong_slot{a, 10, 12};
  wrong_slot.bad_slot = 1;
  w.Step({wrong_slot}, &s);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("has window slot"), std::string::npos) << s;
  Entry wrong_len{a, 10, 12};
  wrong_len.seq_len_delta = -1;  // a row short of the layout: the plan accepts it, attamba does not
  w.Step({wrong_len}, &s);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("need seq_lens ="), std::string::npos) << s;
  // The refused steps changed nothing the next step reads.
  EXPECT_LT(w.Step({{a, 10, 12}}), kTol);
}

// The plan step's write slots (AttambaPlanner::BuildWriteSlots: on CUDA it runs once per step in
// kvp_plan_update, uploads the compressed slots and checks the slot_mapping, so the per-layer write
// only launches): the chunk ends' compressed rows, and a wrong window slot refused there with the
// same message the CPU write gives.
TEST(Attamba, PlannerWriteSlotsGiveChunkEndRowsAndRefuseWrongWindowSlots) {
  World w(Config(4, 2), 1, 4);
  const int a = w.AddDoc(40);
  EXPECT_LT(w.Step({{a, 0, 10}}), kTol);
  std::vector<int64_t> slots;
  // Positions 10 and 11: 11 is a chunk end (P = 4, offset 0), compressed row 3 = page 0, row 3.
  ASSERT_TRUE(w.PlannerWriteSlots({{a, 10, 12}}, 0, &slots).ok());
  ASSERT_EQ(slots.size(), 2u);
  EXPECT_EQ(slots[0], -1);
  EXPECT_EQ(slots[1], int64_t{w.doc(a).compressed[0]} * 4 + 3);
  Entry wrong_slot{a, 10, 12};
  wrong_slot.bad_slot = 1;
  const absl::Status s = w.PlannerWriteSlots({wrong_slot}, 0, &slots);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  const int64_t good = int64_t{w.doc(a).token_pages.at(2)} * 4 + 3;
  EXPECT_NE(s.message().find(fmt::format("slot_mapping[1]={}", good + 1)), std::string::npos) << s;
  EXPECT_NE(s.message().find(fmt::format("has window slot {}", good)), std::string::npos) << s;
  // Nothing was written: the step runs as it would have.
  EXPECT_LT(w.Step({{a, 10, 12}}), kTol);
}

TEST(Attamba, ConfigsOutOfRangeAreRefused) {
  for (auto [P, L, layer, layers] : {std::tuple{0, 0, 0, 1}, {65537, 0, 0, 1}, {4, -1, 0, 1}, {4, 0, 1, 1},
                                     {4, 0, 0, 0}, {4, 0, -1, 2}}) {
    AttambaConfig c = Config(P, L);
    c.layer_index = layer;
    c.num_layers = layers;
    EXPECT_FALSE(attamba::ValidateConfig(c).ok()) << P << " " << L << " " << layer << " " << layers;
  }
  AttambaConfig c = Config(4, 2);
  c.ssm_heads = 3;
  c.ssm_head_dim = 8;
  c.ssm_groups = 2;  // does not divide 3
  EXPECT_FALSE(attamba::ValidateConfig(c).ok());
  c.ssm_groups = 3;
  EXPECT_TRUE(attamba::ValidateConfig(c).ok());
  c.conv_width = 9;
  EXPECT_FALSE(attamba::ValidateConfig(c).ok());
}

// ---- the SSM ----

struct SsmWeights {
  SsmShape shape;
  std::vector<float> conv_w, conv_b, dt_bias, a_log, d, norm;
};

SsmWeights RandomWeights(const SsmShape& sh, std::mt19937& rng) {
  std::normal_distribution<float> n;
  std::uniform_real_distribution<float> u(-1.5f, 1.0f);
  SsmWeights w;
  w.shape = sh;
  w.conv_w.resize(size_t(sh.conv_dim()) * sh.conv_width);
  w.conv_b.resize(sh.conv_dim());
  for (float& f : w.conv_w) f = 0.5f * n(rng);
  for (float& f : w.conv_b) f = 0.1f * n(rng);
  for (int h = 0; h < sh.heads; ++h) {
    w.dt_bias.push_back(u(rng));
    w.a_log.push_back(u(rng));
    w.d.push_back(n(rng));
  }
  for (int i = 0; i < sh.d_inner(); ++i) w.norm.push_back(1.0f + 0.2f * n(rng));
  return w;
}

// The block in double, one position at a time, state reset at each chunk start.
std::vector<double> ReferenceSsm(const SsmWeights& w, const std::vector<float>& in, int len, int P, int off, float eps,
                                 bool with_norm) {
  const SsmShape& sh = w.shape;
  const int Di = sh.d_inner(), Dc = sh.conv_dim(), N = sh.state, G = sh.groups, hd = sh.head_dim, W = sh.conv_width;
  const std::set<int> ends = ChunkEnds(P, off, len);
  std::vector<double> y(size_t(len) * Di), state(size_t(sh.heads) * hd * N);
  int start = 0;
  auto silu = [](double x) { return x / (1 + std::exp(-x)); };
  for (int p = 0; p < len; ++p) {
    if (p > 0 && ends.count(p - 1)) start = p;
    if (p == start) std::fill(state.begin(), state.end(), 0.0);
    std::vector<double> xbc(Dc);
    for (int c = 0; c < Dc; ++c) {
      double acc = w.conv_b[c];
      for (int i = 0; i < W; ++i) {
        const int pp = p - (W - 1) + i;
        if (pp >= start) acc += double(w.conv_w[c * W + i]) * in[size_t(pp) * sh.in_dim() + Di + c];
      }
      xbc[c] = silu(acc);
    }
    for (int h = 0; h < sh.heads; ++h) {
      const int g = h / (sh.heads / G);
      const double raw = double(in[size_t(p) * sh.in_dim() + Di + Dc + h]) + w.dt_bias[h];
      const double dt = raw > 20 ? raw : std::log1p(std::exp(raw));
      const double decay = std::exp(-dt * std::exp(double(w.a_log[h])));
      for (int i = 0; i < hd; ++i) {
        double acc = 0;
        for (int n = 0; n < N; ++n) {
          double& s = state[(size_t(h) * hd + i) * N + n];
          s = s * decay + dt * xbc[h * hd + i] * xbc[Di + g * N + n];
          acc += s * xbc[Di + G * N + g * N + n];
        }
        y[size_t(p) * Di + h * hd + i] = acc + w.d[h] * xbc[h * hd + i];
      }
    }
    const int gs = Di / G;
    for (int g = 0; g < G; ++g) {
      double sq = 0;
      for (int i = g * gs; i < (g + 1) * gs; ++i) {
        double& v = y[size_t(p) * Di + i];
        v *= silu(in[size_t(p) * sh.in_dim() + i]);
        sq += v * v;
      }
      if (!with_norm) continue;
      const double inv = 1 / std::sqrt(sq / gs + eps);
      for (int i = g * gs; i < (g + 1) * gs; ++i) y[size_t(p) * Di + i] *= inv * w.norm[i];
    }
  }
  return y;
}

struct SsmCase {
  int P, conv_width, heads, head_dim, state, groups, layers;
  bool norm;
};

class AttambaSsm : public ::testing::TestWithParam<SsmCase> {};

TEST_P(AttambaSsm, ChunkLocalScanMatchesTheSequentialReference) {
  const SsmCase sc = GetParam();
  std::mt19937 rng(29);
  AttambaConfig cfg = Config(sc.P, 0);
  cfg.ssm_heads = sc.heads;
  cfg.ssm_head_dim = sc.head_dim;
  cfg.state_size = sc.state;
  cfg.ssm_groups = sc.groups;
  cfg.conv_width = sc.conv_width;
  cfg.num_layers = sc.layers;
  cfg.layer_index = sc.layers - 1;  // the largest offset
  const int off = Offset(cfg, cfg.layer_index);
  const HeadConfig heads{kHq, kHkv, kD, DType::kF32, 0.1f};
  ThreadPool pool(2);
  const ExecContext exec{Device::kCpu, 0, &pool};
  auto backend = CreateBackend(*FindBackend("attamba"), heads, BackendConfig{cfg}, exec);
  ASSERT_TRUE(backend.ok()) << backend.status();
  const SsmShape sh{sc.heads, sc.head_dim, sc.state, sc.groups, sc.conv_width};
  const SsmWeights wts = RandomWeights(sh, rng);
  kv::KvCacheOptions o;
  o.num_layers = 1;
  o.num_blocks = 4;
  o.block_size = 4;
  o.num_kv_heads = kHkv;
  o.head_size = kD;
  o.num_state_slots = 6;
  o.state_bytes_per_layer = (*backend)->state_bytes_per_layer();
  ASSERT_EQ(o.state_bytes_per_layer, 2 * 4 * sh.state_floats());
  auto cache = std::move(*kv::KvCache::Create(o));
  for (int s = 0; s < 6; ++s) {  // stale state: must never leak into a chunk start
    auto st = cache->State(0, s);
    for (size_t i = 0; i < st->size() / 4; ++i) reinterpret_cast<float*>(st->data())[i] = 3e3f;
  }
  std::normal_distribution<float> normal;
  const int lens[3] = {70, 45, 70};
  std::vector<std::vector<float>> inputs(3);
  for (int d = 0; d < 3; ++d) {
    inputs[d].resize(size_t(lens[d]) * sh.in_dim());
    for (float& f : inputs[d]) f = normal(rng);
  }
  // Doc 2 is a fork of doc 0 at 23 (same inputs up to there, then its own).
  std::copy_n(inputs[0].begin(), size_t(23) * sh.in_dim(), inputs[2].begin());
  std::vector<std::vector<double>> want(3);
  for (int d = 0; d < 3; ++d)
    want[d] = ReferenceSsm(wts, inputs[d], lens[d], sc.P, off, cfg.norm_eps, sc.norm);

  struct E {
    int doc, from, to;  // doc d keeps its state in slot d
  };
  auto step = [&](const std::vector<E>& es, int which) {
    std::vector<int32_t> qsl{0}, seq_lens, p0, slots, table;
    std::vector<float> in;
    for (const E& e : es) {
      qsl.push_back(qsl.back() + e.to - e.from);
      seq_lens.push_back(1);
      p0.push_back(e.from);
      slots.push_back(e.doc);
      table.push_back(0);
      in.insert(in.end(), inputs[e.doc].begin() + size_t(e.from) * sh.in_dim(),
                inputs[e.doc].begin() + size_t(e.to) * sh.in_dim());
    }
    const int T = qsl.back();
    BatchPlan plan(PlanCapacity{int(es.size()), T, int(es.size())});
    BatchInput bi;
    bi.num_seqs = int(es.size());
    bi.block_size = 4;
    bi.query_start_loc = qsl.data();
    bi.seq_lens = seq_lens.data();
    bi.block_table = table.data();
    bi.block_table_stride = 1;
    bi.state_slots = slots.data();
    bi.query_pos_starts = p0.data();
    EXPECT_TRUE(plan.Update(bi).ok());
    std::vector<float> out(size_t(T) * sh.d_inner(), -9.f);
    TensorView iv = View(in.data(), DType::kF32, {T, sh.in_dim()}), ov = View(out.data(), DType::kF32, {T, sh.d_inner()});
    TensorView cw = View(const_cast<float*>(wts.conv_w.data()), DType::kF32, {sh.conv_dim(), sh.conv_width});
    TensorView cb = View(const_cast<float*>(wts.conv_b.data()), DType::kF32, {sh.conv_dim()});
    TensorView db = View(const_cast<float*>(wts.dt_bias.data()), DType::kF32, {sh.heads});
    TensorView al = View(const_cast<float*>(wts.a_log.data()), DType::kF32, {sh.heads});
    TensorView dd = View(const_cast<float*>(wts.d.data()), DType::kF32, {sh.heads});
    TensorView nw = View(const_cast<float*>(wts.norm.data()), DType::kF32, {sh.d_inner()});
    const SsmArgs a{plan, *cache, 0, which, iv, &cw, &cb, &db, &al, &dd, sc.norm ? &nw : nullptr, ov, exec};
    const absl::Status s = (*backend)->RunSsm(a);
    EXPECT_TRUE(s.ok()) << s;
    double err = 0;
    size_t row = 0;
    for (const E& e : es)
      for (int p = e.from; p < e.to; ++p, ++row)
        for (int i = 0; i < sh.d_inner(); ++i)
          err = std::max(err, std::abs(want[e.doc][size_t(p) * sh.d_inner() + i] - out[row * sh.d_inner() + i]));
    return err;
  };
  constexpr double tol = 2e-4;
  for (int which : {0, 1}) {  // the two SSMs keep separate state in the same slots
    EXPECT_LT(step({{0, 0, 1}, {1, 0, 30}}, which), tol);
    EXPECT_LT(step({{0, 1, 23}}, which), tol);
  }
  // Fork doc 0 at 23 into slot 2 (state copied), then every doc goes on differently.
  ASSERT_TRUE(cache->CopyState(0, 2).ok());
  for (int which : {0, 1}) {
    const int mid = 23 + std::min(sc.P, 20);  // a step of one chunk (or 20 tokens), then the rest
    EXPECT_LT(step({{0, 23, mid}, {2, 23, 40}, {1, 30, 31}}, which), tol);
    EXPECT_LT(step({{1, 31, 45}, {0, mid, 50}}, which), tol);
  }
  for (int p = 0; p < 20; ++p)
    for (int which : {0, 1})
      EXPECT_LT(step({{0, 50 + p, 51 + p}, {2, 40 + p, 41 + p}}, which), tol) << "decode " << p;
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttambaSsm,
                         ::testing::Values(SsmCase{4, 4, 2, 8, 16, 1, 1, true}, SsmCase{8, 2, 4, 4, 8, 2, 3, true},
                                           SsmCase{1, 3, 2, 4, 4, 1, 1, false}, SsmCase{64, 4, 2, 8, 16, 2, 2, true},
                                           SsmCase{5, 1, 3, 4, 8, 3, 2, false}));

}  // namespace
}  // namespace kvplug::attn
