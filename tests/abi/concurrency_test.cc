// The header's thread-safety statements, exercised through dlopen as an engine uses the library
// (path in $KVP_LIBRARY, set by CTest):
//  - different handles may be used from different threads at once: one full handle set per thread
//    (context, block manager, cache, plan, attention) serving its own batches, checked against the
//    double-precision reference;
//  - an attention handle, a plan and a cache that nobody writes may be shared: runs from several
//    threads into different outputs give exactly the single-threaded result;
//  - one context (and its CPU thread pool) shared by concurrent runs of different handles;
//  - the block manager's read-only queries may run concurrently with each other;
//  - kvp_last_error() is thread-local; config parsing and handle creation from several threads.
// Every test of this file is in the suite `Concurrency`, so `ctest -R '^Concurrency\.'` selects
// them (the TSan job of .ci/sanitize.sh runs exactly that).
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/naive_attention.h"
#include "abi/abi_harness.h"

namespace {

class Concurrency : public LoadedAbi {};

// Worker threads must not use ASSERT_* (it returns from the lambda only); they count problems and
// keep the first message, which the main thread reports.
struct Problems {
  std::atomic<int> count{0};
  std::string first;  // written once, by whoever increments count from 0
  void Add(const std::string& what) {
    if (count.fetch_add(1) == 0) first = what;
  }
};

#define CHECK_OK(expr, problems)                                                               \
  do {                                                                                         \
    const kvp_status s_ = (expr);                                                              \
    if (s_ != KVP_OK) {                                                                        \
      (problems).Add(std::string(#expr) + ": " + api.kvp_status_string(s_) + ": " + api.kvp_last_error()); \
      return;                                                                                  \
    }                                                                                          \
  } while (0)



DLTensor MakeTensor(void* data, DLDataType dtype, const int64_t* shape, int32_t ndim) {
  DLTensor t{};
  t.data = data;
  t.device = DLDevice{kDLCPU, 0};
  t.ndim = ndim;
  t.dtype = dtype;
  t.shape = const_cast<int64_t*>(shape);
  t.strides = nullptr;
  t.byte_offset = 0;
  return t;
}

// Model sizes shared by the tests: GQA with 2 query heads per KV head.
constexpr int32_t kQH = 4, kKH = 2, kD = 32, kBS = 4, kLayers = 2;

// K/V of a token depend only on (layer, token id, position): prefix-cache hits and copies serve the
// same values a sequence would have written itself, so the reference needs no block bookkeeping.
float KvValue(int kv, int layer, int32_t token, int64_t pos, int head, int i) {
  uint64_t x = (uint64_t(uint32_t(token)) * 0x9e3779b97f4a7c15ULL) ^ (uint64_t(pos) << 20) ^
               (uint64_t(layer) << 50) ^ (uint64_t(kv) << 56) ^ (uint64_t(head) << 40) ^ uint64_t(i);
  x ^= x >> 31;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 29;
  return static_cast<float>(static_cast<double>(x >> 40) / double(1ull << 24) * 2.0 - 1.0);
}

kvp_context* NewContext(int32_t threads) {
  kvp_context_options o{};
  o.struct_size = sizeof o;
  o.device_type = kDLCPU;
  o.num_threads = threads;
  kvp_context* c = nullptr;
  return api.kvp_context_create(&o, &c) == KVP_OK ? c : nullptr;
}

kvp_kv_cache_options CacheOptions(int32_t blocks, int32_t host_blocks) {
  kvp_kv_cache_options o{};
  o.struct_size = sizeof o;
  o.num_layers = kLayers;
  o.num_blocks = blocks;
  o.block_size = kBS;
  o.num_kv_heads = kKH;
  o.head_size = kD;
  o.dtype = KVP_DTYPE_FLOAT32;
  o.layout = KVP_LAYOUT_KV_FIRST;
  o.num_host_blocks = host_blocks;
  return o;
}

kvp_attention_options AttnOptions() {
  kvp_attention_options o{};
  o.struct_size = sizeof o;
  o.backend = "dense";
  o.num_q_heads = kQH;
  o.num_kv_heads = kKH;
  o.head_size = kD;
  o.kv_dtype = KVP_DTYPE_FLOAT32;
  return o;
}

kvp_plan_options PlanOptions() {
  kvp_plan_options o{};
  o.struct_size = sizeof o;
  o.max_num_seqs = 16;
  o.max_num_tokens = 256;
  o.max_num_blocks = 256;
  return o;
}

// ------------------------------------------------------------------------------------------------
// A small engine: one handle set, serving batches of sequences (prefix caching, chunked prefill,
// fork with copy on write, decode, swap out and in) and checking every output against the reference.
// ------------------------------------------------------------------------------------------------

class MiniEngine {
 public:
  // `ctx` may be shared with other engines (then this engine does not own it).
  MiniEngine(kvp_context* ctx, uint64_t seed) : ctx_(ctx), rng_(seed) {}

  void Init(Problems& p) {
    kvp_block_manager_options bo{};
    bo.struct_size = sizeof bo;
    bo.block_size = kBS;
    bo.num_device_blocks = kBlocks;
    bo.num_host_blocks = kHostBlocks;
    bo.enable_prefix_caching = 1;
    bo.hash_seed = 11;
    kvp_block_manager* bm = nullptr;
    CHECK_OK(api.kvp_block_manager_create(&bo, &bm), p);
    bm_.reset(bm);
    const kvp_kv_cache_options co = CacheOptions(kBlocks, kHostBlocks);
    kvp_kv_cache* cache = nullptr;
    CHECK_OK(api.kvp_kv_cache_create(ctx_, &co, &cache), p);
    cache_.reset(cache);
    const kvp_plan_options po = PlanOptions();
    kvp_plan* plan = nullptr;
    CHECK_OK(api.kvp_plan_create(ctx_, &po, &plan), p);
    plan_.reset(plan);
    const kvp_attention_options ao = AttnOptions();
    kvp_attention* attn = nullptr;
    CHECK_OK(api.kvp_attention_create(ctx_, &ao, &attn), p);
    attn_.reset(attn);
    ready_ = true;
  }

  // Runs `steps` engine steps; returns the number of attention outputs checked.
  int64_t Serve(int steps, Problems& p) {
    if (!ready_) return 0;
    for (int step = 0; step < steps && p.count.load() == 0; ++step) Step(p);
    // Drain.
    for (const auto& [id, s] : seqs_)
      if (api.kvp_block_manager_free(bm_.get(), id) != KVP_OK) p.Add("free at drain failed");
    seqs_.clear();
    kvp_block_manager_stats st{};
    st.struct_size = sizeof st;
    if (api.kvp_block_manager_stats_get(bm_.get(), &st) != KVP_OK || st.num_used_blocks != 0 ||
        st.num_sequences != 0 || st.num_free_host_blocks != kHostBlocks)
      p.Add("the pools are not whole after the drain");
    return checked_;
  }

 private:
  static constexpr int32_t kBlocks = 48, kHostBlocks = 16;
  struct Seq {
    std::vector<int32_t> tokens;
    int64_t computed = 0;  // tokens whose K/V are in the cache
    bool swapped = false;
  };

  int Uniform(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng_); }

  void CheckStats(Problems& p) {
    kvp_block_manager_stats st{};
    st.struct_size = sizeof st;
    if (api.kvp_block_manager_stats_get(bm_.get(), &st) != KVP_OK) return p.Add("stats_get failed");
    if (st.num_free_blocks + st.num_cached_free_blocks + st.num_used_blocks != st.num_device_blocks ||
        st.num_sequences != static_cast<int32_t>(seqs_.size()))
      p.Add("stats do not add up");
  }

  // Admission, forks, swaps, frees: the scheduler's part of a step.
  void Schedule(Problems& p) {
    // Swap a sequence back in when there is room, or out now and then.
    for (auto& [id, s] : seqs_) {
      if (s.swapped && Uniform(0, 1) == 0) {
        kvp_block_copy plan[64];
        int32_t n = 0;
        if (api.kvp_block_manager_swap_in(bm_.get(), id, plan, 64, &n) == KVP_OK) {
          CHECK_OK(api.kvp_kv_cache_swap_in(cache_.get(), plan, n), p);
          s.swapped = false;
        }
      } else if (!s.swapped && s.computed == static_cast<int64_t>(s.tokens.size()) && Uniform(0, 9) == 0) {
        kvp_block_copy plan[64];
        int32_t n = 0;
        if (api.kvp_block_manager_swap_out(bm_.get(), id, plan, 64, &n) == KVP_OK) {
          CHECK_OK(api.kvp_kv_cache_swap_out(cache_.get(), plan, n), p);
          s.swapped = true;
        }
      }
    }
    // Free finished sequences.
    for (auto it = seqs_.begin(); it != seqs_.end();) {
      if (it->second.tokens.size() > 40 || (seqs_.size() > 6 && Uniform(0, 3) == 0)) {
        CHECK_OK(api.kvp_block_manager_free(bm_.get(), it->first), p);
        it = seqs_.erase(it);
      } else {
        ++it;
      }
    }
    // Fork a fully computed sequence (parallel sampling).
    if (!seqs_.empty() && Uniform(0, 3) == 0) {
      auto it = std::next(seqs_.begin(), Uniform(0, static_cast<int>(seqs_.size()) - 1));
      if (!it->second.swapped && it->second.computed == static_cast<int64_t>(it->second.tokens.size())) {
        const uint64_t child = next_id_++;
        if (api.kvp_block_manager_fork(bm_.get(), it->first, child) == KVP_OK) seqs_[child] = it->second;
      }
    }
    // Admit new prompts: one of a few shared prefixes plus a random tail.
    if (seqs_.size() < 8) {
      const auto& pre = prefix_[Uniform(0, 2)];
      std::vector<int32_t> prompt(pre.begin(), pre.begin() + Uniform(1, static_cast<int>(pre.size())));
      for (int i = Uniform(0, 6); i > 0; --i) prompt.push_back(Uniform(0, 99));
      const uint64_t id = next_id_++;
      int64_t cached = -1;
      if (api.kvp_block_manager_allocate(bm_.get(), id, prompt.data(), static_cast<int64_t>(prompt.size()), 0,
                                         &cached) == KVP_OK) {
        if (cached < 0 || cached % kBS != 0 || cached >= static_cast<int64_t>(prompt.size()))
          return p.Add("allocate returned a bad cached count");
        seqs_[id] = Seq{prompt, cached, false};
        if (cached > 0) ++prefix_hits_;
      }
    }
  }

  void Step(Problems& p) {
    Schedule(p);
    if (p.count.load()) return;
    CheckStats(p);
    // This step's work: the rest of a prefill (in chunks of up to 7 tokens) or one decode token.
    struct Work {
      uint64_t id;
      int64_t start, count;
    };
    std::vector<Work> work;
    for (auto& [id, s] : seqs_) {
      if (s.swapped) continue;
      int64_t n = static_cast<int64_t>(s.tokens.size());
      if (s.computed == n) {  // decode: append one token (copy on write after a fork)
        const int32_t token = Uniform(0, 99);
        kvp_block_copy copy{};
        int32_t needed = -1;
        if (api.kvp_block_manager_append(bm_.get(), id, &token, 1, &copy, &needed) != KVP_OK) continue;
        if (needed) CHECK_OK(api.kvp_kv_cache_copy_blocks(cache_.get(), &copy, 1), p);
        s.tokens.push_back(token);
        ++n;
      }
      const int64_t count = std::min<int64_t>(n - s.computed, Uniform(1, 7));
      work.push_back({id, s.computed, count});
    }
    if (work.empty()) return;

    // The batch: query_start_loc, seq_lens, block tables, slot mapping, K/V and queries.
    const int32_t b = static_cast<int32_t>(work.size());
    std::vector<uint64_t> ids;
    std::vector<int32_t> qsl{0}, seq_lens(b);
    for (const Work& w : work) {
      ids.push_back(w.id);
      qsl.push_back(qsl.back() + static_cast<int32_t>(w.count));
    }
    const int32_t stride = 16;
    std::vector<int32_t> table(static_cast<size_t>(b) * stride), lens(b);
    CHECK_OK(api.kvp_block_manager_block_tables(bm_.get(), ids.data(), b, table.data(), stride, lens.data()), p);
    const int32_t tokens = qsl.back();
    std::vector<int64_t> slots(tokens);
    for (int32_t i = 0; i < b; ++i) {
      CHECK_OK(api.kvp_block_manager_slot_mapping(bm_.get(), work[i].id, work[i].start, work[i].count,
                                                  slots.data() + qsl[i]), p);
      seq_lens[i] = static_cast<int32_t>(work[i].start + work[i].count);  // K/V visible this step
    }
    kvp_batch batch{};
    batch.struct_size = sizeof batch;
    batch.num_seqs = b;
    batch.block_size = kBS;
    batch.query_start_loc = qsl.data();
    batch.seq_lens = seq_lens.data();
    batch.block_table = table.data();
    batch.block_table_stride = stride;
    batch.slot_mapping = slots.data();
    CHECK_OK(api.kvp_plan_update(plan_.get(), &batch), p);

    const int64_t kv_shape[3] = {tokens, kKH, kD}, q_shape[3] = {tokens, kQH, kD}, lse_shape[2] = {tokens, kQH};
    std::vector<float> k(static_cast<size_t>(tokens) * kKH * kD), v(k.size());
    std::vector<float> q(static_cast<size_t>(tokens) * kQH * kD), out(q.size()), lse(static_cast<size_t>(tokens) * kQH);
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    for (float& x : q) x = dist(rng_);
    for (int32_t layer = 0; layer < kLayers; ++layer) {
      for (int32_t i = 0; i < b; ++i) {
        const Seq& s = seqs_[work[i].id];
        for (int64_t t = 0; t < work[i].count; ++t) {
          const int64_t pos = work[i].start + t;
          for (int h = 0; h < kKH; ++h)
            for (int x = 0; x < kD; ++x) {
              const size_t at = ((static_cast<size_t>(qsl[i] + t)) * kKH + h) * kD + x;
              k[at] = KvValue(0, layer, s.tokens[pos], pos, h, x);
              v[at] = KvValue(1, layer, s.tokens[pos], pos, h, x);
            }
        }
      }
      DLTensor kt = MakeTensor(k.data(), kF32, kv_shape, 3), vt = MakeTensor(v.data(), kF32, kv_shape, 3);
      DLTensor qt = MakeTensor(q.data(), kF32, q_shape, 3), ot = MakeTensor(out.data(), kF32, q_shape, 3);
      DLTensor lt = MakeTensor(lse.data(), kF32, lse_shape, 2);
      CHECK_OK(api.kvp_attention_write_kv(attn_.get(), plan_.get(), cache_.get(), layer, &kt, &vt), p);
      CHECK_OK(api.kvp_attention_run(attn_.get(), plan_.get(), cache_.get(), layer, &qt, &ot, &lt), p);
      // Reference per sequence, from the K/V function over every position.
      for (int32_t i = 0; i < b; ++i) {
        const Seq& s = seqs_[work[i].id];
        const int len = seq_lens[i], qlen = static_cast<int>(work[i].count);
        std::vector<double> rk(static_cast<size_t>(len) * kKH * kD), rv(rk.size());
        for (int pos = 0; pos < len; ++pos)
          for (int h = 0; h < kKH; ++h)
            for (int x = 0; x < kD; ++x) {
              rk[(static_cast<size_t>(pos) * kKH + h) * kD + x] = KvValue(0, layer, s.tokens[pos], pos, h, x);
              rv[(static_cast<size_t>(pos) * kKH + h) * kD + x] = KvValue(1, layer, s.tokens[pos], pos, h, x);
            }
        std::vector<double> rq(q.begin() + static_cast<size_t>(qsl[i]) * kQH * kD,
                               q.begin() + static_cast<size_t>(qsl[i + 1]) * kQH * kD);
        std::vector<double> ro, rl;
        kvplug::testing::NaiveParams np{kQH, kKH, kD, 1.0 / std::sqrt(double(kD)), -1, 0};
        kvplug::testing::NaiveAttention(np, len, qlen, rq, rk, rv, &ro, &rl);
        for (size_t j = 0; j < ro.size(); ++j) {
          const double got = out[static_cast<size_t>(qsl[i]) * kQH * kD + j];
          if (!(std::abs(got - ro[j]) < 2e-5)) {
            return p.Add("seq " + std::to_string(work[i].id) + " layer " + std::to_string(layer) + ": out[" +
                         std::to_string(j) + "]=" + std::to_string(got) + " but the reference says " +
                         std::to_string(ro[j]));
          }
        }
        for (size_t j = 0; j < rl.size(); ++j)
          if (!(std::abs(lse[static_cast<size_t>(qsl[i]) * kQH + j] - rl[j]) < 2e-5)) return p.Add("lse differs");
        ++checked_;
      }
    }
    for (const Work& w : work) {
      Seq& s = seqs_[w.id];
      s.computed = w.start + w.count;
      CHECK_OK(api.kvp_block_manager_mark_computed(bm_.get(), w.id, s.computed), p);
    }
  }

  kvp_context* ctx_;
  std::mt19937_64 rng_;
  Handle<kvp_block_manager> bm_;
  Handle<kvp_kv_cache> cache_;
  Handle<kvp_plan> plan_;
  Handle<kvp_attention> attn_;
  bool ready_ = false;
  std::map<uint64_t, Seq> seqs_;
  uint64_t next_id_ = 1;
  int64_t checked_ = 0;
  int64_t prefix_hits_ = 0;
  const std::vector<int32_t> prefix_[3] = {{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11},
                                           {1, 2, 3, 4, 50, 51, 52, 53, 54},
                                           {60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72}};
};

constexpr int kThreads = 4;

TEST_F(Concurrency, OneHandleSetPerThread) {
  Problems problems;
  std::vector<int64_t> checked(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      Handle<kvp_context> ctx(NewContext(2));
      if (!ctx) return problems.Add("context_create failed");
      MiniEngine engine(ctx.get(), 1000 + t);
      engine.Init(problems);
      checked[t] = engine.Serve(40, problems);
    });
  for (auto& th : threads) th.join();
  ASSERT_EQ(problems.count.load(), 0) << problems.first;
  for (int t = 0; t < kThreads; ++t) EXPECT_GT(checked[t], 40) << "thread " << t << " checked too little";
}

TEST_F(Concurrency, EnginesSharingOneContextAndItsThreadPool) {
  // The context is only read by these calls: its thread pool serves the runs of every engine.
  for (int32_t pool_threads : {1, 3}) {
    Handle<kvp_context> ctx(NewContext(pool_threads));
    ASSERT_TRUE(ctx) << api.kvp_last_error();
    Problems problems;
    std::vector<int64_t> checked(kThreads, 0);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t)
      threads.emplace_back([&, t] {
        MiniEngine engine(ctx.get(), 2000 + t);
        engine.Init(problems);
        checked[t] = engine.Serve(30, problems);
      });
    for (auto& th : threads) th.join();
    ASSERT_EQ(problems.count.load(), 0) << "pool of " << pool_threads << ": " << problems.first;
    for (int t = 0; t < kThreads; ++t) EXPECT_GT(checked[t], 30) << "thread " << t;
  }
}

// ------------------------------------------------------------------------------------------------
// Shared read-only objects: one attention, one plan, one cache.
// ------------------------------------------------------------------------------------------------

struct SharedSetup {
  static constexpr int32_t kSeqs = 3, kBlocks = 32;
  Handle<kvp_context> ctx;
  Handle<kvp_kv_cache> cache;
  Handle<kvp_plan> plan;
  Handle<kvp_attention> attn;
  std::vector<int32_t> qsl{0, 5, 6, 13};  // a prefill chunk, a decode, a longer prefill
  std::vector<int32_t> seq_lens{9, 14, 7};
  std::vector<int32_t> table;
  int32_t tokens() const { return qsl.back(); }

  void Init(int32_t threads) {
    ctx.reset(NewContext(threads));
    ASSERT_TRUE(ctx) << api.kvp_last_error();
    const kvp_kv_cache_options co = CacheOptions(kBlocks, 0);
    kvp_kv_cache* c = nullptr;
    ASSERT_EQ(api.kvp_kv_cache_create(ctx.get(), &co, &c), KVP_OK) << api.kvp_last_error();
    cache.reset(c);
    const kvp_plan_options po = PlanOptions();
    kvp_plan* p = nullptr;
    ASSERT_EQ(api.kvp_plan_create(ctx.get(), &po, &p), KVP_OK) << api.kvp_last_error();
    plan.reset(p);
    const kvp_attention_options ao = AttnOptions();
    kvp_attention* a = nullptr;
    ASSERT_EQ(api.kvp_attention_create(ctx.get(), &ao, &a), KVP_OK) << api.kvp_last_error();
    attn.reset(a);
    // Scattered, disjoint blocks per sequence; every position of every layer written.
    const int32_t stride = 4;
    table.assign(kSeqs * stride, -1);
    int32_t next = 0;
    for (int32_t s = 0; s < kSeqs; ++s)
      for (int32_t j = 0; j < (seq_lens[s] + kBS - 1) / kBS; ++j) table[s * stride + j] = (next++ * 7) % kBlocks;
    std::vector<int64_t> slots;
    std::vector<float> k, v;
    for (int32_t s = 0; s < kSeqs; ++s)
      for (int32_t pos = 0; pos < seq_lens[s]; ++pos) {
        slots.push_back(int64_t{table[s * stride + pos / kBS]} * kBS + pos % kBS);
        for (int h = 0; h < kKH; ++h)
          for (int x = 0; x < kD; ++x) {
            k.push_back(KvValue(0, 0, s, pos, h, x));
            v.push_back(KvValue(1, 0, s, pos, h, x));
          }
      }
    const int64_t n = static_cast<int64_t>(slots.size());
    const int64_t kv_shape[3] = {n, kKH, kD}, slot_shape[1] = {n};
    DLTensor kt = MakeTensor(k.data(), kF32, kv_shape, 3), vt = MakeTensor(v.data(), kF32, kv_shape, 3);
    DLTensor st = MakeTensor(slots.data(), kI64, slot_shape, 1);
    for (int32_t layer = 0; layer < kLayers; ++layer)
      ASSERT_EQ(api.kvp_kv_cache_write(cache.get(), layer, &kt, &vt, &st), KVP_OK) << api.kvp_last_error();
    kvp_batch b{};
    b.struct_size = sizeof b;
    b.num_seqs = kSeqs;
    b.block_size = kBS;
    b.query_start_loc = qsl.data();
    b.seq_lens = seq_lens.data();
    b.block_table = table.data();
    b.block_table_stride = stride;
    ASSERT_EQ(api.kvp_plan_update(plan.get(), &b), KVP_OK) << api.kvp_last_error();
  }

  // One run of `layer` over `q` into fresh buffers.
  kvp_status Run(int32_t layer, const std::vector<float>& q, std::vector<float>* out, std::vector<float>* lse) const {
    const int64_t q_shape[3] = {tokens(), kQH, kD}, lse_shape[2] = {tokens(), kQH};
    out->assign(q.size(), -7.0f);
    lse->assign(static_cast<size_t>(tokens()) * kQH, -7.0f);
    DLTensor qt = MakeTensor(const_cast<float*>(q.data()), kF32, q_shape, 3);
    DLTensor ot = MakeTensor(out->data(), kF32, q_shape, 3), lt = MakeTensor(lse->data(), kF32, lse_shape, 2);
    return api.kvp_attention_run(attn.get(), plan.get(), cache.get(), layer, &qt, &ot, &lt);
  }
};

TEST_F(Concurrency, SharedAttentionPlanAndCacheGiveTheSingleThreadedResult) {
  for (int32_t pool_threads : {1, 2, 4}) {
    SharedSetup s;
    ASSERT_NO_FATAL_FAILURE(s.Init(pool_threads));
    // Per thread its own queries; the expected outputs come from single-threaded runs first.
    std::vector<std::vector<float>> queries(kThreads), want_out(kThreads * kLayers), want_lse(kThreads * kLayers);
    std::mt19937 rng(5);
    std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
    for (int t = 0; t < kThreads; ++t) {
      queries[t].resize(static_cast<size_t>(s.tokens()) * kQH * kD);
      for (float& x : queries[t]) x = dist(rng);
      for (int32_t layer = 0; layer < kLayers; ++layer)
        ASSERT_EQ(s.Run(layer, queries[t], &want_out[t * kLayers + layer], &want_lse[t * kLayers + layer]), KVP_OK)
            << api.kvp_last_error();
    }
    Problems problems;
    std::atomic<int> go{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t)
      threads.emplace_back([&, t] {
        go.fetch_add(1);
        while (go.load() < kThreads) std::this_thread::yield();  // start together
        std::vector<float> out, lse;
        for (int i = 0; i < 40; ++i) {
          const int32_t layer = (i + t) % kLayers;
          if (s.Run(layer, queries[t], &out, &lse) != KVP_OK) return problems.Add(api.kvp_last_error());
          if (out != want_out[t * kLayers + layer] || lse != want_lse[t * kLayers + layer])
            return problems.Add("thread " + std::to_string(t) + " run " + std::to_string(i) +
                                ": output differs from the single-threaded run");
        }
      });
    for (auto& th : threads) th.join();
    ASSERT_EQ(problems.count.load(), 0) << "pool of " << pool_threads << ": " << problems.first;
  }
}

TEST_F(Concurrency, ContextCreationAndDestructionFromManyThreads) {
  // Thread pools start and stop while other threads run on their own contexts.
  Problems problems;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < 8; ++i) {
        SharedSetup s;
        s.ctx.reset(NewContext(1 + (i + t) % 3));
        if (!s.ctx) return problems.Add("context_create failed");
        s.ctx.reset();
        // A full setup and a run, then everything destroyed (pool threads joined).
        SharedSetup full;
        full.Init(1 + (i + t) % 3);
        if (!full.attn) return problems.Add("setup failed");
        std::vector<float> q(static_cast<size_t>(full.tokens()) * kQH * kD, 0.25f), out, lse;
        if (full.Run(i % kLayers, q, &out, &lse) != KVP_OK) return problems.Add(api.kvp_last_error());
        for (float x : out)
          if (!std::isfinite(x)) return problems.Add("non-finite output");
      }
    });
  for (auto& th : threads) th.join();
  ASSERT_EQ(problems.count.load(), 0) << problems.first;
}

// ------------------------------------------------------------------------------------------------
// Block manager: read-only queries from several threads at once.
// ------------------------------------------------------------------------------------------------

TEST_F(Concurrency, BlockManagerReadOnlyQueriesRunTogether) {
  kvp_block_manager_options bo{};
  bo.struct_size = sizeof bo;
  bo.block_size = kBS;
  bo.num_device_blocks = 64;
  bo.num_host_blocks = 16;
  bo.enable_prefix_caching = 1;
  bo.num_state_slots = 16;
  kvp_block_manager* raw = nullptr;
  ASSERT_EQ(api.kvp_block_manager_create(&bo, &raw), KVP_OK) << api.kvp_last_error();
  Handle<kvp_block_manager> bm(raw);
  std::vector<uint64_t> ids;
  std::vector<std::vector<int32_t>> prompts;
  for (uint64_t id = 1; id <= 8; ++id) {
    std::vector<int32_t> prompt;
    for (int i = 0; i < static_cast<int>(3 + 2 * id); ++i) prompt.push_back(i < 8 ? i : static_cast<int>(id * 100 + i));
    ASSERT_EQ(api.kvp_block_manager_allocate(bm.get(), id, prompt.data(), static_cast<int64_t>(prompt.size()), 0,
                                             nullptr), KVP_OK) << api.kvp_last_error();
    ASSERT_EQ(api.kvp_block_manager_mark_computed(bm.get(), id, static_cast<int64_t>(prompt.size())), KVP_OK);
    ids.push_back(id);
    prompts.push_back(prompt);
  }
  ASSERT_EQ(api.kvp_block_manager_fork(bm.get(), 3, 9), KVP_OK);
  ids.push_back(9);
  prompts.push_back(prompts[2]);
  kvp_block_copy plan[16];
  int32_t n = 0;
  ASSERT_EQ(api.kvp_block_manager_swap_out(bm.get(), 5, plan, 16, &n), KVP_OK);

  // What every query answers, single-threaded.
  struct Answers {
    kvp_block_manager_stats stats{};
    std::vector<int32_t> tables, lens;
    std::vector<std::vector<int64_t>> slots;
    std::vector<int32_t> state_slots, swapped;
    std::vector<int> verdicts;
    bool operator==(const Answers& o) const {
      return std::memcmp(&stats, &o.stats, sizeof stats) == 0 && tables == o.tables && lens == o.lens &&
             slots == o.slots && state_slots == o.state_slots && swapped == o.swapped && verdicts == o.verdicts;
    }
  };
  std::vector<uint64_t> resident;
  for (uint64_t id : ids)
    if (id != 5) resident.push_back(id);
  auto ask = [&](Answers* a) -> bool {
    a->stats.struct_size = sizeof a->stats;
    if (api.kvp_block_manager_stats_get(bm.get(), &a->stats) != KVP_OK) return false;
    a->tables.assign(resident.size() * 8, 0);
    a->lens.assign(resident.size(), 0);
    if (api.kvp_block_manager_block_tables(bm.get(), resident.data(), static_cast<int32_t>(resident.size()),
                                           a->tables.data(), 8, a->lens.data()) != KVP_OK)
      return false;
    a->slots.clear();
    a->state_slots.clear();
    a->swapped.clear();
    a->verdicts.clear();
    for (size_t i = 0; i < ids.size(); ++i) {
      int64_t len = 0;
      int32_t slot = -2, sw = -1, can = -1;
      if (api.kvp_block_manager_num_tokens(bm.get(), ids[i], &len) != KVP_OK) return false;
      if (api.kvp_block_manager_state_slot(bm.get(), ids[i], &slot) != KVP_OK) return false;
      if (api.kvp_block_manager_is_swapped(bm.get(), ids[i], &sw) != KVP_OK) return false;
      a->state_slots.push_back(slot);
      a->swapped.push_back(sw);
      if (sw) continue;
      std::vector<int64_t> s(static_cast<size_t>(len));
      if (api.kvp_block_manager_slot_mapping(bm.get(), ids[i], 0, len, s.data()) != KVP_OK) return false;
      a->slots.push_back(std::move(s));
      if (api.kvp_block_manager_can_append(bm.get(), ids[i], 3, &can) != KVP_OK) return false;
      a->verdicts.push_back(can);
      kvp_alloc_verdict v;
      if (api.kvp_block_manager_can_allocate(bm.get(), prompts[i].data(), static_cast<int64_t>(prompts[i].size()), 0,
                                             &v) != KVP_OK)
        return false;
      a->verdicts.push_back(v);
    }
    return true;
  };
  Answers want;
  ASSERT_TRUE(ask(&want)) << api.kvp_last_error();
  Problems problems;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&] {
      for (int i = 0; i < 200; ++i) {
        Answers got;
        if (!ask(&got)) return problems.Add(api.kvp_last_error());
        if (!(got == want)) return problems.Add("a concurrent query answered differently");
      }
    });
  for (auto& th : threads) th.join();
  ASSERT_EQ(problems.count.load(), 0) << problems.first;
}

// ------------------------------------------------------------------------------------------------
// kvp_last_error is thread-local; config parsing and creation run from several threads.
// ------------------------------------------------------------------------------------------------

TEST_F(Concurrency, LastErrorIsPerThread) {
  Problems problems;
  std::atomic<int> go{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 2 * kThreads; ++t)
    threads.emplace_back([&, t] {
      if (std::string(api.kvp_last_error()) != "") return problems.Add("a fresh thread sees a message");
      go.fetch_add(1);
      while (go.load() < 2 * kThreads) std::this_thread::yield();
      Handle<kvp_block_manager> bm;
      for (int i = 0; i < 300; ++i) {
        // A failure naming a value unique to this thread and iteration...
        const int32_t bad = -(100000 * (t + 1) + i);
        const char* name = nullptr;
        if (api.kvp_backend_name(bad, &name) != KVP_ERR_OUT_OF_RANGE) return problems.Add("backend_name did not fail");
        const std::string want = "index=" + std::to_string(bad) + " ";
        // ... survives successful calls of this thread and failures of the others.
        int32_t count = 0;
        if (api.kvp_backend_count(&count) != KVP_OK) return problems.Add("backend_count failed");
        const std::string got = api.kvp_last_error();
        if (got.find(want) == std::string::npos || got.rfind("kvp_backend_name:", 0) != 0)
          return problems.Add("thread " + std::to_string(t) + " expected \"" + want + "\" but reads \"" + got + "\"");
        // A different entry point's failure replaces it, in this thread only.
        if (api.kvp_block_manager_free(nullptr, static_cast<uint64_t>(t)) != KVP_ERR_INVALID_ARGUMENT)
          return problems.Add("free(NULL) did not fail");
        if (std::string(api.kvp_last_error()).rfind("kvp_block_manager_free:", 0) != 0)
          return problems.Add("message not replaced by the later failure");
      }
    });
  for (auto& th : threads) th.join();
  ASSERT_EQ(problems.count.load(), 0) << problems.first;
}

TEST_F(Concurrency, ConfigParsingAndAttentionCreationFromManyThreads) {
  Handle<kvp_context> ctx(NewContext(1));
  ASSERT_TRUE(ctx);
  Problems problems;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < 25; ++i) {
        const std::string good = "{\"backend_config_type\": \"DenseConfig\", \"backend_config\": {\"window_left\": " +
                                 std::to_string(t * 100 + i) + "}}";
        const std::string bad = "{\"backend_config_type\": \"DenseConfig\", \"backend_config\": {\"window_lef\": 1}}";
        if (api.kvp_config_check("dense", KVP_CONFIG_JSON, good.data(), good.size()) != KVP_OK)
          return problems.Add(std::string("good config refused: ") + api.kvp_last_error());
        if (api.kvp_config_check("dense", KVP_CONFIG_JSON, bad.data(), bad.size()) != KVP_ERR_INVALID_CONFIG)
          return problems.Add("bad config accepted");
        if (std::string(api.kvp_last_error()).rfind("kvp_config_check:", 0) != 0)
          return problems.Add("config_check's message lost");
        kvp_attention_options o = AttnOptions();
        o.config_format = KVP_CONFIG_JSON;
        o.config = good.data();
        o.config_size = good.size();
        kvp_attention* a = nullptr;
        if (api.kvp_attention_create(ctx.get(), &o, &a) != KVP_OK)
          return problems.Add(std::string("attention_create: ") + api.kvp_last_error());
        api.kvp_attention_destroy(a);
        int32_t count = 0;
        const char* name = nullptr;
        kvp_backend_info info{};
        info.struct_size = sizeof info;
        if (api.kvp_backend_count(&count) != KVP_OK || count < 1 || api.kvp_backend_name(0, &name) != KVP_OK ||
            api.kvp_backend_info_get(name, &info) != KVP_OK || std::string(info.name) != name)
          return problems.Add("backend registry answers differ");
      }
    });
  for (auto& th : threads) th.join();
  ASSERT_EQ(problems.count.load(), 0) << problems.first;
}

}  // namespace
