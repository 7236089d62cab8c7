// KV shifting attention (`kv_shift`) on the CPU against a straightforward reference: each
// sequence's mixed keys and values computed in double from its whole raw K/V sequence (K^_i =
// a1 K_i + a2 K_{i-1}, K_{-1} = 0; RoPE on K^_i in double when enabled), then full-probability
// causal attention in double. Random ragged batches over shuffled pages: chunked prefill off page
// boundaries, decodes, a fork (state copied), decode after a prefix-cache hit through the
// recompute rule (token c-1 again with slot -1, alone or leading the first chunk), a restart from
// position 0 over a stale state; prefill(n) + decode(m) == prefill(n + m) bitwise; the identity mix
// equals dense bitwise; NeoX and GPT-J RoPE; bad configs and caches.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <tuple>

#include "fmt/format.h"

#include "common/naive_attention.h"
#include "common/tensor_views.h"
#include "kvplug/attention/backend.h"
#include "kvplug/attention/kv_shift/kv_shift.h"
#include "kvplug/attention/kv_write.h"
#include "kvplug/attention/step_work.h"

namespace kvplug::attn {
namespace {

constexpr int kHq = 4, kHkv = 2, kD = 32, kBs = 8;

using ::kvplug::testing::View;

// RoPE in double on one head's row at `pos` (the reference's own, written from the definition).
void RopeDouble(double* x, int pos, double theta, int rd, RopeStyle style) {
  for (int j = 0; j < rd / 2; ++j) {
    const double angle = pos * std::pow(theta, -2.0 * j / rd);
    const int a = style == RopeStyle::kGptJ ? 2 * j : j, b = style == RopeStyle::kGptJ ? 2 * j + 1 : j + rd / 2;
    const double x0 = x[a], x1 = x[b];
    x[a] = x0 * std::cos(angle) - x1 * std::sin(angle);
    x[b] = x1 * std::cos(angle) + x0 * std::sin(angle);
  }
}

KvShiftConfig RandomConfig(std::mt19937& rng, float theta = 0, int rd = 0, RopeStyle style = RopeStyle::kNeoX) {
  std::uniform_real_distribution<float> wide(-2.5f, 2.5f);  // any sign and size
  KvShiftConfig c;
  for (int i = 0; i < 2 * kHkv; ++i) c.alpha_k.push_back(wide(rng)), c.alpha_v.push_back(wide(rng));
  c.rope_theta = theta;
  c.rotary_dim = rd;
  c.rope_style = style;
  return c;
}

// One sequence's raw projections at every position (queries as the caller hands them: already
// rotated when RoPE is on) and its pages.
struct Doc {
  int len = 0;
  std::vector<float> k, v, q;  // [len][H][D]
  std::vector<int32_t> pages;
  int32_t state_slot = 0;
};

struct Entry {
  int doc = 0, from = 0, to = 0;
  int unstored = 0;  // leading tokens with slot_mapping -1 (the prefix-hit refill)
};

struct StepOut {
  std::vector<float> out, lse;
};

class World {
 public:
  World(const KvShiftConfig& cfg, DType dtype = DType::kF32, int num_blocks = 96, uint32_t seed = 5,
        const char* backend = "kv_shift")
      : cfg_(cfg), rng_(seed) {
    heads_ = HeadConfig{kHq, kHkv, kD, dtype, 1.0f / std::sqrt(float(kD))};
    auto b = CreateBackend(*FindBackend(backend), heads_, std::string(backend) == "dense" ? BackendConfig{}
                                                                                            : BackendConfig{cfg}, exec_);
    EXPECT_TRUE(b.ok()) << b.status();
    backend_ = std::move(*b);
    kv::KvCacheOptions o;
    o.num_layers = 1;
    o.num_blocks = num_blocks;
    o.block_size = kBs;
    o.num_kv_heads = kHkv;
    o.head_size = kD;
    o.dtype = dtype;
    o.num_state_slots = 16;
    o.state_bytes_per_layer = PrevTokenStateBytes(kHkv, kD);
    cache_ = std::move(*kv::KvCache::Create(o));
    for (int i = 0; i < num_blocks; ++i) free_.push_back(i);
    std::shuffle(free_.begin(), free_.end(), rng_);
    // Stale state everywhere: a sequence must never read a slot it did not fill.
    for (int s = 0; s < o.num_state_slots; ++s) {
      auto st = cache_->State(0, s);
      float* f = reinterpret_cast<float*>(st->data());
      for (size_t i = 0; i < st->size() / 4; ++i) f[i] = 1e3f * float(int(rng_() % 200) - 100);
    }
  }

  // A new document of `len` positions with fresh random K/V/Q and pages.
  int AddDoc(int len) {
    std::normal_distribution<float> normal;
    Doc d;
    d.len = len;
    d.k.resize(size_t(len) * kHkv * kD);
    d.v.resize(d.k.size());
    d.q.resize(size_t(len) * kHq * kD);
    for (auto* x : {&d.k, &d.v, &d.q})
      for (float& f : *x) f = normal(rng_);
    if (cfg_.rope_theta > 0) RotateQueries(&d, 0);
    d.state_slot = next_slot_++;
    docs_.push_back(std::move(d));
    GrowPages(int(docs_.size()) - 1, len);
    return int(docs_.size()) - 1;
  }
  // A document whose first `shared` positions equal doc `src`'s, continuing with new random K/V/Q.
  int AddDerived(int src, int shared, int len) {
    const int id = AddDoc(len);
    Doc& d = docs_[id];
    std::copy_n(docs_[src].k.begin(), size_t(shared) * kHkv * kD, d.k.begin());
    std::copy_n(docs_[src].v.begin(), size_t(shared) * kHkv * kD, d.v.begin());
    std::copy_n(docs_[src].q.begin(), size_t(shared) * kHq * kD, d.q.begin());
    return id;
  }
  Doc& doc(int i) { return docs_[i]; }
  kv::KvCache& cache() { return *cache_; }

  // Runs one step (write then attention) over the entries.
  StepOut Step(const std::vector<Entry>& entries, absl::Status* status = nullptr) {
    std::vector<int32_t> qsl{0}, lens, indptr{0}, indices, slots;
    std::vector<int64_t> slot_map;
    std::vector<float> k, v, q;
    for (const Entry& e : entries) {
      const Doc& d = docs_[e.doc];
      qsl.push_back(qsl.back() + e.to - e.from);
      lens.push_back(e.to);
      slots.push_back(d.state_slot);
      for (int j = 0; j < (e.to + kBs - 1) / kBs; ++j) indices.push_back(d.pages[j]);
      indptr.push_back(int32_t(indices.size()));
      for (int p = e.from; p < e.to; ++p) {
        slot_map.push_back(p - e.from < e.unstored ? -1 : int64_t{d.pages[p / kBs]} * kBs + p % kBs);
        k.insert(k.end(), d.k.begin() + size_t(p) * kHkv * kD, d.k.begin() + size_t(p + 1) * kHkv * kD);
        v.insert(v.end(), d.v.begin() + size_t(p) * kHkv * kD, d.v.begin() + size_t(p + 1) * kHkv * kD);
        q.insert(q.end(), d.q.begin() + size_t(p) * kHq * kD, d.q.begin() + size_t(p + 1) * kHq * kD);
      }
    }
    const int t = qsl.back(), n = int(entries.size());
    BatchPlan plan(PlanCapacity{n, std::max(t, 1), std::max<int>(int(indices.size()), 1)});
    BatchInput in;
    in.num_seqs = n;
    in.block_size = kBs;
    in.query_start_loc = qsl.data();
    in.seq_lens = lens.data();
    in.kv_indptr = indptr.data();
    in.kv_indices = indices.data();
    in.slot_mapping = slot_map.data();
    in.state_slots = without_state_slots_ ? nullptr : slots.data();
    StepOut r;
    absl::Status s = plan.Update(in);
    TensorView kt = View(k.data(), DType::kF32, {t, kHkv, kD}), vt = View(v.data(), DType::kF32, {t, kHkv, kD});
    const WriteArgs w{plan, *cache_, 0, kt, vt, exec_};
    if (s.ok()) s = ValidateWrite(heads_, w);
    if (s.ok()) s = backend_->WriteKv(w);
    StepWorkSet steps;
    const StepWork* work = nullptr;
    if (s.ok()) {
      auto got = steps.Get(StepKey(*backend_, heads_), *backend_, heads_, plan, exec_);
      if (got.ok()) work = *got;
      else s = got.status();
    }
    if (s.ok()) {
      r.out.assign(q.size(), -7.f);
      r.lse.assign(size_t(t) * kHq, -7.f);
      TensorView qv = View(q.data(), DType::kF32, {t, kHq, kD}), ov = View(r.out.data(), DType::kF32, {t, kHq, kD});
      TensorView lv = View(r.lse.data(), DType::kF32, {t, kHq});
      RunArgs args{plan, *work, *cache_, 0, qv, {&ov, &lv, nullptr}, exec_};
      s = ValidateRun(heads_, args);
      if (s.ok()) s = backend_->Run(args);
    }
    if (status) *status = s;
    else EXPECT_TRUE(s.ok()) << s;
    return r;
  }

  // The reference's K^ (mixed, rotated) and V^ of doc d for positions [0, len), in double.
  void Reference(int d, int len, std::vector<double>* kh, std::vector<double>* vh) const {
    const Doc& doc = docs_[d];
    const bool dense = cfg_.alpha_k.empty();
    kh->assign(size_t(len) * kHkv * kD, 0);
    vh->assign(kh->size(), 0);
    for (int p = 0; p < len; ++p)
      for (int h = 0; h < kHkv; ++h) {
        for (int x = 0; x < kD; ++x) {
          const size_t i = (size_t(p) * kHkv + h) * kD + x, prev = i - size_t(kHkv) * kD;
          const double a1 = dense ? 1 : cfg_.alpha_k[2 * h], a2 = dense ? 0 : cfg_.alpha_k[2 * h + 1];
          const double b1 = dense ? 1 : cfg_.alpha_v[2 * h], b2 = dense ? 0 : cfg_.alpha_v[2 * h + 1];
          (*kh)[i] = a1 * doc.k[i] + (p > 0 ? a2 * doc.k[prev] : 0.0);
          (*vh)[i] = b1 * doc.v[i] + (p > 0 ? b2 * doc.v[prev] : 0.0);
        }
        if (cfg_.rope_theta > 0)
          RopeDouble(kh->data() + (size_t(p) * kHkv + h) * kD, p, cfg_.rope_theta,
                     cfg_.rotary_dim == 0 ? kD : cfg_.rotary_dim, cfg_.rope_style);
      }
  }

  // Max abs error of a step's out and lse against the reference.
  double Error(const StepOut& r, const std::vector<Entry>& entries) const {
    testing::NaiveParams np{kHq, kHkv, kD, 1.0 / std::sqrt(double(kD))};
    double err = 0;
    size_t row = 0;
    for (const Entry& e : entries) {
      std::vector<double> kh, vh, q, o, l;
      Reference(e.doc, e.to, &kh, &vh);
      const Doc& d = docs_[e.doc];
      for (size_t i = size_t(e.from) * kHq * kD; i < size_t(e.to) * kHq * kD; ++i) q.push_back(d.q[i]);
      testing::NaiveAttention(np, e.to, e.to - e.from, q, kh, vh, &o, &l);
      for (size_t i = 0; i < o.size(); ++i) err = std::max(err, std::abs(o[i] - r.out[row * kHq * kD + i]));
      for (size_t i = 0; i < l.size(); ++i) err = std::max(err, std::abs(l[i] - r.lse[row * kHq + i]));
      row += e.to - e.from;
    }
    if (r.out.empty()) return std::numeric_limits<double>::infinity();
    return err;
  }

  // Max abs error of the stored K^/V^ of doc d's positions [from, to) against the reference.
  double CacheError(int d, int from, int to) const {
    std::vector<double> kh, vh;
    Reference(d, to, &kh, &vh);
    const kv::PagedLayer& pages = cache_->layer(0);
    double err = 0;
    for (int p = from; p < to; ++p)
      for (int h = 0; h < kHkv; ++h)
        for (int x = 0; x < kD; ++x) {
          const size_t i = (size_t(p) * kHkv + h) * kD + x;
          const int32_t page = docs_[d].pages[p / kBs];
          err = std::max(err, std::abs(kh[i] - LoadAsFloat(pages.Row(0, page, p % kBs, h), pages.dtype, x)));
          err = std::max(err, std::abs(vh[i] - LoadAsFloat(pages.Row(1, page, p % kBs, h), pages.dtype, x)));
        }
    return err;
  }

  // Raw bytes of every page (bitwise comparisons).
  std::vector<uint8_t> PageBytes() const {
    std::vector<uint8_t> bytes;
    const kv::PagedLayer& pages = cache_->layer(0);
    const size_t row = size_t(kD) * DTypeSize(pages.dtype);
    for (int b = 0; b < cache_->options().num_blocks; ++b)
      for (int s = 0; s < kBs; ++s)
        for (int h = 0; h < kHkv; ++h)
          for (int kv = 0; kv < 2; ++kv) {
            const auto* r = static_cast<const uint8_t*>(pages.Row(kv, b, s, h));
            bytes.insert(bytes.end(), r, r + row);
          }
    return bytes;
  }

  void set_without_state_slots(bool v) { without_state_slots_ = v; }
  // The pages of doc d must cover `len` positions.
  void GrowPages(int d, int len) {
    while (int(docs_[d].pages.size()) * kBs < len) {
      docs_[d].pages.push_back(free_.back());
      free_.pop_back();
    }
  }
  // Gives doc `dst` doc `src`'s first `blocks` pages (a prefix-cache hit or a fork's shared blocks).
  void SharePages(int src, int dst, int blocks) {
    for (int j = 0; j < blocks; ++j) {
      free_.push_back(docs_[dst].pages[j]);
      docs_[dst].pages[j] = docs_[src].pages[j];
    }
  }

 private:
  void RotateQueries(Doc* d, int from) {
    const int rd = cfg_.rotary_dim == 0 ? kD : cfg_.rotary_dim;
    for (int p = from; p < d->len; ++p)
      for (int h = 0; h < kHq; ++h) {
        double row[kD];
        float* q = d->q.data() + (size_t(p) * kHq + h) * kD;
        for (int x = 0; x < kD; ++x) row[x] = q[x];
        RopeDouble(row, p, cfg_.rope_theta, rd, cfg_.rope_style);
        for (int x = 0; x < kD; ++x) q[x] = static_cast<float>(row[x]);
      }
  }

  KvShiftConfig cfg_;
  std::mt19937 rng_;
  HeadConfig heads_;
  ThreadPool pool_{2};
  ExecContext exec_{Device::kCpu, 0, &pool_, nullptr};
  std::unique_ptr<AttentionBackend> backend_;
  std::unique_ptr<kv::KvCache> cache_;
  std::vector<Doc> docs_;
  std::vector<int32_t> free_;
  int32_t next_slot_ = 0;
  bool without_state_slots_ = false;
};

// A random ragged schedule: every step each unfinished doc (present with probability 3/4) takes a
// chunk of 1..max_chunk positions (1 = a decode); chunks fall anywhere relative to the pages.
void RunRandomSchedule(World& w, const std::vector<int>& docs, std::vector<int> done, int max_chunk,
                       std::mt19937& rng, double tol) {
  for (int step = 0;; ++step) {
    std::vector<Entry> entries;
    for (size_t i = 0; i < docs.size(); ++i) {
      const int len = w.doc(docs[i]).len;
      if (done[i] == len || rng() % 4 == 0) continue;
      const int n = std::min(len - done[i], 1 + int(rng() % max_chunk));
      entries.push_back({docs[i], done[i], done[i] + n});
      done[i] += n;
    }
    if (entries.empty()) {
      bool all = true;
      for (size_t i = 0; i < docs.size(); ++i) all = all && done[i] == w.doc(docs[i]).len;
      if (all) return;
      continue;
    }
    const StepOut r = w.Step(entries);
    ASSERT_LT(w.Error(r, entries), tol) << "step " << step;
  }
}

TEST(KvShiftCpu, RaggedChunkedPrefillAndDecodeMatchTheReference) {
  for (uint32_t seed : {1u, 2u, 3u}) {
    SCOPED_TRACE(fmt::format("seed {}", seed));
    std::mt19937 rng(seed);
    World w(RandomConfig(rng), DType::kF32, 96, seed);
    std::vector<int> docs;
    const int n = 3 + int(rng() % 3);
    for (int i = 0; i < n; ++i) docs.push_back(w.AddDoc(1 + int(rng() % 60)));
    RunRandomSchedule(w, docs, std::vector<int>(docs.size(), 0), 19, rng, 2e-5);
    for (int d : docs) EXPECT_LT(w.CacheError(d, 0, w.doc(d).len), 1e-5);
  }
}

TEST(KvShiftCpu, RopeNeoXAndGptJMatchTheDoubleReference) {
  struct Rope { float theta; int rd; RopeStyle style; };
  for (const Rope rope : {Rope{10000.f, 0, RopeStyle::kNeoX}, Rope{10000.f, 16, RopeStyle::kGptJ},
                          Rope{500000.f, 0, RopeStyle::kGptJ}, Rope{10000.f, 8, RopeStyle::kNeoX}}) {
    SCOPED_TRACE(fmt::format("theta={} rotary_dim={} style={}", rope.theta, rope.rd, int(rope.style)));
    std::mt19937 rng(17);
    World w(RandomConfig(rng, rope.theta, rope.rd, rope.style), DType::kF32, 160, 17);
    std::vector<int> docs;
    for (int len : {150, 37, 9, 81}) docs.push_back(w.AddDoc(len));
    RunRandomSchedule(w, docs, std::vector<int>(docs.size(), 0), 29, rng, 5e-5);
    for (int d : docs) EXPECT_LT(w.CacheError(d, 0, w.doc(d).len), 2e-5);
  }
}

TEST(KvShiftCpu, BFloat16CacheStaysWithinRounding) {
  std::mt19937 rng(4);
  World w(RandomConfig(rng, 10000.f), DType::kBF16, 96, 4);
  std::vector<int> docs{w.AddDoc(45), w.AddDoc(20)};
  RunRandomSchedule(w, docs, {0, 0}, 13, rng, 8e-2);
  EXPECT_LT(w.CacheError(docs[0], 0, 45), 0.1);
  EXPECT_GT(w.CacheError(docs[0], 0, 45), 0.0);
}

TEST(KvShiftCpu, PrefillThenDecodeEqualsOnePrefillBitwise) {
  // The paper's listing keeps the shifted K/V as state after prefill; kvplug keeps the raw ones.
  for (const float theta : {0.f, 10000.f}) {
    SCOPED_TRACE(fmt::format("rope_theta={}", theta));
    std::mt19937 rng(9);
    const KvShiftConfig cfg = RandomConfig(rng, theta);
    World one(cfg, DType::kF32, 64, 9), split(cfg, DType::kF32, 64, 9);  // same docs, same pages
    const int n = 21, m = 12, n2 = 16, m2 = 7;
    for (World* w : {&one, &split}) w->AddDoc(n + m), w->AddDoc(n2 + m2);
    const StepOut all = one.Step({{0, 0, n + m}, {1, 0, n2 + m2}});
    const StepOut pre = split.Step({{0, 0, n}, {1, 0, n2}});
    std::vector<std::vector<float>> rows0(n + m), rows1(n2 + m2);  // out rows per position
    auto keep = [](const StepOut& r, size_t row, std::vector<float>* dst) {
      dst->assign(r.out.begin() + row * kHq * kD, r.out.begin() + (row + 1) * kHq * kD);
      dst->insert(dst->end(), r.lse.begin() + row * kHq, r.lse.begin() + (row + 1) * kHq);
    };
    for (int p = 0; p < n; ++p) keep(pre, p, &rows0[p]);
    for (int p = 0; p < n2; ++p) keep(pre, n + p, &rows1[p]);
    for (int i = 0; i < m; ++i) {
      std::vector<Entry> e{{0, n + i, n + i + 1}};
      if (i < m2) e.push_back({1, n2 + i, n2 + i + 1});
      const StepOut r = split.Step(e);
      keep(r, 0, &rows0[n + i]);
      if (i < m2) keep(r, 1, &rows1[n2 + i]);
    }
    EXPECT_TRUE(one.PageBytes() == split.PageBytes()) << "cache contents differ";
    for (int p = 0; p < n + m; ++p) {
      std::vector<float> want;
      keep(all, p, &want);
      ASSERT_EQ(0, std::memcmp(want.data(), rows0[p].data(), want.size() * 4)) << "doc 0 position " << p;
    }
    for (int p = 0; p < n2 + m2; ++p) {
      std::vector<float> want;
      keep(all, n + m + p, &want);
      ASSERT_EQ(0, std::memcmp(want.data(), rows1[p].data(), want.size() * 4)) << "doc 1 position " << p;
    }
    EXPECT_LT(one.Error(all, {{0, 0, n + m}, {1, 0, n2 + m2}}), 2e-5);
  }
}

TEST(KvShiftCpu, IdentityMixEqualsDenseBitwise) {
  KvShiftConfig id;
  for (int h = 0; h < kHkv; ++h) id.alpha_k.insert(id.alpha_k.end(), {1.f, 0.f}), id.alpha_v.insert(id.alpha_v.end(), {1.f, 0.f});
  for (const DType dt : {DType::kF32, DType::kBF16}) {
    SCOPED_TRACE(DTypeName(dt));
    World shift(id, dt, 64, 21), dense(id, dt, 64, 21, "dense");
    for (World* w : {&shift, &dense}) w->AddDoc(40), w->AddDoc(13), w->AddDoc(1);
    const std::vector<std::vector<Entry>> steps{{{0, 0, 11}, {1, 0, 5}, {2, 0, 1}}, {{0, 11, 30}, {1, 5, 13}},
                                                {{0, 30, 31}}, {{0, 31, 40}}};
    for (const auto& s : steps) {
      const StepOut a = shift.Step(s), b = dense.Step(s);
      ASSERT_EQ(a.out.size(), b.out.size());
      EXPECT_EQ(0, std::memcmp(a.out.data(), b.out.data(), a.out.size() * 4));
      EXPECT_EQ(0, std::memcmp(a.lse.data(), b.lse.data(), a.lse.size() * 4));
    }
    EXPECT_TRUE(shift.PageBytes() == dense.PageBytes());
  }
}

TEST(KvShiftCpu, AForkContinuesFromTheCopiedState) {
  // Doc 1 is a fork of doc 0 after 19 tokens (off a page boundary): it shares the two full pages,
  // gets a copy of the partial third one, and a copy of the state; both then continue differently.
  std::mt19937 rng(6);
  World w(RandomConfig(rng, 10000.f), DType::kF32, 64, 6);
  const int parent = w.AddDoc(40), fork_at = 19;
  ASSERT_LT(w.Error(w.Step({{parent, 0, 12}}), {{parent, 0, 12}}), 2e-5);
  ASSERT_LT(w.Error(w.Step({{parent, 12, fork_at}}), {{parent, 12, fork_at}}), 2e-5);
  const int child = w.AddDerived(parent, fork_at, 33);
  w.SharePages(parent, child, fork_at / kBs);
  ASSERT_TRUE(w.cache().CopyBlocks({paged::BlockCopy{w.doc(parent).pages[2], w.doc(child).pages[2]}}).ok());
  ASSERT_TRUE(w.cache().CopyState(w.doc(parent).state_slot, w.doc(child).state_slot).ok());
  std::vector<int> done{fork_at, fork_at};
  RunRandomSchedule(w, {parent, child}, done, 6, rng, 2e-5);
  EXPECT_LT(w.CacheError(child, 0, 33), 1e-5);
  EXPECT_LT(w.CacheError(parent, 0, 40), 1e-5);
}

TEST(KvShiftCpu, PrefixHitRefillsTheStateByRecomputingTheLastCachedToken) {
  // Docs 1 and 2 share doc 0's first c = 24 tokens (3 full pages, from the prefix cache). The
  // engine runs token c-1 again with slot -1: doc 1 alone (q_len 1, seq_len c), doc 2 as the first
  // token of its first chunk. Neither touches the shared pages.
  for (const float theta : {0.f, 10000.f}) {
    SCOPED_TRACE(fmt::format("rope_theta={}", theta));
    std::mt19937 rng(8);
    World w(RandomConfig(rng, theta), DType::kF32, 64, 8);
    const int c = 24, a = w.AddDoc(30);
    ASSERT_LT(w.Error(w.Step({{a, 0, 30}}), {{a, 0, 30}}), 2e-5);
    const int b1 = w.AddDerived(a, c, 45), b2 = w.AddDerived(a, c, 38);
    w.SharePages(a, b1, c / kBs);
    w.SharePages(a, b2, c / kBs);
    const std::vector<uint8_t> before = w.PageBytes();
    // The refill of doc 1 alone (its output is a valid causal output too).
    ASSERT_LT(w.Error(w.Step({{b1, c - 1, c, 1}}), {{b1, c - 1, c}}), 2e-5);
    EXPECT_TRUE(w.PageBytes() == before) << "a slot -1 token was written";
    // Doc 2's refill leads its first chunk; doc 1 continues at c.
    const std::vector<Entry> first{{b1, c, c + 5}, {b2, c - 1, c + 9, 1}};
    ASSERT_LT(w.Error(w.Step(first), first), 2e-5);
    RunRandomSchedule(w, {b1, b2}, {c + 5, c + 9}, 7, rng, 2e-5);
    EXPECT_LT(w.CacheError(b1, 0, 45), 1e-5);
    EXPECT_LT(w.CacheError(b2, 0, 38), 1e-5);
    EXPECT_LT(w.CacheError(a, 0, 30), 1e-5);
  }
}

TEST(KvShiftCpu, WithoutTheRefillAPrefixHitReadsAStaleState) {
  // The reason for the recompute rule: continuing at c straight after a hit mixes a wrong K_{c-1}.
  std::mt19937 rng(10);
  World w(RandomConfig(rng), DType::kF32, 64, 10);
  const int c = 16, a = w.AddDoc(20);
  w.Step({{a, 0, 20}});
  const int b = w.AddDerived(a, c, 24);
  w.SharePages(a, b, c / kBs);
  const std::vector<Entry> e{{b, c, 24}};
  EXPECT_GT(w.Error(w.Step(e), e), 1e-2);
}

TEST(KvShiftCpu, RecomputeAfterPreemptionRestartsAtPositionZero) {
  // Preempted by recompute: the sequence's pages are freed and it restarts at 0 into new pages
  // with the same (now stale) state slot, which position 0 ignores.
  std::mt19937 rng(12);
  World w(RandomConfig(rng, 10000.f), DType::kF32, 64, 12);
  const int d = w.AddDoc(35);
  w.Step({{d, 0, 17}});
  w.Step({{d, 17, 18}});
  const int again = w.AddDerived(d, 35, 35);
  w.doc(again).state_slot = w.doc(d).state_slot;  // the same slot, holding token 17's raw K/V
  RunRandomSchedule(w, {again}, {0}, 11, rng, 2e-5);
  EXPECT_LT(w.CacheError(again, 0, 35), 1e-5);
}

TEST(KvShiftCpu, TheShiftNeverCrossesSequencesInAPackedBatch) {
  // Adjacent sequences in the packed batch: each first token at position 0 mixes zero, a first
  // token at p > 0 its own state, never the previous row of the batch.
  std::mt19937 rng(14);
  World w(RandomConfig(rng), DType::kF32, 64, 14);
  std::vector<int> d;
  for (int i = 0; i < 5; ++i) d.push_back(w.AddDoc(12));
  const std::vector<Entry> s1{{d[0], 0, 5}, {d[1], 0, 1}, {d[2], 0, 7}, {d[3], 0, 3}, {d[4], 0, 1}};
  ASSERT_LT(w.Error(w.Step(s1), s1), 2e-5);
  const std::vector<Entry> s2{{d[4], 1, 2}, {d[2], 7, 12}, {d[0], 5, 6}, {d[3], 3, 12}, {d[1], 1, 12}};
  ASSERT_LT(w.Error(w.Step(s2), s2), 2e-5);
  const int written[] = {6, 12, 12, 12, 2};
  for (int i = 0; i < 5; ++i) EXPECT_LT(w.CacheError(d[i], 0, written[i]), 1e-5);
}

TEST(KvShiftCpu, BadConfigsAreRejectedWithTheirValues) {
  const HeadConfig heads{kHq, kHkv, kD, DType::kF32, 0.125f};
  ThreadPool pool(1);
  const ExecContext exec{Device::kCpu, 0, &pool, nullptr};
  const BackendInfo& info = *FindBackend("kv_shift");
  EXPECT_TRUE(info.needs_state_slots);
  auto expect = [&](const BackendConfig& cfg, const std::string& part) {
    auto b = CreateBackend(info, heads, cfg, exec);
    ASSERT_FALSE(b.ok()) << part;
    EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument) << b.status();
    EXPECT_NE(std::string(b.status().message()).find(part), std::string::npos) << b.status();
  };
  KvShiftConfig good;
  good.alpha_k = {1.f, -0.5f, 2.f, 3.f};
  good.alpha_v = {-7.f, 0.f, 1e6f, -1e-6f};  // any sign and size
  auto ok = CreateBackend(info, heads, good, exec);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ((*ok)->state_bytes_per_layer(), PrevTokenStateBytes(kHkv, kD));
  KvShiftConfig c = good;
  c.alpha_k.pop_back();
  expect(c, "alpha_k has 3 values, expected num_kv_heads * 2 = 4");
  c = good;
  c.alpha_v.push_back(1.f);
  c.alpha_v.push_back(1.f);
  expect(c, "alpha_v has 6 values");
  c = good;
  c.alpha_v[2] = std::numeric_limits<float>::quiet_NaN();
  expect(c, "alpha_v[2]=nan");
  c = good;
  c.alpha_k[3] = -std::numeric_limits<float>::infinity();
  expect(c, "alpha_k[3]=-inf");
  c = good;
  c.rope_theta = -1.f;
  expect(c, "rope_theta=-1");
  c = good;
  c.rope_theta = std::numeric_limits<float>::infinity();
  expect(c, "rope_theta=inf");
  c = good;
  c.rope_theta = 10000.f;
  c.rotary_dim = 7;
  expect(c, "rotary_dim=7");
  c.rotary_dim = 64;
  expect(c, "rotary_dim=64 must be 0 (head_size) or even and in [2, head_size=32]");
  c.rotary_dim = 0;
  c.rope_style = static_cast<RopeStyle>(5);
  expect(c, "rope_style=5");
  expect(BackendConfig{}, "a KvShiftConfig is required");
  expect(DenseConfig{}, "not a KvShiftConfig");
}

TEST(KvShiftCpu, CachesAndPlansWithoutStateAreRejected) {
  std::mt19937 rng(15);
  const KvShiftConfig cfg = RandomConfig(rng);
  {
    World w(cfg);
    const int d = w.AddDoc(5);
    w.set_without_state_slots(true);
    absl::Status s;
    w.Step({{d, 0, 5}}, &s);
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
    EXPECT_NE(std::string(s.message()).find("state_slots"), std::string::npos) << s;
  }
  // Caches without slots, or with too few bytes per slot, through the write hook directly.
  for (const auto& [slots, bytes, part] :
       {std::tuple<int, int64_t, std::string>{0, PrevTokenStateBytes(kHkv, kD), "num_state_slots=0"},
        std::tuple<int, int64_t, std::string>{4, 100, "state_bytes_per_layer=100 is below the 512 bytes"}}) {
    kv::KvCacheOptions o;
    o.num_layers = 1;
    o.num_blocks = 4;
    o.block_size = kBs;
    o.num_kv_heads = kHkv;
    o.head_size = kD;
    o.num_state_slots = slots;
    o.state_bytes_per_layer = bytes;
    auto cache = kv::KvCache::Create(o);
    ASSERT_TRUE(cache.ok()) << cache.status();
    const HeadConfig heads{kHq, kHkv, kD, DType::kF32, 0.125f};
    ThreadPool pool(1);
    const ExecContext exec{Device::kCpu, 0, &pool, nullptr};
    auto backend = CreateBackend(*FindBackend("kv_shift"), heads, cfg, exec);
    ASSERT_TRUE(backend.ok());
    const int32_t qsl[] = {0, 2}, lens[] = {2}, indptr[] = {0, 1}, indices[] = {0}, state[] = {0};
    const int64_t slot_map[] = {0, 1};
    BatchPlan plan(PlanCapacity{1, 2, 1});
    BatchInput in;
    in.num_seqs = 1;
    in.block_size = kBs;
    in.query_start_loc = qsl;
    in.seq_lens = lens;
    in.kv_indptr = indptr;
    in.kv_indices = indices;
    in.slot_mapping = slot_map;
    in.state_slots = state;
    ASSERT_TRUE(plan.Update(in).ok());
    std::vector<float> k(2 * kHkv * kD, 1.f), v = k;
    TensorView kt = View(k.data(), DType::kF32, {2, kHkv, kD}), vt = View(v.data(), DType::kF32, {2, kHkv, kD});
    const absl::Status s = (*backend)->WriteKv(WriteArgs{plan, **cache, 0, kt, vt, exec});
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
    EXPECT_NE(std::string(s.message()).find(part), std::string::npos) << s;
  }
}

}  // namespace
}  // namespace kvplug::attn
