// Long randomized model test of kvplug::paged::BlockManager: 6 pool configurations x 2^19 random
// operations (3M in all, ~5 s in RelWithDebInfo; KVP_MODEL_OPS sets the count per configuration),
// each checked against a compact model of what the caller knows.
//
// The model holds every live sequence's tokens, how many of them are computed (K/V written), whether
// it is swapped out, and a fake K/V memory: one token id per device slot and per host slot. Writes go
// through SlotMapping, copy-on-write copies and swap plans move the fake memory as an engine moves
// K/V, so a prefix hit, a copy or a swap that serves the wrong block reads back a wrong token. The
// operations: allocate (prompts built from shared prefixes: prefix hits; with chunked prefill),
// allocate a duplicate of a fully computed sequence (the exact number of cached tokens is known when
// nothing was evicted since its blocks were found or published), append (copy on write after a
// fork), the rest of a chunked prefill, mark_computed (never backwards; out of range fails), fork,
// free, swap out and in, and calls on unknown ids. Checked after every operation: failed calls change neither stats nor
// tables, stats add up (free + cached_free + used == device blocks; used == the distinct blocks of
// resident tables; host blocks of swapped sequences == host blocks in use; sequence counts), the
// touched sequence reads back its tokens; every 256 operations, CheckInvariants() and every sequence.
// The configurations cover block sizes 1, 3, 4 and 8, prefix caching on and off, watermarks, state
// slots, no host blocks, and swap-ins that reuse device copies still cached (the plan then skips
// those blocks; the fake memory shows whether the reused blocks hold the right tokens). Swap-ins
// are not always followed by a mark: the blocks computed before the swap must be cached again by
// the swap-in itself (a duplicate then hits them all).
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstdio>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <vector>

#include "gtest/gtest.h"
#include "kvplug/paged_memory/block_manager.h"

namespace kvplug::paged {
namespace {

// Operations per configuration; KVP_MODEL_OPS overrides it (the sanitizer job runs fewer).
int OpsPerConfig() {
  static const int n = [] {
    const char* env = std::getenv("KVP_MODEL_OPS");
    return env && std::atoi(env) > 0 ? std::atoi(env) : 1 << 19;
  }();
  return n;
}
constexpr int32_t kPoison = -7;

struct Config {
  const char* name;
  int32_t block_size, device_blocks, host_blocks, state_slots;
  bool caching;
  double watermark;
  bool reuse;  // BlockManagerOptions::swap_in_reuses_cached_blocks
};

class Model {
 public:
  explicit Model(const Config& c, uint64_t seed) : c_(c), rng_(seed) {
    BlockManagerOptions o;
    o.block_size = c.block_size;
    o.num_device_blocks = c.device_blocks;
    o.num_host_blocks = c.host_blocks;
    o.enable_prefix_caching = c.caching;
    o.watermark = c.watermark;
    o.num_state_slots = c.state_slots;
    o.hash_seed = seed;
    o.swap_in_reuses_cached_blocks = c.reuse;
    auto m = BlockManager::Create(o);
    EXPECT_TRUE(m.ok()) << m.status();
    if (m.ok()) bm_ = std::move(*m);
    dev_.assign(static_cast<size_t>(c.device_blocks) * c.block_size, kPoison);
    host_.assign(static_cast<size_t>(c.host_blocks) * c.block_size, kPoison);
    for (int p = 0; p < 4; ++p) {
      std::vector<int32_t> prefix(U(1, 5 * c.block_size));
      for (int32_t& t : prefix) t = U(0, 30);
      prefixes_.push_back(std::move(prefix));
    }
  }

  void Run(int ops) {
    ASSERT_TRUE(bm_);
    for (int op = 0; op < ops; ++op) {
      const int live = static_cast<int>(seqs_.size());
      const int weights[] = {18, 4, 30, 8, 6, live > 12 ? 30 : live > 6 ? 12 : 4, 7, 8, 4, 2};
      std::discrete_distribution<int> pick(std::begin(weights), std::end(weights));
      touched_.reset();
      switch (pick(rng_)) {
        case 0: ASSERT_NO_FATAL_FAILURE(Allocate(Prompt(), U(0, 4) == 0 ? 1 : 0)) << "op " << op; break;
        case 1: ASSERT_NO_FATAL_FAILURE(DuplicateAllocate()) << "op " << op; break;
        case 2: ASSERT_NO_FATAL_FAILURE(Append()) << "op " << op; break;
        case 3: ASSERT_NO_FATAL_FAILURE(MarkComputed()) << "op " << op; break;
        case 4: ASSERT_NO_FATAL_FAILURE(Fork()) << "op " << op; break;
        case 5: ASSERT_NO_FATAL_FAILURE(Free()) << "op " << op; break;
        case 6: ASSERT_NO_FATAL_FAILURE(SwapOut()) << "op " << op; break;
        case 7: ASSERT_NO_FATAL_FAILURE(SwapIn()) << "op " << op; break;
        case 8: ASSERT_NO_FATAL_FAILURE(Unknown()) << "op " << op; break;
        default: ASSERT_NO_FATAL_FAILURE(FreeAll()) << "op " << op; break;
      }
      ASSERT_NO_FATAL_FAILURE(CheckStats()) << "after op " << op;
      if (touched_) { ASSERT_NO_FATAL_FAILURE(CheckContent(*touched_)) << "after op " << op; }
      if (op % 256 == 255) {
        const absl::Status inv = bm_->CheckInvariants();
        ASSERT_TRUE(inv.ok()) << "after op " << op << ": " << inv;
        for (const auto& [id, s] : seqs_) ASSERT_NO_FATAL_FAILURE(CheckContent(id)) << "after op " << op;
      }
    }
    ASSERT_NO_FATAL_FAILURE(FreeAll());
    const BlockManagerStats s = bm_->Stats();
    EXPECT_EQ(s.num_used_blocks, 0);
    EXPECT_EQ(s.num_free_host_blocks, c_.host_blocks);
    EXPECT_TRUE(bm_->CheckInvariants().ok());
  }

  void Print(double secs) const {
    const BlockManagerStats s = bm_->Stats();
    std::printf("%-26s %d ops in %.2f s: allocs %lld (failed %lld, with hits %lld, exact duplicates %lld), "
                "appends %lld (cow %lld, failed %lld), forks %lld, swaps out %lld in %lld (failed %lld, "
                "blocks reused %lld), prefix hit blocks %lld, evictions %lld\n",
                c_.name, OpsPerConfig(), secs, n_.allocs, n_.failed_allocs, n_.hit_allocs, n_.exact_dups, n_.appends,
                n_.cows, n_.failed_appends, n_.forks, n_.swap_outs, n_.swap_ins, n_.failed_swaps, n_.reused_blocks,
                static_cast<long long>(s.prefix_hit_blocks), static_cast<long long>(s.num_evictions));
  }

  struct Counters {
    long long allocs = 0, failed_allocs = 0, hit_allocs = 0, exact_dups = 0, appends = 0, cows = 0,
              failed_appends = 0, forks = 0, swap_outs = 0, swap_ins = 0, failed_swaps = 0, reused_blocks = 0;
  } n_;

 private:
  struct Seq {
    std::vector<int32_t> tokens;
    int64_t computed = 0;
    uint64_t key = 0;
    bool swapped = false;
    // Stats().num_evictions when its blocks' hashes were last all found or published (after its
    // allocation, or the mark after its swap in); while no eviction happens, every hash it found or
    // published stays in the prefix cache, so a duplicate of it hits every computed full block.
    int64_t evictions_at_publish = -1;
    std::vector<int32_t> host;  // while swapped: the host block of each table position
  };

  int32_t U(int32_t lo, int32_t hi) { return std::uniform_int_distribution<int32_t>(lo, hi)(rng_); }
  int32_t bs() const { return c_.block_size; }
  int64_t Blocks(int64_t tokens) const { return (tokens + bs() - 1) / bs(); }

  std::vector<int32_t> Prompt() {
    std::vector<int32_t> p;
    if (U(0, 9) < 8) {
      const auto& pre = prefixes_[U(0, static_cast<int32_t>(prefixes_.size()) - 1)];
      p.assign(pre.begin(), pre.begin() + U(1, static_cast<int32_t>(pre.size())));
    }
    for (int i = U(p.empty() ? 1 : 0, 2 * bs()); i > 0; --i) p.push_back(U(0, 30));
    return p;
  }

  std::optional<uint64_t> Pick(std::optional<bool> swapped = std::nullopt) {
    std::vector<uint64_t> ids;
    for (const auto& [id, s] : seqs_)
      if (!swapped || s.swapped == *swapped) ids.push_back(id);
    if (ids.empty()) return std::nullopt;
    return ids[U(0, static_cast<int32_t>(ids.size()) - 1)];
  }

  std::vector<int32_t> Table(uint64_t id) const {
    auto t = bm_->BlockTable(id);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? std::vector<int32_t>(t->begin(), t->end()) : std::vector<int32_t>();
  }

  static bool Same(const BlockManagerStats& a, const BlockManagerStats& b) {
    return a.num_free_blocks == b.num_free_blocks && a.num_cached_free_blocks == b.num_cached_free_blocks &&
           a.num_used_blocks == b.num_used_blocks && a.num_free_host_blocks == b.num_free_host_blocks &&
           a.num_sequences == b.num_sequences && a.num_swapped_sequences == b.num_swapped_sequences &&
           a.prefix_queried_blocks == b.prefix_queried_blocks && a.prefix_hit_blocks == b.prefix_hit_blocks &&
           a.num_evictions == b.num_evictions;
  }

  // Writes tokens [start, end) of `id` to the fake device memory through the slot mapping.
  void Write(uint64_t id, int64_t start, int64_t end) {
    if (end <= start) return;
    std::vector<int64_t> slots(end - start);
    ASSERT_TRUE(bm_->SlotMapping(id, start, end - start, absl::MakeSpan(slots)).ok());
    const auto& tokens = seqs_[id].tokens;
    for (int64_t p = start; p < end; ++p) {
      ASSERT_GE(slots[p - start], 0);
      ASSERT_LT(slots[p - start], static_cast<int64_t>(dev_.size()));
      dev_[slots[p - start]] = tokens[p];
    }
  }

  void Poison(int32_t block) { std::fill_n(dev_.begin() + int64_t{block} * bs(), bs(), kPoison); }

  void CheckContent(uint64_t id) {
    auto it = seqs_.find(id);
    if (it == seqs_.end() || it->second.swapped) return;
    const Seq& s = it->second;
    const auto table = Table(id);
    ASSERT_EQ(static_cast<int64_t>(table.size()), Blocks(static_cast<int64_t>(s.tokens.size())));
    for (int64_t p = 0; p < s.computed; ++p)
      ASSERT_EQ(dev_[int64_t{table[p / bs()]} * bs() + p % bs()], s.tokens[p])
          << "seq " << id << " position " << p << " of " << s.tokens.size() << " reads a wrong token";
  }

  void CheckStats() {
    const BlockManagerStats st = bm_->Stats();
    ASSERT_EQ(st.num_free_blocks + st.num_cached_free_blocks + st.num_used_blocks, c_.device_blocks);
    ASSERT_EQ(st.num_sequences, static_cast<int32_t>(seqs_.size()));
    std::set<int32_t> used;
    int32_t swapped = 0, host_used = 0;
    for (const auto& [id, s] : seqs_) {
      ASSERT_EQ(*bm_->NumTokens(id), static_cast<int64_t>(s.tokens.size()));
      if (s.swapped) {
        ++swapped;
        host_used += static_cast<int32_t>(Blocks(static_cast<int64_t>(s.tokens.size())));
        continue;
      }
      const auto table = bm_->BlockTable(id);
      ASSERT_TRUE(table.ok()) << table.status();
      used.insert(table->begin(), table->end());
    }
    ASSERT_EQ(st.num_used_blocks, static_cast<int32_t>(used.size()));
    ASSERT_EQ(st.num_swapped_sequences, swapped);
    ASSERT_EQ(st.num_free_host_blocks, c_.host_blocks - host_used);
  }

  // Allocates `prompt` as a new sequence and computes all or (chunked prefill) part of it.
  void Allocate(const std::vector<int32_t>& prompt, uint64_t key,
                std::optional<int64_t> exact_cached = std::nullopt) {
    const uint64_t id = next_id_++;
    const int64_t n = static_cast<int64_t>(prompt.size());
    const AllocVerdict verdict = bm_->CanAllocate(c_.caching ? absl::MakeConstSpan(prompt) : absl::Span<const int32_t>(),
                                                  n, key);
    const BlockManagerStats before = bm_->Stats();
    auto r = bm_->Allocate(id, prompt, key);
    ++n_.allocs;
    if (!r.ok()) {
      ASSERT_NE(verdict, AllocVerdict::kOk) << "CanAllocate said kOk: " << r.status();
      ASSERT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
      ASSERT_TRUE(Same(before, bm_->Stats()));
      ++n_.failed_allocs;
      return;
    }
    const int64_t cached = *r;
    ASSERT_EQ(cached % bs(), 0);
    ASSERT_GE(cached, 0);
    ASSERT_LT(cached, n);
    if (!c_.caching) { ASSERT_EQ(cached, 0); }
    if (exact_cached) {
      ASSERT_EQ(cached, *exact_cached) << "a duplicate of a computed sequence must hit all its full blocks";
      ++n_.exact_dups;
    }
    if (cached > 0) ++n_.hit_allocs;
    const auto table = Table(id);
    ASSERT_EQ(static_cast<int64_t>(table.size()), Blocks(n));
    for (int64_t i = cached / bs(); i < static_cast<int64_t>(table.size()); ++i) Poison(table[i]);
    seqs_[id] = Seq{prompt, cached, key, false, bm_->Stats().num_evictions, {}};
    const int64_t computed = U(0, 2) == 0 ? U(static_cast<int32_t>(cached), static_cast<int32_t>(n)) : n;
    ASSERT_NO_FATAL_FAILURE(Write(id, cached, computed));
    ASSERT_NO_FATAL_FAILURE(Mark(id, computed));
    touched_ = id;
  }

  void Mark(uint64_t id, int64_t computed) {
    Seq& s = seqs_[id];
    ASSERT_TRUE(bm_->MarkComputed(id, computed).ok());
    s.computed = std::max(s.computed, computed);
  }

  void DuplicateAllocate() {
    if (!c_.caching) return;
    std::vector<uint64_t> ids;
    const int64_t evictions = bm_->Stats().num_evictions;
    for (const auto& [id, s] : seqs_)
      if (!s.swapped && s.computed == static_cast<int64_t>(s.tokens.size()) && s.evictions_at_publish == evictions)
        ids.push_back(id);
    if (ids.empty()) return;
    const Seq s = seqs_[ids[U(0, static_cast<int32_t>(ids.size()) - 1)]];
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    int64_t full = n / bs();
    if (full == Blocks(n)) --full;  // at least one token is always computed
    ASSERT_NO_FATAL_FAILURE(Allocate(s.tokens, s.key, full * bs()));
  }

  void Append() {
    auto id = Pick();
    if (!id) return;
    Seq& s = seqs_[*id];
    const int32_t k = U(0, 3) ? 1 : U(2, 2 * bs() + 1);
    std::vector<int32_t> tokens(k);
    for (int32_t& t : tokens) t = U(0, 30);
    if (s.swapped) {
      ASSERT_EQ(bm_->Append(*id, tokens, k).status().code(), absl::StatusCode::kFailedPrecondition);
      return;
    }
    if (s.computed < static_cast<int64_t>(s.tokens.size())) {  // finish a chunked prefill first
      ASSERT_NO_FATAL_FAILURE(Write(*id, s.computed, static_cast<int64_t>(s.tokens.size())));
      ASSERT_NO_FATAL_FAILURE(Mark(*id, static_cast<int64_t>(s.tokens.size())));
      touched_ = *id;
      return;
    }
    const auto can = bm_->CanAppend(*id, k);
    ASSERT_TRUE(can.ok());
    const auto before_table = Table(*id);
    const BlockManagerStats before = bm_->Stats();
    auto r = bm_->Append(*id, c_.caching ? absl::MakeConstSpan(tokens) : absl::Span<const int32_t>(), k);
    ++n_.appends;
    ASSERT_EQ(r.ok(), *can) << r.status();
    if (!r.ok()) {
      ASSERT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
      ASSERT_TRUE(Same(before, bm_->Stats()));
      ASSERT_EQ(Table(*id), before_table);
      ++n_.failed_appends;
      return;
    }
    const auto table = Table(*id);
    if (r->has_value()) {
      ++n_.cows;
      const BlockCopy c = **r;
      ASSERT_EQ(c.src, before_table.back());
      ASSERT_EQ(c.dst, table[before_table.size() - 1]);
      std::copy_n(dev_.begin() + int64_t{c.src} * bs(), bs(), dev_.begin() + int64_t{c.dst} * bs());
    }
    for (size_t i = before_table.size(); i < table.size(); ++i) Poison(table[i]);
    const int64_t start = static_cast<int64_t>(s.tokens.size());
    s.tokens.insert(s.tokens.end(), tokens.begin(), tokens.end());
    ASSERT_NO_FATAL_FAILURE(Write(*id, start, static_cast<int64_t>(s.tokens.size())));
    ASSERT_NO_FATAL_FAILURE(Mark(*id, static_cast<int64_t>(s.tokens.size())));
    touched_ = *id;
  }

  void MarkComputed() {
    auto id = Pick();
    if (!id) return;
    const Seq& s = seqs_[*id];
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    if (s.swapped) {
      ASSERT_EQ(bm_->MarkComputed(*id, s.computed).code(), absl::StatusCode::kFailedPrecondition);
      return;
    }
    const BlockManagerStats before = bm_->Stats();
    ASSERT_EQ(bm_->MarkComputed(*id, n + U(1, 3)).code(), absl::StatusCode::kOutOfRange);
    ASSERT_EQ(bm_->MarkComputed(*id, -1).code(), absl::StatusCode::kOutOfRange);
    // Backwards is a no-op (never un-publishes).
    ASSERT_TRUE(bm_->MarkComputed(*id, U(0, static_cast<int32_t>(s.computed))).ok());
    ASSERT_TRUE(Same(before, bm_->Stats()));
    touched_ = *id;
  }

  void Fork() {
    auto parent = Pick();
    if (!parent) return;
    const Seq& p = seqs_[*parent];
    if (p.computed < static_cast<int64_t>(p.tokens.size())) return;  // engines fork computed prompts
    const uint64_t child = next_id_++;
    const BlockManagerStats before = bm_->Stats();
    const absl::Status st = bm_->Fork(*parent, child);
    if (p.swapped) {
      ASSERT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
    } else if (c_.state_slots > 0 && static_cast<int32_t>(seqs_.size()) >= c_.state_slots) {
      ASSERT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
    } else {
      ASSERT_TRUE(st.ok()) << st;
    }
    if (!st.ok()) {
      ASSERT_TRUE(Same(before, bm_->Stats()));
      return;
    }
    ASSERT_EQ(bm_->Fork(*parent, child).code(), absl::StatusCode::kAlreadyExists);
    ++n_.forks;
    seqs_[child] = seqs_[*parent];
    ASSERT_EQ(Table(child), Table(*parent));
    touched_ = child;
  }

  void Free() {
    auto id = Pick();
    if (!id) return;
    ASSERT_TRUE(bm_->Free(*id).ok());
    seqs_.erase(*id);
    ASSERT_EQ(bm_->Free(*id).code(), absl::StatusCode::kNotFound);
  }

  void FreeAll() {
    while (!seqs_.empty()) {
      ASSERT_TRUE(bm_->Free(seqs_.begin()->first).ok());
      seqs_.erase(seqs_.begin());
    }
  }

  void SwapOut() {
    auto id = Pick(false);
    if (!id) return;
    const auto table = Table(*id);
    const BlockManagerStats before = bm_->Stats();
    auto r = bm_->SwapOut(*id);
    if (!r.ok()) {
      ASSERT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
      ASSERT_GT(static_cast<int32_t>(table.size()), before.num_free_host_blocks);
      ASSERT_TRUE(Same(before, bm_->Stats()));
      ++n_.failed_swaps;
      return;
    }
    ASSERT_EQ(r->size(), table.size());
    seqs_[*id].host.clear();
    std::set<int32_t> hosts;
    for (size_t i = 0; i < r->size(); ++i) {
      const BlockCopy c = (*r)[i];
      ASSERT_EQ(c.src, table[i]);
      ASSERT_TRUE(c.dst >= 0 && c.dst < c_.host_blocks && hosts.insert(c.dst).second);
      std::copy_n(dev_.begin() + int64_t{c.src} * bs(), bs(), host_.begin() + int64_t{c.dst} * bs());
      seqs_[*id].host.push_back(c.dst);
    }
    seqs_[*id].swapped = true;
    seqs_[*id].evictions_at_publish = -1;
    ++n_.swap_outs;
    ASSERT_EQ(bm_->BlockTable(*id).status().code(), absl::StatusCode::kFailedPrecondition);
  }

  void SwapIn() {
    auto id = Pick(true);
    if (!id) return;
    const BlockManagerStats before = bm_->Stats();
    const int32_t nb = *bm_->NumBlocks(*id);
    auto r = bm_->SwapIn(*id);
    if (!r.ok()) {
      ASSERT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
      ASSERT_GT(nb, before.num_free_blocks + before.num_cached_free_blocks);
      ASSERT_TRUE(Same(before, bm_->Stats()));
      ++n_.failed_swaps;
      return;
    }
    const auto table = Table(*id);
    Seq& s = seqs_[*id];
    ASSERT_EQ(static_cast<int32_t>(table.size()), nb);
    ASSERT_EQ(s.host.size(), table.size());
    // One copy per block in table order, except (reuse) computed full blocks still cached on the
    // device, which keep their device contents and must not be copied over.
    std::vector<uint8_t> copied(table.size(), 0);
    size_t next = 0;
    for (const BlockCopy& c : *r) {
      while (next < table.size() && table[next] != c.dst) {
        ASSERT_TRUE(c_.reuse) << "block " << next << " left out of the swap-in plan";
        ++next;
      }
      ASSERT_LT(next, table.size()) << "swap-in copy to " << c.dst << " outside the table (or out of order)";
      ASSERT_EQ(c.src, s.host[next]);
      copied[next++] = 1;
      std::copy_n(host_.begin() + int64_t{c.src} * bs(), bs(), dev_.begin() + int64_t{c.dst} * bs());
    }
    for (size_t i = 0; i < table.size(); ++i) {
      if (!copied[i]) {
        ASSERT_LT(static_cast<int64_t>(i), s.computed / bs()) << "reused block " << i << " was not computed";
        ++n_.reused_blocks;
      }
      std::fill_n(host_.begin() + int64_t{s.host[i]} * bs(), bs(), kPoison);
    }
    s.host.clear();
    s.swapped = false;
    ++n_.swap_ins;
    // The swap-in itself caches again what was computed; a mark now and then must change nothing.
    if (U(0, 1) == 0) { ASSERT_NO_FATAL_FAILURE(Mark(*id, s.computed)); }
    s.evictions_at_publish = bm_->Stats().num_evictions;
    touched_ = *id;
  }

  void Unknown() {
    const uint64_t id = next_id_ + 1000;
    const BlockManagerStats before = bm_->Stats();
    const std::vector<int32_t> t = {1};
    ASSERT_EQ(bm_->Append(id, c_.caching ? absl::MakeConstSpan(t) : absl::Span<const int32_t>(), 1).status().code(),
              absl::StatusCode::kNotFound);
    ASSERT_EQ(bm_->MarkComputed(id, 0).code(), absl::StatusCode::kNotFound);
    ASSERT_EQ(bm_->Fork(id, id + 1).code(), absl::StatusCode::kNotFound);
    ASSERT_EQ(bm_->SwapOut(id).status().code(), absl::StatusCode::kNotFound);
    ASSERT_EQ(bm_->SwapIn(id).status().code(), absl::StatusCode::kNotFound);
    if (auto other = Pick()) {
      ASSERT_EQ(bm_->Fork(id, *other).code(), absl::StatusCode::kNotFound);
      if (!seqs_[*other].swapped) { ASSERT_EQ(bm_->Fork(*other, *other).code(), absl::StatusCode::kAlreadyExists); }
      ASSERT_EQ(bm_->Allocate(*other, t, 0).status().code(), absl::StatusCode::kAlreadyExists);
    }
    ASSERT_TRUE(Same(before, bm_->Stats()));
  }

  Config c_;
  std::mt19937_64 rng_;
  std::unique_ptr<BlockManager> bm_;
  std::vector<int32_t> dev_, host_;
  std::vector<std::vector<int32_t>> prefixes_;
  std::map<uint64_t, Seq> seqs_;
  uint64_t next_id_ = 1;
  std::optional<uint64_t> touched_;
};

class BlockManagerModelLong : public ::testing::TestWithParam<Config> {};

TEST_P(BlockManagerModelLong, MillionRandomOperations) {
  const auto t0 = std::chrono::steady_clock::now();
  Model m(GetParam(), 0x5eed0000ULL + static_cast<uint64_t>(GetParam().block_size) * 7919 + GetParam().device_blocks);
  ASSERT_NO_FATAL_FAILURE(m.Run(OpsPerConfig()));
  m.Print(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  if (GetParam().host_blocks > 0) { EXPECT_GT(m.n_.swap_ins, 0); }
  EXPECT_GT(m.n_.forks, 0);
  EXPECT_GT(m.n_.failed_allocs, 0);
  if (GetParam().caching) {
    EXPECT_GT(m.n_.hit_allocs, 0);
    EXPECT_GT(m.n_.exact_dups, 0);
  }
  if (GetParam().block_size > 1) { EXPECT_GT(m.n_.cows, 0); }
  if (GetParam().reuse) {
    EXPECT_GT(m.n_.reused_blocks, 0);
  } else {
    EXPECT_EQ(m.n_.reused_blocks, 0);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Pools, BlockManagerModelLong,
    ::testing::Values(Config{"bs1_caching", 1, 40, 24, 0, true, 0.0, false},
                      Config{"bs3_caching_slots_wm", 3, 48, 16, 12, true, 0.05, false},
                      Config{"bs4_no_caching", 4, 40, 20, 0, false, 0.0, false},
                      Config{"bs8_caching_no_host", 8, 24, 0, 10, true, 0.1, false},
                      Config{"bs1_caching_swap_reuse", 1, 40, 24, 0, true, 0.0, true},
                      Config{"bs4_caching_slots_swap_reuse", 4, 40, 20, 12, true, 0.05, true}),
    [](const ::testing::TestParamInfo<Config>& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace kvplug::paged
