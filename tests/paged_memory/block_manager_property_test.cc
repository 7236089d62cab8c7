// Randomized property test of kvplug::paged::BlockManager against a shadow model.
//
// A small pool (64 device blocks of 4 tokens, 32 host blocks; watermark 0 and 4 blocks) runs
// kNumOps random operations per watermark: allocate (prompts drawn from a few shared prefixes, so
// prefix hits happen), append, fork, free, swap out and swap in. The test simulates block CONTENTS:
// a fake device memory and host memory hold one token id per slot. Tokens are written through
// SlotMapping when they are allocated or appended (only those not served by the prefix cache),
// fresh blocks are poisoned first, copy-on-write copies and swap plans are applied to the fake
// memories, and after every operation each resident sequence's tokens are read back through its
// block table and must equal the model's token list. That proves prefix hits, copy-on-write and
// swaps are content-correct. CheckInvariants() runs after every operation, failing calls must leave
// Stats and block tables unchanged, and a kOk verdict of CanAllocate must be followed by a
// successful Allocate.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <optional>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kvplug/paged_memory/block_manager.h"

namespace kvplug::paged {
namespace {

constexpr int kNumOps = 120000;  // per watermark
constexpr uint64_t kSeed = 0x6b7670'6c7567ULL;
constexpr int32_t kBlockSize = 4;
constexpr int32_t kDeviceBlocks = 64;
constexpr int32_t kHostBlocks = 32;
constexpr int32_t kStateSlots = 24;
constexpr int32_t kPoison = -1000000;
constexpr int32_t kVocab = 40;

bool SameStats(const BlockManagerStats& a, const BlockManagerStats& b) {
  return a.num_device_blocks == b.num_device_blocks && a.num_free_blocks == b.num_free_blocks &&
         a.num_cached_free_blocks == b.num_cached_free_blocks &&
         a.num_used_blocks == b.num_used_blocks && a.num_host_blocks == b.num_host_blocks &&
         a.num_free_host_blocks == b.num_free_host_blocks && a.num_sequences == b.num_sequences &&
         a.num_swapped_sequences == b.num_swapped_sequences &&
         a.prefix_queried_blocks == b.prefix_queried_blocks &&
         a.prefix_hit_blocks == b.prefix_hit_blocks && a.num_evictions == b.num_evictions;
}

// Parameter: the watermark (0 makes "CanAllocate kOk implies Allocate succeeds" tight).
class BlockManagerProperty : public ::testing::TestWithParam<double> {
 protected:
  struct SeqModel {
    std::vector<int32_t> tokens;
    uint64_t extra_key = 0;
    bool swapped = false;
    int64_t computed = 0;  // tokens whose K/V the "engine" has written (chunked prefill lags)
  };

  void SetUp() override {
    BlockManagerOptions o;
    o.block_size = kBlockSize;
    o.num_device_blocks = kDeviceBlocks;
    o.num_host_blocks = kHostBlocks;
    o.enable_prefix_caching = true;
    o.watermark = GetParam();
    o.num_state_slots = kStateSlots;
    o.hash_seed = 0xfeedULL;
    rng_.seed(kSeed + static_cast<uint64_t>(GetParam() * 1e6));  // each watermark its own run
    auto m = BlockManager::Create(o);
    ASSERT_TRUE(m.ok()) << m.status();
    bm_ = std::move(*m);
    dev_mem_.assign(kDeviceBlocks, std::vector<int32_t>(kBlockSize, kPoison));
    host_mem_.assign(kHostBlocks, std::vector<int32_t>(kBlockSize, kPoison));
    // Shared prefixes: lengths that are and are not multiples of the block size.
    for (int len : {8, 12, 16, 6, 10}) {
      std::vector<int32_t> p(len);
      for (int32_t& t : p) t = Uniform(0, kVocab - 1);
      prefixes_.push_back(std::move(p));
    }
  }

  int32_t Uniform(int32_t lo, int32_t hi) {
    return std::uniform_int_distribution<int32_t>(lo, hi)(rng_);
  }
  bool Chance(double p) { return std::bernoulli_distribution(p)(rng_); }

  std::vector<int32_t> RandomTokens(int n) {
    std::vector<int32_t> v(n);
    for (int32_t& t : v) t = Uniform(0, kVocab - 1);
    return v;
  }

  std::vector<int32_t> Prompt() {
    std::vector<int32_t> p;
    if (Chance(0.85)) {
      const auto& pre = prefixes_[Uniform(0, static_cast<int32_t>(prefixes_.size()) - 1)];
      const int len = Chance(0.5) ? static_cast<int>(pre.size())
                                  : Uniform(1, static_cast<int32_t>(pre.size()));
      p.assign(pre.begin(), pre.begin() + len);
      const int suffix = Chance(0.3) ? 0 : Uniform(1, 7);
      auto s = RandomTokens(suffix);
      p.insert(p.end(), s.begin(), s.end());
    } else {
      p = RandomTokens(Uniform(1, 20));
    }
    return p;
  }

  // A random live sequence id (optionally restricted to swapped / resident ones).
  std::optional<uint64_t> Pick(std::optional<bool> swapped = std::nullopt) {
    std::vector<uint64_t> ids;
    for (const auto& [id, s] : live_) {
      if (!swapped.has_value() || s.swapped == *swapped) ids.push_back(id);
    }
    if (ids.empty()) return std::nullopt;
    return ids[Uniform(0, static_cast<int32_t>(ids.size()) - 1)];
  }

  std::vector<int32_t> Table(uint64_t id) {
    auto t = bm_->BlockTable(id);
    EXPECT_TRUE(t.ok()) << t.status();
    if (!t.ok()) return {};
    return std::vector<int32_t>(t->begin(), t->end());
  }

  // Writes tokens [start, start + tokens.size()) of `id` into the fake device memory.
  void Write(uint64_t id, int64_t start, const std::vector<int32_t>& tokens) {
    std::vector<int64_t> slots(tokens.size());
    auto st = bm_->SlotMapping(id, start, static_cast<int64_t>(tokens.size()),
                               absl::MakeSpan(slots));
    ASSERT_TRUE(st.ok()) << st;
    for (size_t i = 0; i < tokens.size(); ++i) {
      ASSERT_GE(slots[i], 0);
      ASSERT_LT(slots[i], int64_t{kDeviceBlocks} * kBlockSize);
      dev_mem_[slots[i] / kBlockSize][slots[i] % kBlockSize] = tokens[i];
    }
  }

  void Poison(int32_t block) { std::fill(dev_mem_[block].begin(), dev_mem_[block].end(), kPoison); }

  // Everything the model knows must match the manager.
  void Verify() {
    auto inv = bm_->CheckInvariants();
    ASSERT_TRUE(inv.ok()) << inv;
    const BlockManagerStats s = bm_->Stats();
    ASSERT_EQ(s.num_free_blocks + s.num_cached_free_blocks + s.num_used_blocks, kDeviceBlocks);
    ASSERT_EQ(s.num_sequences, static_cast<int32_t>(live_.size()));
    int32_t swapped = 0, host_used = 0;
    std::vector<int64_t> slots;
    for (const auto& [id, m] : live_) {
      const int64_t n = static_cast<int64_t>(m.tokens.size());
      ASSERT_EQ(*bm_->NumTokens(id), n) << "seq " << id;
      ASSERT_EQ(*bm_->IsSwapped(id), m.swapped) << "seq " << id;
      ASSERT_EQ(*bm_->NumBlocks(id), (n + kBlockSize - 1) / kBlockSize) << "seq " << id;
      if (m.swapped) {
        ++swapped;
        host_used += *bm_->NumBlocks(id);
        continue;
      }
      const auto table = Table(id);
      slots.resize(n);
      ASSERT_TRUE(bm_->SlotMapping(id, 0, n, absl::MakeSpan(slots)).ok());
      for (int64_t p = 0; p < m.computed; ++p) {
        const int32_t b = table[p / kBlockSize];
        ASSERT_EQ(slots[p], int64_t{b} * kBlockSize + p % kBlockSize);
        ASSERT_EQ(dev_mem_[b][p % kBlockSize], m.tokens[p])
            << "seq " << id << " position " << p << " (block " << b << ") reads a wrong token";
      }
    }
    ASSERT_EQ(s.num_swapped_sequences, swapped);
    ASSERT_EQ(s.num_free_host_blocks, kHostBlocks - host_used);
  }

  void DoAllocate() {
    const uint64_t id = next_id_++;
    const auto prompt = Prompt();
    const uint64_t key = Chance(0.2) ? 1 : 0;
    const int64_t n = static_cast<int64_t>(prompt.size());
    const AllocVerdict verdict = bm_->CanAllocate(prompt, n, key);
    const int64_t num_blocks = (n + kBlockSize - 1) / kBlockSize;
    if (verdict == AllocVerdict::kNever) {
      ASSERT_GT(num_blocks, kDeviceBlocks - static_cast<int32_t>(GetParam() * kDeviceBlocks));
    }
    // The no-credit verdict can only be more pessimistic.
    const AllocVerdict plain = bm_->CanAllocate({}, n, key);
    if (plain == AllocVerdict::kOk) {
      ASSERT_EQ(verdict, AllocVerdict::kOk);
    }

    const BlockManagerStats before = bm_->Stats();
    auto r = bm_->Allocate(id, prompt, key);
    if (verdict == AllocVerdict::kOk) {
      ASSERT_TRUE(r.ok()) << "CanAllocate said kOk but Allocate failed: " << r.status();
      ++ok_verdicts_checked_;
    }
    if (!r.ok()) {
      ASSERT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
      ASSERT_TRUE(SameStats(before, bm_->Stats()));
      ASSERT_EQ(bm_->NumTokens(id).status().code(), absl::StatusCode::kNotFound);
      ++failed_allocs_;
      return;
    }
    const int64_t cached = *r;
    ASSERT_GE(cached, 0);
    ASSERT_LT(cached, n);
    ASSERT_EQ(cached % kBlockSize, 0);
    if (cached > 0) ++allocs_with_hits_;
    const auto table = Table(id);
    ASSERT_EQ(static_cast<int64_t>(table.size()), num_blocks);
    for (int64_t i = cached / kBlockSize; i < num_blocks; ++i) Poison(table[i]);
    // Chunked prefill: now and then only part of the prompt is computed in this step. Blocks not
    // yet written must not be served to other sequences as prefix hits (Verify would read poison).
    const int64_t computed = Chance(0.3) ? Uniform(static_cast<int32_t>(cached), static_cast<int32_t>(n) - 1) : n;
    ASSERT_NO_FATAL_FAILURE(
        Write(id, cached, std::vector<int32_t>(prompt.begin() + cached, prompt.begin() + computed)));
    ASSERT_TRUE(bm_->MarkComputed(id, computed).ok());
    live_[id] = SeqModel{prompt, key, false, computed};

    // Now and then: a duplicate id changes nothing.
    if (Chance(0.05)) {
      const BlockManagerStats b2 = bm_->Stats();
      ASSERT_EQ(bm_->Allocate(id, prompt, key).status().code(), absl::StatusCode::kAlreadyExists);
      ASSERT_TRUE(SameStats(b2, bm_->Stats()));
    }
  }

  void DoAppend() {
    auto id = Pick();
    if (!id) return;
    SeqModel& m = live_[*id];
    if (!m.swapped && m.computed < static_cast<int64_t>(m.tokens.size())) {
      // The rest of a chunked prefill.
      const int64_t n = static_cast<int64_t>(m.tokens.size());
      ASSERT_NO_FATAL_FAILURE(
          Write(*id, m.computed, std::vector<int32_t>(m.tokens.begin() + m.computed, m.tokens.end())));
      ASSERT_TRUE(bm_->MarkComputed(*id, n).ok());
      ASSERT_EQ(bm_->MarkComputed(*id, n + 1).code(), absl::StatusCode::kOutOfRange);
      m.computed = n;
      ++chunked_prefills_;
      return;
    }
    const int k = Chance(0.7) ? 1 : Uniform(2, 7);
    const auto tokens = RandomTokens(k);
    if (m.swapped) {
      ASSERT_EQ(bm_->Append(*id, tokens, k).status().code(), absl::StatusCode::kFailedPrecondition);
      return;
    }
    const auto can = bm_->CanAppend(*id, k);
    ASSERT_TRUE(can.ok()) << can.status();
    const auto table_before = Table(*id);
    const BlockManagerStats before = bm_->Stats();
    auto r = bm_->Append(*id, tokens, k);
    ASSERT_EQ(r.ok(), *can) << r.status();
    if (!r.ok()) {
      ASSERT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
      ASSERT_TRUE(SameStats(before, bm_->Stats()));
      ASSERT_EQ(Table(*id), table_before);
      ++failed_appends_;
      return;
    }
    const auto table = Table(*id);
    ASSERT_GE(table.size(), table_before.size());
    if (r->has_value()) {
      const BlockCopy c = **r;
      ++cow_copies_;
      ASSERT_NE(m.tokens.size() % kBlockSize, 0u) << "copy on write of a full block";
      ASSERT_EQ(c.src, table_before.back());
      ASSERT_EQ(c.dst, table[table_before.size() - 1]);
      dev_mem_[c.dst] = dev_mem_[c.src];
    } else {
      ASSERT_EQ(table[table_before.size() - 1], table_before.back());
    }
    for (size_t i = 0; i + 1 < table_before.size(); ++i) ASSERT_EQ(table[i], table_before[i]);
    for (size_t i = table_before.size(); i < table.size(); ++i) Poison(table[i]);
    const int64_t start = static_cast<int64_t>(m.tokens.size());
    ASSERT_NO_FATAL_FAILURE(Write(*id, start, tokens));
    m.tokens.insert(m.tokens.end(), tokens.begin(), tokens.end());
    m.computed = static_cast<int64_t>(m.tokens.size());
    ASSERT_TRUE(bm_->MarkComputed(*id, m.computed).ok());
  }

  void DoFork() {
    auto parent = Pick();
    if (!parent) return;
    // Engines fork after the prompt is computed (parallel sampling), not in the middle of it.
    if (live_[*parent].computed < static_cast<int64_t>(live_[*parent].tokens.size())) return;
    const uint64_t child = next_id_++;
    const BlockManagerStats before = bm_->Stats();
    auto st = bm_->Fork(*parent, child);
    if (live_[*parent].swapped) {
      ASSERT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
    } else if (static_cast<int32_t>(live_.size()) >= kStateSlots) {
      ASSERT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
      ++slot_exhaustions_;
    } else {
      ASSERT_TRUE(st.ok()) << st;
    }
    if (!st.ok()) {
      ASSERT_TRUE(SameStats(before, bm_->Stats()));
      return;
    }
    ++forks_;
    SeqModel copy = live_[*parent];
    live_[child] = std::move(copy);
  }

  void DoFree() {
    if (Chance(0.02)) {
      ASSERT_EQ(bm_->Free(next_id_ + 1000).code(), absl::StatusCode::kNotFound);
      return;
    }
    auto id = Pick();
    if (!id) return;
    auto st = bm_->Free(*id);
    ASSERT_TRUE(st.ok()) << st;
    live_.erase(*id);
  }

  void DoSwapOut() {
    auto id = Pick(false);
    if (!id) return;
    const auto table = Table(*id);
    const BlockManagerStats before = bm_->Stats();
    auto r = bm_->SwapOut(*id);
    if (!r.ok()) {
      ASSERT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
      ASSERT_GT(static_cast<int32_t>(table.size()), before.num_free_host_blocks);
      ASSERT_TRUE(SameStats(before, bm_->Stats()));
      ++failed_swaps_;
      return;
    }
    ASSERT_EQ(r->size(), table.size());
    for (size_t i = 0; i < table.size(); ++i) {
      ASSERT_EQ((*r)[i].src, table[i]);
      ASSERT_GE((*r)[i].dst, 0);
      ASSERT_LT((*r)[i].dst, kHostBlocks);
      host_mem_[(*r)[i].dst] = dev_mem_[(*r)[i].src];
    }
    live_[*id].swapped = true;
    ++swap_outs_;
    // A swapped sequence rejects resident-only calls.
    ASSERT_EQ(bm_->SwapOut(*id).status().code(), absl::StatusCode::kFailedPrecondition);
  }

  void DoSwapIn() {
    auto id = Pick(true);
    if (!id) {
      if ((id = Pick(false))) {
        ASSERT_EQ(bm_->SwapIn(*id).status().code(), absl::StatusCode::kFailedPrecondition);
      }
      return;
    }
    const BlockManagerStats before = bm_->Stats();
    const int32_t nb = *bm_->NumBlocks(*id);
    auto r = bm_->SwapIn(*id);
    if (!r.ok()) {
      ASSERT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
      ASSERT_GT(nb, before.num_free_blocks + before.num_cached_free_blocks);
      ASSERT_TRUE(SameStats(before, bm_->Stats()));
      ++failed_swaps_;
      return;
    }
    ASSERT_EQ(static_cast<int32_t>(r->size()), nb);
    const auto table = Table(*id);
    for (size_t i = 0; i < r->size(); ++i) {
      const BlockCopy c = (*r)[i];
      ASSERT_EQ(c.dst, table[i]);
      dev_mem_[c.dst] = host_mem_[c.src];
      std::fill(host_mem_[c.src].begin(), host_mem_[c.src].end(), kPoison);
    }
    live_[*id].swapped = false;
    ++swap_ins_;
    // Swapped-in blocks are fresh: republishing them is allowed and must keep contents right.
    if (Chance(0.5)) ASSERT_TRUE(bm_->MarkComputed(*id, live_[*id].computed).ok());
  }

  std::mt19937_64 rng_{kSeed};
  std::unique_ptr<BlockManager> bm_;
  std::vector<std::vector<int32_t>> dev_mem_, host_mem_;
  std::vector<std::vector<int32_t>> prefixes_;
  std::map<uint64_t, SeqModel> live_;
  uint64_t next_id_ = 1;

  int64_t ok_verdicts_checked_ = 0, failed_allocs_ = 0, allocs_with_hits_ = 0;
  int64_t failed_appends_ = 0, cow_copies_ = 0, forks_ = 0, slot_exhaustions_ = 0;
  int64_t chunked_prefills_ = 0, swap_outs_ = 0, swap_ins_ = 0, failed_swaps_ = 0;
};

TEST_P(BlockManagerProperty, RandomOperationsKeepContentsAndInvariants) {
  const auto t0 = std::chrono::steady_clock::now();
  for (int op = 0; op < kNumOps; ++op) {
    const int live = static_cast<int>(live_.size());
    // Keep the population moving: free more when many sequences are live.
    const int free_weight = live > 16 ? 30 : live > 8 ? 14 : 6;
    const int weights[] = {22, 32, 7, free_weight, 8, 9};
    std::discrete_distribution<int> pick(std::begin(weights), std::end(weights));
    switch (pick(rng_)) {
      case 0: ASSERT_NO_FATAL_FAILURE(DoAllocate()) << "op " << op; break;
      case 1: ASSERT_NO_FATAL_FAILURE(DoAppend()) << "op " << op; break;
      case 2: ASSERT_NO_FATAL_FAILURE(DoFork()) << "op " << op; break;
      case 3: ASSERT_NO_FATAL_FAILURE(DoFree()) << "op " << op; break;
      case 4: ASSERT_NO_FATAL_FAILURE(DoSwapOut()) << "op " << op; break;
      default: ASSERT_NO_FATAL_FAILURE(DoSwapIn()) << "op " << op; break;
    }
    ASSERT_NO_FATAL_FAILURE(Verify()) << "after op " << op;
  }
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const BlockManagerStats s = bm_->Stats();
  std::printf(
      "watermark %.4f: %d ops in %.2f s: prefix queried %lld hit %lld (%lld allocs with hits), evictions %lld, "
      "copy-on-write %lld, forks %lld, swap out %lld in %lld (failed %lld), failed allocs %lld, "
      "failed appends %lld, kOk verdicts checked %lld, slot exhaustions %lld\n",
      GetParam(), kNumOps, secs, static_cast<long long>(s.prefix_queried_blocks),
      static_cast<long long>(s.prefix_hit_blocks), static_cast<long long>(allocs_with_hits_),
      static_cast<long long>(s.num_evictions), static_cast<long long>(cow_copies_),
      static_cast<long long>(forks_), static_cast<long long>(swap_outs_),
      static_cast<long long>(swap_ins_), static_cast<long long>(failed_swaps_),
      static_cast<long long>(failed_allocs_), static_cast<long long>(failed_appends_),
      static_cast<long long>(ok_verdicts_checked_), static_cast<long long>(slot_exhaustions_));
  EXPECT_GT(s.prefix_hit_blocks, 0);
  EXPECT_GT(allocs_with_hits_, 0);
  EXPECT_GT(s.num_evictions, 0);
  EXPECT_GT(cow_copies_, 0);
  EXPECT_GT(forks_, 0);
  EXPECT_GT(swap_outs_, 0);
  EXPECT_GT(swap_ins_, 0);
  EXPECT_GT(chunked_prefills_, 0);
  EXPECT_GT(failed_allocs_, 0);
  EXPECT_GT(failed_appends_, 0);
  EXPECT_GT(ok_verdicts_checked_, 0);

  // Drain: everything returns to the pools.
  while (!live_.empty()) {
    ASSERT_TRUE(bm_->Free(live_.begin()->first).ok());
    live_.erase(live_.begin());
    ASSERT_TRUE(bm_->CheckInvariants().ok()) << bm_->CheckInvariants();
  }
  const BlockManagerStats e = bm_->Stats();
  EXPECT_EQ(e.num_used_blocks, 0);
  EXPECT_EQ(e.num_free_host_blocks, kHostBlocks);
  EXPECT_EQ(e.num_sequences, 0);
  EXPECT_EQ(e.num_swapped_sequences, 0);
}

INSTANTIATE_TEST_SUITE_P(Watermarks, BlockManagerProperty, ::testing::Values(0.0, 0.0625));

}  // namespace
}  // namespace kvplug::paged
