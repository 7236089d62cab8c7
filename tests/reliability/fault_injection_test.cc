// Fault injection: every allocation of a scenario is made to fail in turn, through the C entry points
// compiled into this test together with the internal libraries (not the .so: its only exports are
// kvp_*, so nothing test-only can be reached through it).
//
// Two sources of failure:
//  - this binary replaces the global operator new/delete: allocation n (counted from arming) throws
//    std::bad_alloc (or returns NULL for the nothrow forms), once ("one") or with every later one
//    too ("sticky": the error path itself runs out of memory);
//  - the library's hook (kvplug/kv_cache/alloc_hook.h) fails its n-th explicit allocation point:
//    cache pages, state slots, the cache object, plan device mirrors and CPU worker threads.
// For each n the call must return KVP_ERR_OUT_OF_MEMORY, leave everything observable as it was
// (block manager stats, tables, invariants; cache bytes; output arguments untouched), and the same
// call must then succeed and leave exactly the state of a run without injection. Leaks are the
// sanitizer build's to find (.ci/sanitize.sh runs this test under ASan with detect_leaks=1).
// Also checked: plan updates, K/V writes and attention runs allocate nothing.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "fmt/format.h"
#include "internal.h"  // the handles' layout: invariants and bytes are checked from the inside
#include "kvplug/kv_cache/alloc_hook.h"
#include "kvplug/kvplug.h"

// ------------------------------------------------------------------------------------------------
// Global operator new/delete with a failure countdown.
// ------------------------------------------------------------------------------------------------

namespace {
std::atomic<bool> g_armed{false};
std::atomic<bool> g_sticky{false};
std::atomic<bool> g_fired{false};
std::atomic<int64_t> g_countdown{-1};
std::atomic<int64_t> g_seen{0};

bool FailThisAllocation() {
  if (!g_armed.load(std::memory_order_relaxed)) return false;
  g_seen.fetch_add(1, std::memory_order_relaxed);
  if (g_sticky.load(std::memory_order_relaxed) && g_fired.load(std::memory_order_relaxed)) return true;
  if (g_countdown.fetch_sub(1, std::memory_order_relaxed) == 0) {
    g_fired.store(true, std::memory_order_relaxed);
    return true;
  }
  return false;
}

void* Allocate(size_t n) {
  if (FailThisAllocation()) return nullptr;
  return std::malloc(n ? n : 1);
}
void* AllocateAligned(size_t n, size_t align) {
  if (FailThisAllocation()) return nullptr;
  return std::aligned_alloc(align, (n + align - 1) / align * align);
}
}  // namespace

// Every form below pairs malloc/aligned_alloc with free, which GCC cannot see through.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"

void* operator new(size_t n) {
  if (void* p = Allocate(n)) return p;
  throw std::bad_alloc();
}
void* operator new[](size_t n) {
  if (void* p = Allocate(n)) return p;
  throw std::bad_alloc();
}
void* operator new(size_t n, const std::nothrow_t&) noexcept { return Allocate(n); }
void* operator new[](size_t n, const std::nothrow_t&) noexcept { return Allocate(n); }
void* operator new(size_t n, std::align_val_t a) {
  if (void* p = AllocateAligned(n, static_cast<size_t>(a))) return p;
  throw std::bad_alloc();
}
void* operator new[](size_t n, std::align_val_t a) {
  if (void* p = AllocateAligned(n, static_cast<size_t>(a))) return p;
  throw std::bad_alloc();
}
void* operator new(size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return AllocateAligned(n, static_cast<size_t>(a));
}
void* operator new[](size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return AllocateAligned(n, static_cast<size_t>(a));
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }

// LeakSanitizer (the ASan build): FlatBuffers' IDL parser (2.0.8) leaks the definitions it was
// building when an allocation inside it fails, and kvplug then leaks the parser on purpose (see
// abi/src/config.cc). Those leaks are FlatBuffers'; any other leak is still reported.
extern "C" __attribute__((used, visibility("default"))) const char* __lsan_default_suppressions() {
  return "leak:flatbuffers::Parser::\nleak:libflatbuffers.so\n";
}

namespace {

enum class Mode { kOne, kSticky, kHook };
const char* ModeName(Mode m) { return m == Mode::kOne ? "one" : m == Mode::kSticky ? "sticky" : "hook"; }

void Arm(Mode mode, int64_t n) {
  if (mode == Mode::kHook) {
    kvplug::SetAllocationFailureCountdown(n);
    return;
  }
  g_fired.store(false);
  g_sticky.store(mode == Mode::kSticky);
  g_countdown.store(n);
  g_seen.store(0);
  g_armed.store(true);
}

// Returns whether the injected failure fired.
bool Disarm(Mode mode) {
  if (mode == Mode::kHook) {
    const bool fired = kvplug::AllocationFailureCountdown() < 0;
    kvplug::SetAllocationFailureCountdown(-1);
    return fired;
  }
  g_armed.store(false);
  return g_fired.load();
}

// Allocations made by `f` (nothing fails).
int64_t CountAllocations(const std::function<void()>& f) {
  Arm(Mode::kOne, INT64_MAX);
  f();
  Disarm(Mode::kOne);
  return g_seen.load();
}

// ------------------------------------------------------------------------------------------------
// The world a scenario works on, and everything observable about it.
// ------------------------------------------------------------------------------------------------

template <class T>
T* Sentinel() {
  return reinterpret_cast<T*>(uintptr_t{0x5e});
}

struct World {
  kvp_context* ctx = nullptr;
  kvp_block_manager* bm = nullptr;
  kvp_kv_cache* cache = nullptr;
  kvp_plan* plan = nullptr;
  kvp_attention* attn = nullptr;
  // Output arguments of creation calls: untouched (the sentinel) unless the call succeeds.
  kvp_context* new_ctx = Sentinel<kvp_context>();
  kvp_block_manager* new_bm = Sentinel<kvp_block_manager>();
  kvp_kv_cache* new_cache = Sentinel<kvp_kv_cache>();
  kvp_plan* new_plan = Sentinel<kvp_plan>();
  kvp_attention* new_attn = Sentinel<kvp_attention>();
  std::vector<uint64_t> seq_ids;          // sequences whose state is observed
  std::vector<float> external;            // caller-owned cache pages (create_from_tensors)
  std::vector<int32_t> tokens;            // token ids the call under test passes (prepared by the setup)
  // Outputs of the call under test, recorded without allocating (the call runs under injection).
  int64_t outputs[48] = {};
  int num_outputs = 0;

  World() = default;
  World(const World&) = delete;
  ~World() {
    kvp_attention_destroy(attn);
    kvp_plan_destroy(plan);
    kvp_kv_cache_destroy(cache);
    kvp_block_manager_destroy(bm);
    if (new_attn != Sentinel<kvp_attention>()) kvp_attention_destroy(new_attn);
    if (new_plan != Sentinel<kvp_plan>()) kvp_plan_destroy(new_plan);
    if (new_cache != Sentinel<kvp_kv_cache>()) kvp_kv_cache_destroy(new_cache);
    if (new_bm != Sentinel<kvp_block_manager>()) kvp_block_manager_destroy(new_bm);
    if (new_ctx != Sentinel<kvp_context>()) kvp_context_destroy(new_ctx);
    kvp_context_destroy(ctx);
  }
};

std::string ObserveManager(const kvp_block_manager* bm, const std::vector<uint64_t>& ids) {
  std::string s;
  if (absl::Status inv = bm->manager->CheckInvariants(); !inv.ok()) s += "INVARIANTS BROKEN: " + inv.ToString() + "\n";
  kvp_block_manager_stats st{};
  st.struct_size = sizeof st;
  if (kvp_block_manager_stats_get(bm, &st) != KVP_OK) return s + "stats_get failed";
  if (st.num_free_blocks + st.num_cached_free_blocks + st.num_used_blocks != st.num_device_blocks)
    s += "STATS DO NOT ADD UP\n";
  s += fmt::format("stats free={} cached={} used={} host_free={} seqs={} swapped={} queried={} hits={} evictions={}\n",
                   st.num_free_blocks, st.num_cached_free_blocks, st.num_used_blocks, st.num_free_host_blocks,
                   st.num_sequences, st.num_swapped_sequences, st.prefix_queried_blocks, st.prefix_hit_blocks,
                   st.num_evictions);
  for (uint64_t id : ids) {
    int64_t n = -1;
    int32_t swapped = -1, slot = -2, blocks[64], nb = -1;
    const kvp_status found = kvp_block_manager_num_tokens(bm, id, &n);
    s += fmt::format("seq {}: ", id);
    if (found != KVP_OK) {
      s += fmt::format("status {}\n", static_cast<int>(found));
      continue;
    }
    kvp_block_manager_is_swapped(bm, id, &swapped);
    kvp_block_manager_state_slot(bm, id, &slot);
    s += fmt::format("tokens={} swapped={} slot={} table=", n, swapped, slot);
    if (!swapped && kvp_block_manager_block_table(bm, id, blocks, 64, &nb) == KVP_OK)
      for (int32_t i = 0; i < nb; ++i) s += fmt::format("{},", blocks[i]);
    s += "\n";
  }
  return s;
}

// A hash of every byte of the cache (device pages, host pages, state slots).
std::string ObserveCache(const kvp_kv_cache* c) {
  const auto& o = c->cache->options();
  uint64_t h = 1469598103934665603ULL;
  auto mix = [&](const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ULL;
  };
  const size_t esize = kvplug::DTypeSize(o.dtype);
  for (int32_t l = 0; l < o.num_layers; ++l) {
    const auto& d = c->cache->layer(l);
    const auto& hl = c->cache->host_layer(l);
    // Walk rows, so caller-owned pages with any strides are covered.
    for (int kv = 0; kv < 2; ++kv)
      for (int64_t b = 0; b < d.num_blocks; ++b)
        for (int64_t p = 0; p < d.block_size; ++p)
          for (int64_t hd = 0; hd < d.num_kv_heads; ++hd) mix(d.Row(kv, b, p, hd), d.head_size * esize);
    if (hl.data) mix(hl.data, 2ull * hl.num_blocks * hl.block_size * hl.num_kv_heads * hl.head_size * esize);
  }
  for (int32_t l = 0; l < o.num_layers && o.state_bytes_per_layer > 0; ++l)
    for (int32_t s = 0; s < o.num_state_slots; ++s) {
      void* data = nullptr;
      int64_t n = 0;
      if (kvp_kv_cache_state(const_cast<kvp_kv_cache*>(c), l, s, &data, &n) == KVP_OK) mix(data, n);
    }
  return fmt::format("cache bytes {:#x}\n", h);
}

// Records an output argument of the call under test when the call wrote it (it was initialized to
// `sentinel`): a failed call must write none, so its record stays as before the call.
void Record(World& w, int64_t value, int64_t sentinel) {
  if (value != sentinel && w.num_outputs < 48) w.outputs[w.num_outputs++] = value;
}

std::string Observe(const World& w) {
  std::string s;
  if (w.bm) s += ObserveManager(w.bm, w.seq_ids);
  if (w.cache) s += ObserveCache(w.cache);
  s += fmt::format("outputs ctx={} bm={} cache={} plan={} attn={}\n", w.new_ctx != Sentinel<kvp_context>(),
                   w.new_bm != Sentinel<kvp_block_manager>(), w.new_cache != Sentinel<kvp_kv_cache>(),
                   w.new_plan != Sentinel<kvp_plan>(), w.new_attn != Sentinel<kvp_attention>());
  for (int i = 0; i < w.num_outputs; ++i) s += fmt::format("{},", w.outputs[i]);
  return s;
}

// ------------------------------------------------------------------------------------------------
// The walk.
// ------------------------------------------------------------------------------------------------

using SetupFn = std::function<void(World&)>;
using Op = std::function<kvp_status(World&)>;

struct Tally {
  int64_t scenarios = 0;
  int64_t points[3] = {0, 0, 0};  // per Mode: allocations made to fail
};
Tally g_tally;

// Totals at the end of the run.
class TallyPrinter : public ::testing::Environment {
 public:
  void TearDown() override {
    std::printf("fault injection: %lld scenarios, %lld operator-new failure points (each also walked sticky), "
                "%lld library hook points\n",
                static_cast<long long>(g_tally.scenarios), static_cast<long long>(g_tally.points[0]),
                static_cast<long long>(g_tally.points[2]));
  }
};
[[maybe_unused]] ::testing::Environment* const g_tally_printer = ::testing::AddGlobalTestEnvironment(new TallyPrinter);

// Fails allocation n = 0, 1, ... of `op` on a fresh world each time, until `op` runs to the end with
// no failure left to inject. Returns the number of allocations walked.
int64_t Walk(const std::string& name, Mode mode, const SetupFn& setup, const Op& op) {
  World ref;
  setup(ref);
  if (::testing::Test::HasFatalFailure()) return 0;
  EXPECT_EQ(op(ref), KVP_OK) << name << ": the call fails without injection: " << kvp_last_error();
  const std::string want_after = Observe(ref);
  for (int64_t n = 0; n < 100000; ++n) {
    World w;
    setup(w);
    const std::string before = Observe(w);
    Arm(mode, n);
    const kvp_status s = op(w);
    const bool fired = Disarm(mode);
    const std::string where = fmt::format("{} ({} allocation {})", name, ModeName(mode), n);
    if (!fired) {
      EXPECT_EQ(s, KVP_OK) << where << ": " << kvp_last_error();
      EXPECT_EQ(Observe(w), want_after) << where;
      g_tally.points[static_cast<int>(mode)] += n;
      return n;
    }
    EXPECT_EQ(s, KVP_ERR_OUT_OF_MEMORY) << where << " returned " << kvp_status_string(s) << ": " << kvp_last_error();
    EXPECT_EQ(Observe(w), before) << where << ": a failed call changed the state";
    // Usable afterwards: the same call succeeds and leaves what an uninjected run leaves.
    EXPECT_EQ(op(w), KVP_OK) << where << ": the retry failed: " << kvp_last_error();
    EXPECT_EQ(Observe(w), want_after) << where << ": the retry left a different state";
    if (::testing::Test::HasFailure()) return n;
  }
  ADD_FAILURE() << name << ": more than 100000 allocations";
  return 0;
}

// Walks `op` in every mode and prints the number of allocation points.
void WalkAll(const std::string& name, const SetupFn& setup, const Op& op, bool hook = false) {
  ++g_tally.scenarios;
  const int64_t one = Walk(name, Mode::kOne, setup, op);
  if (::testing::Test::HasFailure()) return;
  const int64_t sticky = Walk(name, Mode::kSticky, setup, op);
  if (::testing::Test::HasFailure()) return;
  EXPECT_EQ(one, sticky) << name;
  int64_t hooks = 0;
  if (hook) hooks = Walk(name, Mode::kHook, setup, op);
  std::printf("  %-44s %4lld allocations, %2lld hook points\n", name.c_str(), static_cast<long long>(one),
              static_cast<long long>(hooks));
}

// ------------------------------------------------------------------------------------------------
// Building blocks of the scenarios.
// ------------------------------------------------------------------------------------------------

constexpr int32_t kBS = 4, kLayers = 2, kKH = 2, kQH = 4, kD = 32;

kvp_context_options ContextOptions(int32_t threads) {
  kvp_context_options o{};
  o.struct_size = sizeof o;
  o.num_threads = threads;
  return o;
}

kvp_block_manager_options ManagerOptions(int32_t caching, int32_t state_slots) {
  kvp_block_manager_options o{};
  o.struct_size = sizeof o;
  o.block_size = kBS;
  o.num_device_blocks = 64;
  o.num_host_blocks = 12;
  o.enable_prefix_caching = caching;
  o.num_state_slots = state_slots;
  o.hash_seed = 3;
  return o;
}

kvp_kv_cache_options CacheOptions() {
  kvp_kv_cache_options o{};
  o.struct_size = sizeof o;
  o.num_layers = kLayers;
  o.num_blocks = 64;
  o.block_size = kBS;
  o.num_kv_heads = kKH;
  o.head_size = kD;
  o.dtype = KVP_DTYPE_FLOAT32;
  o.layout = KVP_LAYOUT_KV_FIRST;
  o.num_host_blocks = 12;
  o.num_state_slots = 3;
  o.state_bytes_per_layer = 64;
  return o;
}

kvp_attention_options AttentionOptions(const std::string* json = nullptr) {
  kvp_attention_options o{};
  o.struct_size = sizeof o;
  o.backend = "dense";
  o.num_q_heads = kQH;
  o.num_kv_heads = kKH;
  o.head_size = kD;
  o.kv_dtype = KVP_DTYPE_FLOAT32;
  if (json) {
    o.config_format = KVP_CONFIG_JSON;
    o.config = json->data();
    o.config_size = json->size();
  }
  return o;
}

kvp_plan_options PlanOptions() {
  kvp_plan_options o{};
  o.struct_size = sizeof o;
  o.max_num_seqs = 8;
  o.max_num_tokens = 64;
  o.max_num_blocks = 64;
  return o;
}

std::vector<int32_t> Prompt(int32_t n, int32_t salt) {
  std::vector<int32_t> p(n);
  for (int32_t i = 0; i < n; ++i) p[i] = i < 8 ? i : salt * 1000 + i;  // 8 shared tokens: 2 blocks
  return p;
}

#define SETUP_OK(expr)                                                                           \
  do {                                                                                           \
    const kvp_status s_ = (expr);                                                                \
    ASSERT_EQ(s_, KVP_OK) << #expr << ": " << kvp_status_string(s_) << ": " << kvp_last_error(); \
  } while (0)

// A manager with `num_seqs` sequences: prompts sharing two blocks, all computed, a fork of the first
// (when there are two or more), and with `swap` the second one swapped out.
void ManagerWorld(World& w, int32_t caching, int num_seqs, bool swap, int32_t state_slots = 16) {
  const kvp_block_manager_options o = ManagerOptions(caching, state_slots);
  SETUP_OK(kvp_block_manager_create(&o, &w.bm));
  for (int i = 0; i < num_seqs; ++i) {
    const uint64_t id = 100 + i;
    const auto p = Prompt(9 + i % 3, i);
    SETUP_OK(kvp_block_manager_allocate(w.bm, id, p.data(), static_cast<int64_t>(p.size()), 0, nullptr));
    SETUP_OK(kvp_block_manager_mark_computed(w.bm, id, static_cast<int64_t>(p.size())));
    w.seq_ids.push_back(id);
  }
  if (num_seqs >= 2) {
    SETUP_OK(kvp_block_manager_fork(w.bm, 100, 99));
    w.seq_ids.push_back(99);
  }
  if (swap && num_seqs >= 2) {
    kvp_block_copy plan[16];
    int32_t n = 0;
    SETUP_OK(kvp_block_manager_swap_out(w.bm, 101, plan, 16, &n));
  }
  for (uint64_t id : {7u, 8u, 9u}) w.seq_ids.push_back(id);  // ids the scenarios create
}

void FullWorld(World& w) {
  const kvp_context_options co = ContextOptions(2);
  SETUP_OK(kvp_context_create(&co, &w.ctx));
  ManagerWorld(w, 1, 3, true);
  const kvp_kv_cache_options cache_o = CacheOptions();
  SETUP_OK(kvp_kv_cache_create(w.ctx, &cache_o, &w.cache));
  const kvp_plan_options po = PlanOptions();
  SETUP_OK(kvp_plan_create(w.ctx, &po, &w.plan));
  const kvp_attention_options ao = AttentionOptions();
  SETUP_OK(kvp_attention_create(w.ctx, &ao, &w.attn));
}

// A step's batch over sequences 100 and 99 (their whole length: a prefill as one chunk).
struct Batch {
  std::vector<int32_t> qsl{0}, lens, table;
  std::vector<int64_t> slots;
  std::vector<float> k, v, q, out, lse;
  int64_t kv_shape[3], q_shape[3], lse_shape[2], slot_shape[1];
  DLTensor kt{}, vt{}, qt{}, ot{}, lt{}, st{};
  kvp_batch batch{};

  static DLTensor Make(void* data, DLDataType dt, int64_t* shape, int ndim) {
    DLTensor t{};
    t.data = data;
    t.device = {kDLCPU, 0};
    t.ndim = ndim;
    t.dtype = dt;
    t.shape = shape;
    return t;
  }

  void Build(const World& w) {
    const uint64_t ids[2] = {100, 99};
    constexpr int32_t stride = 8;
    table.assign(2 * stride, -1);
    lens.assign(2, 0);
    ASSERT_EQ(kvp_block_manager_block_tables(w.bm, ids, 2, table.data(), stride, lens.data()), KVP_OK);
    for (int i = 0; i < 2; ++i) {
      qsl.push_back(qsl.back() + lens[i]);
      std::vector<int64_t> s(lens[i]);
      ASSERT_EQ(kvp_block_manager_slot_mapping(w.bm, ids[i], 0, lens[i], s.data()), KVP_OK);
      slots.insert(slots.end(), s.begin(), s.end());
    }
    const int64_t t = qsl.back();
    k.resize(t * kKH * kD);
    v.resize(k.size());
    q.resize(t * kQH * kD);
    out.resize(q.size());
    lse.resize(t * kQH);
    for (size_t i = 0; i < k.size(); ++i) k[i] = static_cast<float>((i * 37) % 101) / 50.0f - 1.0f;
    for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>((i * 53) % 97) / 48.0f - 1.0f;
    for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<float>((i * 29) % 89) / 44.0f - 1.0f;
    kv_shape[0] = t, kv_shape[1] = kKH, kv_shape[2] = kD;
    q_shape[0] = t, q_shape[1] = kQH, q_shape[2] = kD;
    lse_shape[0] = t, lse_shape[1] = kQH;
    slot_shape[0] = t;
    kt = Make(k.data(), {kDLFloat, 32, 1}, kv_shape, 3);
    vt = Make(v.data(), {kDLFloat, 32, 1}, kv_shape, 3);
    qt = Make(q.data(), {kDLFloat, 32, 1}, q_shape, 3);
    ot = Make(out.data(), {kDLFloat, 32, 1}, q_shape, 3);
    lt = Make(lse.data(), {kDLFloat, 32, 1}, lse_shape, 2);
    st = Make(slots.data(), {kDLInt, 64, 1}, slot_shape, 1);
    batch.struct_size = sizeof batch;
    batch.num_seqs = 2;
    batch.block_size = kBS;
    batch.query_start_loc = qsl.data();
    batch.seq_lens = lens.data();
    batch.block_table = table.data();
    batch.block_table_stride = stride;
    batch.slot_mapping = slots.data();
  }
};

// ------------------------------------------------------------------------------------------------
// Scenarios
// ------------------------------------------------------------------------------------------------

TEST(FaultInjection, CreatingEveryHandle) {
  const SetupFn none = [](World&) {};
  WalkAll("context_create (4 threads)", none, [](World& w) {
    const kvp_context_options o = ContextOptions(4);
    return kvp_context_create(&o, &w.new_ctx);
  }, /*hook=*/true);
  for (int32_t caching : {0, 1}) {
    WalkAll(fmt::format("block_manager_create (caching {})", caching), none, [caching](World& w) {
      const kvp_block_manager_options o = ManagerOptions(caching, 4);
      return kvp_block_manager_create(&o, &w.new_bm);
    });
  }
  const SetupFn with_ctx = [](World& w) {
    const kvp_context_options o = ContextOptions(1);
    SETUP_OK(kvp_context_create(&o, &w.ctx));
  };
  WalkAll("kv_cache_create", with_ctx, [](World& w) {
    const kvp_kv_cache_options o = CacheOptions();
    return kvp_kv_cache_create(w.ctx, &o, &w.new_cache);
  }, true);
  WalkAll("kv_cache_create_from_tensors", [&](World& w) {
    with_ctx(w);
    w.external.assign(2ull * 64 * kBS * kKH * kD * kLayers, 0.5f);
  }, [](World& w) {
    const kvp_kv_cache_options o = CacheOptions();
    int64_t shape[5] = {2, 64, kBS, kKH, kD};
    DLTensor layers[kLayers];
    for (int l = 0; l < kLayers; ++l) {
      layers[l] = Batch::Make(w.external.data() + l * 2ull * 64 * kBS * kKH * kD, {kDLFloat, 32, 1}, shape, 5);
    }
    return kvp_kv_cache_create_from_tensors(w.ctx, &o, layers, kLayers, &w.new_cache);
  }, true);
  WalkAll("plan_create", with_ctx, [](World& w) {
    const kvp_plan_options o = PlanOptions();
    return kvp_plan_create(w.ctx, &o, &w.new_plan);
  }, true);
  WalkAll("attention_create", with_ctx, [](World& w) {
    const kvp_attention_options o = AttentionOptions();
    return kvp_attention_create(w.ctx, &o, &w.new_attn);
  });
  static const std::string json = R"({"backend_config_type": "DenseConfig", "backend_config": {"window_left": 5}})";
  WalkAll("attention_create (JSON config)", with_ctx, [](World& w) {
    const kvp_attention_options o = AttentionOptions(&json);
    return kvp_attention_create(w.ctx, &o, &w.new_attn);
  });
  WalkAll("config_check (JSON)", none, [](World&) {
    return kvp_config_check("dense", KVP_CONFIG_JSON, json.data(), json.size());
  });
}

// The calls below run under injection: the test itself allocates nothing there (token ids come
// from the setup, outputs go to fixed storage).
SetupFn WithTokens(SetupFn base, std::vector<int32_t> tokens) {
  return [base = std::move(base), tokens = std::move(tokens)](World& w) {
    base(w);
    w.tokens = tokens;
  };
}

kvp_status SwapCall(World& w, bool out, uint64_t id) {
  kvp_block_copy plan[16];
  int32_t n = -1;
  const kvp_status s = out ? kvp_block_manager_swap_out(w.bm, id, plan, 16, &n)
                           : kvp_block_manager_swap_in(w.bm, id, plan, 16, &n);
  Record(w, n, -1);
  for (int32_t i = 0; i < n && s == KVP_OK; ++i) {
    Record(w, plan[i].src, -1);
    Record(w, plan[i].dst, -1);
  }
  return s;
}

kvp_status AppendCall(World& w, uint64_t id) {
  kvp_block_copy copy{-1, -1};
  int32_t needed = -1;
  const kvp_status s = kvp_block_manager_append(w.bm, id, w.tokens.data(), static_cast<int64_t>(w.tokens.size()),
                                                &copy, &needed);
  Record(w, copy.src, -1);
  Record(w, copy.dst, -1);
  Record(w, needed, -1);
  return s;
}

TEST(FaultInjection, BlockManagerOperations) {
  for (int32_t caching : {0, 1}) {
    const std::string c = caching ? " +cache" : "";
    // Allocation into managers holding 0..9 sequences: the sequence table grows at some of them.
    for (int seqs = 0; seqs <= 9; ++seqs) {
      const SetupFn base = [=](World& w) { ManagerWorld(w, caching, seqs, false); };
      WalkAll(fmt::format("allocate after {} seqs{}", seqs, c), WithTokens(base, Prompt(11, 7)), [](World& w) {
        int64_t cached = -1;  // 2 blocks shared with the others, then private
        const kvp_status s = kvp_block_manager_allocate(w.bm, 7, w.tokens.data(), 11, 0, &cached);
        Record(w, cached, -1);
        return s;
      });
      if (seqs >= 1)
        WalkAll(fmt::format("fork after {} seqs{}", seqs, c), base,
                [](World& w) { return kvp_block_manager_fork(w.bm, 100, 8); });
    }
    const SetupFn world = [=](World& w) { ManagerWorld(w, caching, 3, true); };
    WalkAll("can_allocate" + c, WithTokens(world, Prompt(13, 9)), [](World& w) {
      kvp_alloc_verdict v;
      std::memset(&v, 0xff, sizeof v);  // not a verdict: a write shows (read back as raw bytes)
      const kvp_status s = kvp_block_manager_can_allocate(w.bm, w.tokens.data(), 13, 0, &v);
      int32_t raw;
      std::memcpy(&raw, &v, sizeof raw);
      Record(w, raw, -1);
      return s;
    });
    for (int32_t n : {1, 3, 4, 9}) {
      // Seq 99 shares every block with 100: its first append copies the last block (9 tokens).
      WalkAll(fmt::format("append {} to a forked seq{}", n, c), WithTokens(world, std::vector<int32_t>(n, 5)),
              [](World& w) { return AppendCall(w, 99); });
      // A second append to a sequence whose vectors hold exactly what they need.
      const SetupFn appended = [=](World& w) {
        world(w);
        w.tokens.assign(n, 6);
        kvp_block_copy copy;
        int32_t needed;
        SETUP_OK(kvp_block_manager_append(w.bm, 102, w.tokens.data(), n, &copy, &needed));
      };
      WalkAll(fmt::format("append {} after an append{}", n, c), appended, [](World& w) { return AppendCall(w, 102); });
    }
    WalkAll("mark_computed" + c, [=](World& w) {
      world(w);
      w.tokens.assign(9, 4);
      kvp_block_copy copy;
      int32_t needed;
      SETUP_OK(kvp_block_manager_append(w.bm, 102, w.tokens.data(), 9, &copy, &needed));
    }, [](World& w) { return kvp_block_manager_mark_computed(w.bm, 102, 20); });
    WalkAll("free" + c, world, [](World& w) { return kvp_block_manager_free(w.bm, 100); });
    WalkAll("free swapped" + c, world, [](World& w) { return kvp_block_manager_free(w.bm, 101); });
    WalkAll("swap_out" + c, world, [](World& w) { return SwapCall(w, true, 102); });
    WalkAll("swap_in" + c, world, [](World& w) { return SwapCall(w, false, 101); });
  }
  // Allocation without token ids (no prefix caching): the ABI stands zeros in.
  WalkAll("allocate without token ids", [](World& w) { ManagerWorld(w, 0, 2, false); },
          [](World& w) { return kvp_block_manager_allocate(w.bm, 7, nullptr, 13, 0, nullptr); });
}

TEST(FaultInjection, CacheAndAttentionOperations) {
  WalkAll("kv_cache_copy_blocks", FullWorld, [](World& w) {
    const kvp_block_copy copies[3] = {{0, 5}, {1, 6}, {2, 2}};
    return kvp_kv_cache_copy_blocks(w.cache, copies, 3);
  });
  // Pages with content first, so that copies are visible in the cache's bytes.
  const SetupFn written = [](World& w) {
    FullWorld(w);
    Batch b;
    ASSERT_NO_FATAL_FAILURE(b.Build(w));
    for (int32_t layer = 0; layer < kLayers; ++layer)
      SETUP_OK(kvp_kv_cache_write(w.cache, layer, &b.kt, &b.vt, &b.st));
    void* state = nullptr;
    int64_t bytes = 0;
    SETUP_OK(kvp_kv_cache_state(w.cache, 1, 0, &state, &bytes));
    std::memset(state, 0x3c, bytes);
  };
  WalkAll("kv_cache_copy_blocks (written)", written, [](World& w) {
    const kvp_block_copy copies[2] = {{0, 20}, {1, 21}};
    return kvp_kv_cache_copy_blocks(w.cache, copies, 2);
  });
  WalkAll("kv_cache_swap_out", written, [](World& w) {
    const kvp_block_copy out[2] = {{0, 3}, {2, 4}};
    return kvp_kv_cache_swap_out(w.cache, out, 2);
  });
  WalkAll("kv_cache_swap_in", written, [](World& w) {
    const kvp_block_copy in[2] = {{0, 30}, {1, 31}};
    return kvp_kv_cache_swap_in(w.cache, in, 2);
  });
  WalkAll("kv_cache_copy_state", written, [](World& w) { return kvp_kv_cache_copy_state(w.cache, 0, 2); });
}

TEST(FaultInjection, StepCallsAllocateNothing) {
  World w;
  FullWorld(w);
  Batch b;
  ASSERT_NO_FATAL_FAILURE(b.Build(w));
  // Attaching sizes the plan's step buffers for the attention once; every step after it is free.
  ASSERT_EQ(kvp_plan_attach(w.plan, w.attn), KVP_OK) << kvp_last_error();
  kvp_status s = KVP_ERR_INTERNAL;
  EXPECT_EQ(CountAllocations([&] { s = kvp_plan_update(w.plan, &b.batch); }), 0);
  ASSERT_EQ(s, KVP_OK) << kvp_last_error();
  for (int32_t layer = 0; layer < kLayers; ++layer) {
    EXPECT_EQ(CountAllocations([&] { s = kvp_attention_write_kv(w.attn, w.plan, w.cache, layer, &b.kt, &b.vt); }), 0);
    ASSERT_EQ(s, KVP_OK) << kvp_last_error();
    EXPECT_EQ(CountAllocations([&] { s = kvp_kv_cache_write(w.cache, layer, &b.kt, &b.vt, &b.st); }), 0);
    ASSERT_EQ(s, KVP_OK) << kvp_last_error();
    EXPECT_EQ(CountAllocations([&] { s = kvp_attention_run(w.attn, w.plan, w.cache, layer, &b.qt, &b.ot, &b.lt); }), 0);
    ASSERT_EQ(s, KVP_OK) << kvp_last_error();
  }
  // Block manager queries of a step.
  int32_t table[16], lens[2];
  const uint64_t ids[2] = {100, 99};
  int64_t slots[12];
  EXPECT_EQ(CountAllocations([&] { s = kvp_block_manager_block_tables(w.bm, ids, 2, table, 8, lens); }), 0);
  EXPECT_EQ(s, KVP_OK);
  EXPECT_EQ(CountAllocations([&] { s = kvp_block_manager_slot_mapping(w.bm, 100, 0, 9, slots); }), 0);
  EXPECT_EQ(s, KVP_OK);
  kvp_block_manager_stats st{};
  st.struct_size = sizeof st;
  EXPECT_EQ(CountAllocations([&] { s = kvp_block_manager_stats_get(w.bm, &st); }), 0);
  EXPECT_EQ(s, KVP_OK);
}

}  // namespace
