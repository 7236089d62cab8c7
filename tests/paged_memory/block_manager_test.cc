// Unit tests of kvplug::paged::BlockManager: every method, every error path, prefix caching, LRU
// eviction, fork/copy-on-write, swap plans, watermark verdicts and state slots.
#include "kvplug/paged_memory/block_manager.h"

#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace kvplug::paged {
namespace {

using I32s = std::vector<int32_t>;
using I64s = std::vector<int64_t>;

#define EXPECT_CONTAINS(text, sub)                                                 \
  EXPECT_NE(std::string(text).find(sub), std::string::npos)                        \
      << "\"" << std::string(text) << "\" does not contain \"" << (sub) << "\""

std::unique_ptr<BlockManager> Make(BlockManagerOptions o) {
  auto m = BlockManager::Create(o);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? std::move(*m) : nullptr;
}

BlockManagerOptions Opts(int32_t block_size, int32_t device, int32_t host = 0, bool caching = false,
                         double watermark = 0.0, int32_t slots = 0, uint64_t seed = 0) {
  BlockManagerOptions o;
  o.block_size = block_size;
  o.num_device_blocks = device;
  o.num_host_blocks = host;
  o.enable_prefix_caching = caching;
  o.watermark = watermark;
  o.num_state_slots = slots;
  o.hash_seed = seed;
  return o;
}

// Tokens first, first+1, ..., first+n-1.
std::vector<int32_t> Tok(int32_t first, int32_t n) {
  std::vector<int32_t> v(n);
  std::iota(v.begin(), v.end(), first);
  return v;
}

std::vector<int32_t> Cat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// Most tests model an engine that computes what it allocates or appends in the same step: these
// wrappers report the tokens computed right away, which is when full blocks reach the prefix cache.
absl::StatusOr<int64_t> AllocateComputed(BlockManager& m, uint64_t id, absl::Span<const int32_t> tokens,
                                         uint64_t key) {
  auto r = m.Allocate(id, tokens, key);
  if (r.ok()) EXPECT_TRUE(m.MarkComputed(id, static_cast<int64_t>(tokens.size())).ok());
  return r;
}

absl::StatusOr<std::optional<BlockCopy>> AppendComputed(BlockManager& m, uint64_t id,
                                                        absl::Span<const int32_t> tokens, int64_t n) {
  auto r = m.Append(id, tokens, n);
  if (r.ok()) EXPECT_TRUE(m.MarkComputed(id, *m.NumTokens(id)).ok());
  return r;
}

std::vector<int32_t> Table(const BlockManager& m, uint64_t id) {
  auto t = m.BlockTable(id);
  EXPECT_TRUE(t.ok()) << t.status();
  if (!t.ok()) return {};
  return std::vector<int32_t>(t->begin(), t->end());
}

void ExpectStatsEq(const BlockManagerStats& a, const BlockManagerStats& b) {
  EXPECT_EQ(a.num_device_blocks, b.num_device_blocks);
  EXPECT_EQ(a.num_free_blocks, b.num_free_blocks);
  EXPECT_EQ(a.num_cached_free_blocks, b.num_cached_free_blocks);
  EXPECT_EQ(a.num_used_blocks, b.num_used_blocks);
  EXPECT_EQ(a.num_host_blocks, b.num_host_blocks);
  EXPECT_EQ(a.num_free_host_blocks, b.num_free_host_blocks);
  EXPECT_EQ(a.num_sequences, b.num_sequences);
  EXPECT_EQ(a.num_swapped_sequences, b.num_swapped_sequences);
  EXPECT_EQ(a.prefix_queried_blocks, b.prefix_queried_blocks);
  EXPECT_EQ(a.prefix_hit_blocks, b.prefix_hit_blocks);
  EXPECT_EQ(a.num_evictions, b.num_evictions);
}

// Stats plus the block tables (or swap state) of the given sequences: what "nothing changed" means.
struct Snapshot {
  BlockManagerStats stats;
  std::map<uint64_t, std::vector<int32_t>> tables;
  std::map<uint64_t, int64_t> num_tokens;
  std::map<uint64_t, int32_t> slots;
};

Snapshot Snap(const BlockManager& m, std::initializer_list<uint64_t> ids) {
  Snapshot s;
  s.stats = m.Stats();
  for (uint64_t id : ids) {
    auto t = m.BlockTable(id);
    if (t.ok()) s.tables[id] = std::vector<int32_t>(t->begin(), t->end());
    s.num_tokens[id] = m.NumTokens(id).value_or(-1);
    s.slots[id] = m.StateSlot(id).value_or(-2);
  }
  return s;
}

void ExpectSame(const Snapshot& a, const Snapshot& b) {
  ExpectStatsEq(a.stats, b.stats);
  EXPECT_EQ(a.tables, b.tables);
  EXPECT_EQ(a.num_tokens, b.num_tokens);
  EXPECT_EQ(a.slots, b.slots);
}

#define EXPECT_INVARIANTS(m) EXPECT_TRUE((m).CheckInvariants().ok()) << (m).CheckInvariants()

// ---------------------------------------------------------------------------------------------
// Create / options

TEST(BlockManagerCreate, RejectsBadOptionsWithValues) {
  struct Case {
    BlockManagerOptions o;
    const char* text;
  };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  const Case cases[] = {
      {Opts(0, 8), "block_size=0"},
      {Opts(-4, 8), "block_size=-4"},
      {Opts(65537, 8), "block_size=65537"},
      {Opts(16, 0), "num_device_blocks=0"},
      {Opts(16, -1), "num_device_blocks=-1"},
      {Opts(16, 8, -2), "num_host_blocks=-2"},
      {Opts(16, 8, 0, false, 1.0), "watermark=1"},
      {Opts(16, 8, 0, false, -0.5), "watermark=-0.5"},
      {Opts(16, 8, 0, false, nan), "watermark=nan"},
      {Opts(16, 8, 0, false, inf), "watermark=inf"},
      {Opts(16, 8, 0, false, 0.0, -3), "num_state_slots=-3"},
  };
  for (const Case& c : cases) {
    auto m = BlockManager::Create(c.o);
    ASSERT_FALSE(m.ok()) << c.text;
    EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument) << c.text;
    EXPECT_CONTAINS(m.status().message(), c.text);
  }
}

TEST(BlockManagerCreate, AcceptsBoundaryValues) {
  EXPECT_TRUE(BlockManager::Create(Opts(1, 1)).ok());
  EXPECT_TRUE(BlockManager::Create(Opts(65536, 1)).ok());
  EXPECT_TRUE(BlockManager::Create(Opts(16, 8, 0, true, 0.0, 0)).ok());
  EXPECT_TRUE(BlockManager::Create(Opts(16, 8, 4, true, 0.999, 5)).ok());
}

TEST(BlockManagerCreate, OptionsAndInitialStats) {
  auto m = Make(Opts(8, 10, 3, true, 0.25, 2, 77));
  EXPECT_EQ(m->options().block_size, 8);
  EXPECT_EQ(m->options().num_device_blocks, 10);
  EXPECT_EQ(m->options().num_host_blocks, 3);
  EXPECT_TRUE(m->options().enable_prefix_caching);
  EXPECT_EQ(m->options().watermark, 0.25);
  EXPECT_EQ(m->options().num_state_slots, 2);
  EXPECT_EQ(m->options().hash_seed, 77u);
  BlockManagerStats s = m->Stats();
  EXPECT_EQ(s.num_device_blocks, 10);
  EXPECT_EQ(s.num_free_blocks, 10);
  EXPECT_EQ(s.num_cached_free_blocks, 0);
  EXPECT_EQ(s.num_used_blocks, 0);
  EXPECT_EQ(s.num_host_blocks, 3);
  EXPECT_EQ(s.num_free_host_blocks, 3);
  EXPECT_EQ(s.num_sequences, 0);
  EXPECT_EQ(s.num_swapped_sequences, 0);
  EXPECT_EQ(s.prefix_queried_blocks, 0);
  EXPECT_EQ(s.prefix_hit_blocks, 0);
  EXPECT_EQ(s.num_evictions, 0);
  EXPECT_INVARIANTS(*m);
}

// ---------------------------------------------------------------------------------------------
// Unknown ids

TEST(BlockManagerErrors, UnknownSequenceIdEverywhere) {
  auto m = Make(Opts(4, 8, 4, true));
  std::vector<int64_t> out(4);
  const std::vector<int32_t> one = {1};
  auto expect_nf = [](const absl::Status& s) {
    EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
    EXPECT_CONTAINS(s.message(), "seq 42: unknown sequence id");
  };
  expect_nf(m->CanAppend(42, 1).status());
  expect_nf(AppendComputed(*m, 42, one, 1).status());
  expect_nf(m->Fork(42, 43));
  expect_nf(m->Free(42));
  expect_nf(m->NumTokens(42).status());
  expect_nf(m->BlockTable(42).status());
  expect_nf(m->SlotMapping(42, 0, 1, absl::MakeSpan(out)));
  expect_nf(m->StateSlot(42).status());
  expect_nf(m->IsSwapped(42).status());
  expect_nf(m->NumBlocks(42).status());
  expect_nf(m->SwapOut(42).status());
  expect_nf(m->SwapIn(42).status());
  EXPECT_INVARIANTS(*m);
}

// ---------------------------------------------------------------------------------------------
// Allocate

TEST(BlockManagerAllocate, BasicWithoutCaching) {
  auto m = Make(Opts(4, 8));
  auto c = AllocateComputed(*m, 1, Tok(0, 10), 0);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(*c, 0);
  EXPECT_EQ(Table(*m, 1), (I32s{0, 1, 2}));
  EXPECT_EQ(*m->NumTokens(1), 10);
  EXPECT_EQ(*m->NumBlocks(1), 3);
  EXPECT_FALSE(*m->IsSwapped(1));
  EXPECT_EQ(*m->StateSlot(1), -1);
  auto s = m->Stats();
  EXPECT_EQ(s.num_used_blocks, 3);
  EXPECT_EQ(s.num_free_blocks, 5);
  EXPECT_EQ(s.num_sequences, 1);
  EXPECT_EQ(s.prefix_queried_blocks, 0);
  // Same prompt again: no caching, no sharing.
  ASSERT_TRUE(AllocateComputed(*m, 2, Tok(0, 10), 0).ok());
  EXPECT_EQ(Table(*m, 2), (I32s{3, 4, 5}));
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerAllocate, EmptyPromptIsInvalid) {
  auto m = Make(Opts(4, 8));
  auto c = AllocateComputed(*m, 5, {}, 0);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_CONTAINS(c.status().message(), "seq 5");
  EXPECT_EQ(m->Stats().num_sequences, 0);
}

TEST(BlockManagerAllocate, DuplicateIdLeavesStateUnchanged) {
  auto m = Make(Opts(4, 8, 0, true));
  ASSERT_TRUE(AllocateComputed(*m, 7, Tok(0, 6), 0).ok());
  const Snapshot before = Snap(*m, {7});
  auto c = AllocateComputed(*m, 7, Tok(100, 3), 0);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_CONTAINS(c.status().message(), "seq 7");
  ExpectSame(before, Snap(*m, {7}));
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerAllocate, ExhaustionLeavesStateUnchanged) {
  auto m = Make(Opts(4, 4, 0, true));
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 8), 0).ok());  // 2 blocks, both published
  ASSERT_TRUE(m->Free(1).ok());                    // now cached-free
  ASSERT_TRUE(AllocateComputed(*m, 2, Tok(50, 4), 0).ok()); // 1 block from the free list
  const Snapshot before = Snap(*m, {2});
  // 5 blocks needed, 3 available (1 free + 2 cached-free).
  auto c = AllocateComputed(*m, 3, Tok(100, 17), 0);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_CONTAINS(c.status().message(), "seq 3");
  EXPECT_CONTAINS(c.status().message(), "only 3 available");
  ExpectSame(before, Snap(*m, {2}));
  EXPECT_EQ(m->NumTokens(3).status().code(), absl::StatusCode::kNotFound);
  // A prompt hitting the cached blocks: 2 hits + 3 fresh > 3 - 2 (the hits leave the pool).
  auto d = AllocateComputed(*m, 4, Cat(Tok(0, 8), Tok(200, 9)), 0);
  EXPECT_EQ(d.status().code(), absl::StatusCode::kResourceExhausted);
  ExpectSame(before, Snap(*m, {2}));
  EXPECT_INVARIANTS(*m);
  // The exact fit succeeds: 2 hits + 1 fresh.
  auto e = AllocateComputed(*m, 4, Cat(Tok(0, 8), Tok(200, 1)), 0);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(*e, 8);
  EXPECT_EQ(m->Stats().num_free_blocks + m->Stats().num_cached_free_blocks, 0);
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerAllocate, ExactFitUsesEveryBlock) {
  auto m = Make(Opts(2, 3));
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 6), 0).ok());
  EXPECT_EQ(m->Stats().num_used_blocks, 3);
  EXPECT_EQ(AllocateComputed(*m, 2, Tok(0, 1), 0).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_INVARIANTS(*m);
}

// ---------------------------------------------------------------------------------------------
// Prefix caching

TEST(BlockManagerPrefix, HitAcrossSequencesWithSameExtraKey) {
  auto m = Make(Opts(4, 16, 0, true));
  const auto prefix = Tok(10, 8);
  auto a = AllocateComputed(*m, 1, Cat(prefix, Tok(100, 2)), 9);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(*a, 0);
  auto b = AllocateComputed(*m, 2, Cat(prefix, Tok(200, 7)), 9);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(*b, 8);
  auto ta = Table(*m, 1), tb = Table(*m, 2);
  ASSERT_EQ(tb.size(), 4u);
  EXPECT_EQ(tb[0], ta[0]);
  EXPECT_EQ(tb[1], ta[1]);
  EXPECT_NE(tb[2], ta[2]);
  auto s = m->Stats();
  EXPECT_EQ(s.prefix_queried_blocks, 2 + 3);
  EXPECT_EQ(s.prefix_hit_blocks, 2);
  EXPECT_EQ(s.num_used_blocks, 3 + 2);
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerPrefix, DifferentExtraKeyOrSeedMisses) {
  auto m = Make(Opts(4, 16, 0, true));
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 9), 1).ok());
  auto b = AllocateComputed(*m, 2, Tok(0, 9), 2);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(*b, 0);
  auto ta = Table(*m, 1), tb = Table(*m, 2);
  for (int i = 0; i < 3; ++i) EXPECT_NE(ta[i], tb[i]);
  EXPECT_EQ(m->Stats().prefix_hit_blocks, 0);
  EXPECT_EQ(*AllocateComputed(*m, 3, Tok(0, 9), 1), 8);
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerPrefix, ChainStopsAtFirstMiss) {
  auto m = Make(Opts(4, 16, 0, true));
  ASSERT_TRUE(AllocateComputed(*m, 1, Cat(Tok(0, 4), Tok(50, 5)), 0).ok());
  // Block 1 has the same tokens as seq 1's block 1 but a different parent: no hit.
  auto b = AllocateComputed(*m, 2, Cat(Tok(1000, 4), Tok(50, 5)), 0);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(*b, 0);
  EXPECT_EQ(m->Stats().prefix_hit_blocks, 0);
  EXPECT_EQ(m->Stats().prefix_queried_blocks, 4);
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerPrefix, FullHitBacksOffOneBlock) {
  auto m = Make(Opts(4, 16, 0, true));
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 8), 0).ok());
  auto b = AllocateComputed(*m, 2, Tok(0, 8), 0);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(*b, 4);  // < num_tokens: the last block is computed again
  auto ta = Table(*m, 1), tb = Table(*m, 2);
  EXPECT_EQ(tb[0], ta[0]);
  EXPECT_NE(tb[1], ta[1]);
  EXPECT_EQ(m->Stats().prefix_hit_blocks, 1);
  EXPECT_EQ(m->Stats().prefix_queried_blocks, 4);
  // The duplicate of block 1 is not published: freeing seq 1 leaves its block 1 cached-free; freeing
  // seq 2 then sends seq 2's private duplicate to the free list.
  ASSERT_TRUE(m->Free(1).ok());
  EXPECT_EQ(m->Stats().num_cached_free_blocks, 1);  // ta[1]; ta[0] is still used by seq 2
  ASSERT_TRUE(m->Free(2).ok());
  EXPECT_EQ(m->Stats().num_cached_free_blocks, 2);  // ta[0], ta[1]
  EXPECT_EQ(m->Stats().num_free_blocks, 14);
  // Single-block prompt that hits: still computed.
  auto c = AllocateComputed(*m, 3, Tok(0, 4), 0);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(*c, 0);
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerPrefix, CachedFreeBlocksAreReusedAfterFree) {
  auto m = Make(Opts(4, 8, 0, true));
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 10), 0).ok());
  const auto ta = Table(*m, 1);
  ASSERT_TRUE(m->Free(1).ok());
  auto s = m->Stats();
  EXPECT_EQ(s.num_cached_free_blocks, 2);  // the two full blocks
  EXPECT_EQ(s.num_free_blocks, 6);         // the partial block went to the free list
  EXPECT_EQ(s.num_used_blocks, 0);
  auto c = AllocateComputed(*m, 2, Tok(0, 12), 0);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(*c, 8);
  auto tb = Table(*m, 2);
  EXPECT_EQ(tb[0], ta[0]);
  EXPECT_EQ(tb[1], ta[1]);
  EXPECT_EQ(m->Stats().num_cached_free_blocks, 0);
  EXPECT_EQ(m->Stats().num_evictions, 0);
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerPrefix, DisabledCachingNeverShares) {
  auto m = Make(Opts(4, 8, 0, false));
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 8), 0).ok());
  ASSERT_TRUE(m->Free(1).ok());
  EXPECT_EQ(m->Stats().num_cached_free_blocks, 0);
  EXPECT_EQ(*AllocateComputed(*m, 2, Tok(0, 9), 0), 0);
  EXPECT_EQ(m->Stats().prefix_queried_blocks, 0);
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerPrefix, LruEvictsLeastRecentlyFreedTailFirst) {
  auto m = Make(Opts(2, 4, 0, true));
  ASSERT_TRUE(AllocateComputed(*m, 1, {1, 2, 3, 4}, 0).ok());
  ASSERT_TRUE(AllocateComputed(*m, 2, {5, 6, 7, 8}, 0).ok());
  EXPECT_EQ(Table(*m, 1), (I32s{0, 1}));
  EXPECT_EQ(Table(*m, 2), (I32s{2, 3}));
  ASSERT_TRUE(m->Free(1).ok());  // LRU: 1, 0 (tail block first)
  ASSERT_TRUE(m->Free(2).ok());  // LRU: 1, 0, 3, 2
  EXPECT_EQ(m->Stats().num_cached_free_blocks, 4);
  EXPECT_EQ(m->Stats().num_free_blocks, 0);
  // One fresh block: the least recently freed (block 1, seq 1's tail) is evicted.
  ASSERT_TRUE(AllocateComputed(*m, 3, {9}, 0).ok());
  EXPECT_EQ(Table(*m, 3), (I32s{1}));
  EXPECT_EQ(m->Stats().num_evictions, 1);
  // Seq 1's first block still hits; its second was evicted. The hit leaves the LRU, then two fresh
  // blocks evict 3 and 2 in that order.
  auto c = AllocateComputed(*m, 4, {1, 2, 3, 4, 9}, 0);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(*c, 2);
  EXPECT_EQ(Table(*m, 4), (I32s{0, 3, 2}));
  EXPECT_EQ(m->Stats().num_evictions, 3);
  EXPECT_EQ(m->Stats().num_cached_free_blocks, 0);
  // Block 3 now holds {3, 4} of seq 4 and is published under seq 4's chain.
  ASSERT_TRUE(m->Free(3).ok());
  EXPECT_EQ(*AllocateComputed(*m, 5, {1, 2, 3, 4, 7}, 0), 4);
  EXPECT_EQ(Table(*m, 5), (I32s{0, 3, 1}));
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerPrefix, HitMovesBlockOutOfLruAndBackToTailOnRelease) {
  auto m = Make(Opts(2, 3, 0, true));
  ASSERT_TRUE(AllocateComputed(*m, 1, {1, 2}, 0).ok());  // block 0
  ASSERT_TRUE(AllocateComputed(*m, 2, {3, 4}, 0).ok());  // block 1
  ASSERT_TRUE(m->Free(1).ok());                 // LRU: 0
  ASSERT_TRUE(m->Free(2).ok());                 // LRU: 0, 1
  ASSERT_TRUE(AllocateComputed(*m, 3, {1, 2, 5}, 0).ok());  // hits 0; fresh block 2 from the free list
  EXPECT_EQ(Table(*m, 3), (I32s{0, 2}));
  ASSERT_TRUE(m->Free(3).ok());  // LRU: 1, 0 (block 2 is partial: free list)
  ASSERT_TRUE(AllocateComputed(*m, 4, {7}, 0).ok());     // free list first
  EXPECT_EQ(Table(*m, 4), (I32s{2}));
  ASSERT_TRUE(AllocateComputed(*m, 5, {8}, 0).ok());     // evicts 1, the least recently freed
  EXPECT_EQ(Table(*m, 5), (I32s{1}));
  ASSERT_TRUE(m->Free(4).ok());                 // block 2 back to the free list
  auto c = AllocateComputed(*m, 6, {1, 2, 9}, 0);        // block 0 still cached
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(*c, 2);
  EXPECT_EQ(Table(*m, 6), (I32s{0, 2}));
  EXPECT_EQ(m->Stats().num_evictions, 1);
  EXPECT_INVARIANTS(*m);
}

// ---------------------------------------------------------------------------------------------
// Append

TEST(BlockManagerAppend, GrowsBlocksWithoutCaching) {
  auto m = Make(Opts(4, 4));
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 3), 0).ok());
  auto r = AppendComputed(*m, 1, {}, 1);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(r->has_value());
  EXPECT_EQ(*m->NumBlocks(1), 1);
  ASSERT_TRUE(AppendComputed(*m, 1, {}, 1).ok());
  EXPECT_EQ(Table(*m, 1), (I32s{0, 1}));
  ASSERT_TRUE(AppendComputed(*m, 1, {5, 6, 7, 8, 9, 10}, 6).ok());  // ids allowed, not needed
  EXPECT_EQ(Table(*m, 1), (I32s{0, 1, 2}));
  EXPECT_EQ(*m->NumTokens(1), 11);
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerAppend, ArgumentErrors) {
  auto m = Make(Opts(4, 4, 0, true));
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 3), 0).ok());
  const Snapshot before = Snap(*m, {1});
  auto r = AppendComputed(*m, 1, {}, -3);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_CONTAINS(r.status().message(), "num_tokens=-3 must be >= 1");
  EXPECT_EQ(AppendComputed(*m, 1, {}, 0).status().code(), absl::StatusCode::kInvalidArgument);
  // With prefix caching the ids are required, and their count must match.
  auto e = AppendComputed(*m, 1, {}, 1);
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_CONTAINS(e.status().message(), "num_tokens=1");
  EXPECT_EQ(AppendComputed(*m, 1, std::vector<int32_t>{1, 2}, 3).status().code(),
            absl::StatusCode::kInvalidArgument);
  ExpectSame(before, Snap(*m, {1}));
  auto m2 = Make(Opts(4, 4));
  ASSERT_TRUE(m2->Allocate(1, Tok(0, 3), 0).ok());
  EXPECT_EQ(m2->Append(1, std::vector<int32_t>{1, 2}, 3).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerAppend, ExhaustionLeavesStateUnchanged) {
  auto m = Make(Opts(4, 3));
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 5), 0).ok());  // 2 blocks
  const Snapshot before = Snap(*m, {1});
  auto r = AppendComputed(*m, 1, {}, 8);  // 13 tokens: 4 blocks > 3
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_CONTAINS(r.status().message(), "seq 1");
  ExpectSame(before, Snap(*m, {1}));
  EXPECT_EQ(AppendComputed(*m, 1, {}, int64_t{1} << 62).status().code(),
            absl::StatusCode::kResourceExhausted);
  ExpectSame(before, Snap(*m, {1}));
  ASSERT_TRUE(AppendComputed(*m, 1, {}, 7).ok());  // 12 tokens: exactly 3 blocks
  EXPECT_EQ(m->Stats().num_free_blocks, 0);
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerAppend, PublishesBlocksAsTheyFill) {
  auto m = Make(Opts(4, 16, 0, true));
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 3), 0).ok());
  ASSERT_TRUE(AppendComputed(*m, 1, std::vector<int32_t>{3}, 1).ok());        // block 0 full
  ASSERT_TRUE(AppendComputed(*m, 1, Tok(4, 6), 6).ok());                      // block 1 full, 2 partial
  const auto ta = Table(*m, 1);
  auto c = AllocateComputed(*m, 2, Cat(Tok(0, 8), {77}), 0);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(*c, 8);
  auto tb = Table(*m, 2);
  EXPECT_EQ(tb[0], ta[0]);
  EXPECT_EQ(tb[1], ta[1]);
  // The partial block is not published.
  EXPECT_EQ(*AllocateComputed(*m, 3, Cat(Tok(0, 10), {0, 0}), 0), 8);
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerAppend, CanAppend) {
  auto m = Make(Opts(4, 3, 2));
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 5), 0).ok());
  EXPECT_TRUE(*m->CanAppend(1, 3));
  EXPECT_TRUE(*m->CanAppend(1, 7));
  EXPECT_FALSE(*m->CanAppend(1, 8));
  auto bad = m->CanAppend(1, 0);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_CONTAINS(bad.status().message(), "num_tokens=0");
  // Copy-on-write needs a block too.
  ASSERT_TRUE(m->Fork(1, 2).ok());
  ASSERT_TRUE(AllocateComputed(*m, 3, Tok(0, 1), 0).ok());  // last free block
  EXPECT_FALSE(*m->CanAppend(2, 1));
  EXPECT_EQ(AppendComputed(*m, 2, {}, 1).status().code(), absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(m->Free(3).ok());
  EXPECT_TRUE(*m->CanAppend(2, 1));
  EXPECT_TRUE(*m->CanAppend(2, 3));
  EXPECT_FALSE(*m->CanAppend(2, 4));  // copy + a new block
  ASSERT_TRUE(m->SwapOut(2).ok());
  EXPECT_EQ(m->CanAppend(2, 1).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_INVARIANTS(*m);
}

// ---------------------------------------------------------------------------------------------
// Fork / copy on write

TEST(BlockManagerFork, SharesBlocksAndCopiesOnWriteOnce) {
  auto m = Make(Opts(4, 8, 0, true));
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 6), 0).ok());  // [0, 1], block 1 partial
  ASSERT_TRUE(m->Fork(1, 2).ok());
  EXPECT_EQ(Table(*m, 2), (I32s{0, 1}));
  EXPECT_EQ(*m->NumTokens(2), 6);
  EXPECT_EQ(m->Stats().num_used_blocks, 2);
  EXPECT_EQ(m->Stats().num_sequences, 2);
  EXPECT_INVARIANTS(*m);

  auto r = AppendComputed(*m, 2, std::vector<int32_t>{100}, 1);
  ASSERT_TRUE(r.ok());
  ASSERT_TRUE(r->has_value());
  EXPECT_EQ(**r, (BlockCopy{1, 2}));
  EXPECT_EQ(Table(*m, 2), (I32s{0, 2}));
  EXPECT_EQ(Table(*m, 1), (I32s{0, 1}));
  // Second append to the child and the first to the parent: both private now, no copy.
  auto r2 = AppendComputed(*m, 2, std::vector<int32_t>{101}, 1);
  ASSERT_TRUE(r2.ok());
  EXPECT_FALSE(r2->has_value());
  auto r3 = AppendComputed(*m, 1, std::vector<int32_t>{6}, 1);
  ASSERT_TRUE(r3.ok());
  EXPECT_FALSE(r3->has_value());
  EXPECT_EQ(Table(*m, 1), (I32s{0, 1}));
  EXPECT_EQ(m->Stats().num_used_blocks, 3);
  EXPECT_INVARIANTS(*m);

  // Both full now, and published separately (different contents).
  auto c = AllocateComputed(*m, 3, Cat(Tok(0, 6), {100, 101, 0}), 0);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(*c, 8);
  EXPECT_EQ(Table(*m, 3)[1], 2);
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerFork, CopyOnWriteWithMultipleBlocksAppended) {
  auto m = Make(Opts(4, 8));
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 2), 0).ok());
  ASSERT_TRUE(m->Fork(1, 2).ok());
  ASSERT_TRUE(m->Fork(1, 3).ok());
  auto r = AppendComputed(*m, 1, {}, 7);  // copy of block 0 plus 2 new blocks
  ASSERT_TRUE(r.ok());
  ASSERT_TRUE(r->has_value());
  EXPECT_EQ((*r)->src, 0);
  EXPECT_EQ(Table(*m, 1).size(), 3u);
  EXPECT_EQ(Table(*m, 1)[0], (*r)->dst);
  EXPECT_EQ(Table(*m, 2), (I32s{0}));
  // Block 0 is still shared by 2 and 3: each gets its own copy.
  auto r2 = AppendComputed(*m, 2, {}, 1);
  ASSERT_TRUE(r2.ok() && r2->has_value());
  auto r3 = AppendComputed(*m, 3, {}, 1);
  ASSERT_TRUE(r3.ok());
  EXPECT_FALSE(r3->has_value());  // the last sharer keeps block 0
  EXPECT_EQ(Table(*m, 3), (I32s{0}));
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerFork, FullLastBlockNeedsNoCopy) {
  auto m = Make(Opts(4, 8, 0, true));
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 8), 0).ok());
  ASSERT_TRUE(m->Fork(1, 2).ok());
  auto r = AppendComputed(*m, 2, std::vector<int32_t>{9}, 1);
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->has_value());
  EXPECT_EQ(Table(*m, 2), (I32s{0, 1, 2}));
  auto r1 = AppendComputed(*m, 1, std::vector<int32_t>{9}, 1);
  ASSERT_TRUE(r1.ok());
  EXPECT_FALSE(r1->has_value());
  EXPECT_EQ(Table(*m, 1), (I32s{0, 1, 3}));
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerFork, Errors) {
  auto m = Make(Opts(4, 8, 4, false, 0.0, 3));
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 5), 0).ok());
  ASSERT_TRUE(AllocateComputed(*m, 2, Tok(0, 5), 0).ok());
  const Snapshot before = Snap(*m, {1, 2});
  auto s = m->Fork(1, 2);
  EXPECT_EQ(s.code(), absl::StatusCode::kAlreadyExists);
  EXPECT_CONTAINS(s.message(), "seq 2");
  EXPECT_EQ(m->Fork(1, 1).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(m->Fork(9, 3).code(), absl::StatusCode::kNotFound);
  ExpectSame(before, Snap(*m, {1, 2}));
  ASSERT_TRUE(m->Fork(1, 3).ok());  // takes the last state slot
  const Snapshot before2 = Snap(*m, {1, 2, 3});
  auto e = m->Fork(1, 4);
  EXPECT_EQ(e.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_CONTAINS(e.message(), "state slot");
  ExpectSame(before2, Snap(*m, {1, 2, 3}));
  ASSERT_TRUE(m->Free(3).ok());
  ASSERT_TRUE(m->SwapOut(2).ok());
  auto f = m->Fork(2, 4);
  EXPECT_EQ(f.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_CONTAINS(f.message(), "seq 2");
  EXPECT_EQ(m->Stats().num_sequences, 2);
  EXPECT_INVARIANTS(*m);
}

// ---------------------------------------------------------------------------------------------
// Free

TEST(BlockManagerFree, ReleasesSharedBlocksByReference) {
  auto m = Make(Opts(4, 8));
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 6), 0).ok());
  ASSERT_TRUE(m->Fork(1, 2).ok());
  ASSERT_TRUE(m->Free(1).ok());
  EXPECT_EQ(m->Stats().num_used_blocks, 2);
  EXPECT_EQ(Table(*m, 2), (I32s{0, 1}));
  EXPECT_INVARIANTS(*m);
  ASSERT_TRUE(m->Free(2).ok());
  EXPECT_EQ(m->Stats().num_used_blocks, 0);
  EXPECT_EQ(m->Stats().num_free_blocks, 8);
  EXPECT_EQ(m->Stats().num_sequences, 0);
  auto again = m->Free(2);
  EXPECT_EQ(again.code(), absl::StatusCode::kNotFound);
  EXPECT_CONTAINS(again.message(), "seq 2: unknown sequence id");
  // The id can be reused.
  EXPECT_TRUE(AllocateComputed(*m, 2, Tok(0, 1), 0).ok());
  EXPECT_INVARIANTS(*m);
}

// ---------------------------------------------------------------------------------------------
// Slot mapping / block table

TEST(BlockManagerSlotMapping, MapsPositionsThroughTheTable) {
  auto m = Make(Opts(4, 8));
  ASSERT_TRUE(AllocateComputed(*m, 9, Tok(0, 1), 0).ok());  // takes block 0
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 10), 0).ok());
  EXPECT_EQ(Table(*m, 1), (I32s{1, 2, 3}));
  std::vector<int64_t> out(10, -1);
  ASSERT_TRUE(m->SlotMapping(1, 0, 10, absl::MakeSpan(out)).ok());
  EXPECT_EQ(out, (I64s{4, 5, 6, 7, 8, 9, 10, 11, 12, 13}));
  std::vector<int64_t> part(3, -1);
  ASSERT_TRUE(m->SlotMapping(1, 3, 3, absl::MakeSpan(part)).ok());
  EXPECT_EQ(part, (I64s{7, 8, 9}));
  ASSERT_TRUE(m->SlotMapping(1, 10, 0, {}).ok());  // empty range at the end
}

TEST(BlockManagerSlotMapping, Errors) {
  auto m = Make(Opts(4, 8, 4));
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 10), 0).ok());
  std::vector<int64_t> out(16);
  auto span = absl::MakeSpan(out);
  auto e = m->SlotMapping(1, -1, 2, span);
  EXPECT_EQ(e.code(), absl::StatusCode::kOutOfRange);
  EXPECT_CONTAINS(e.message(), "start=-1");
  EXPECT_EQ(m->SlotMapping(1, 0, -1, span).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(m->SlotMapping(1, 5, 6, span).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(m->SlotMapping(1, 11, 0, span).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(m->SlotMapping(1, 0, std::numeric_limits<int64_t>::max(), span).code(),
            absl::StatusCode::kOutOfRange);
  auto small = m->SlotMapping(1, 0, 5, span.subspan(0, 4));
  EXPECT_EQ(small.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_CONTAINS(small.message(), "count=5");
  ASSERT_TRUE(m->SwapOut(1).ok());
  EXPECT_EQ(m->SlotMapping(1, 0, 1, span).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(m->BlockTable(1).status().code(), absl::StatusCode::kFailedPrecondition);
}

// ---------------------------------------------------------------------------------------------
// State slots

TEST(BlockManagerStateSlots, AssignedAtAllocateAndForkReleasedAtFree) {
  auto m = Make(Opts(4, 16, 8, false, 0.0, 2));
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 3), 0).ok());
  ASSERT_TRUE(m->Fork(1, 2).ok());
  const int32_t s1 = *m->StateSlot(1), s2 = *m->StateSlot(2);
  EXPECT_NE(s1, s2);
  EXPECT_GE(s1, 0);
  EXPECT_LT(s1, 2);
  EXPECT_GE(s2, 0);
  EXPECT_LT(s2, 2);
  const Snapshot before = Snap(*m, {1, 2});
  auto e = AllocateComputed(*m, 3, Tok(0, 3), 0);
  EXPECT_EQ(e.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_CONTAINS(e.status().message(), "state slot");
  ExpectSame(before, Snap(*m, {1, 2}));
  EXPECT_EQ(m->CanAllocate(Tok(0, 3), 3, 0), AllocVerdict::kLater);
  // Swapping keeps the slot.
  ASSERT_TRUE(m->SwapOut(1).ok());
  EXPECT_EQ(*m->StateSlot(1), s1);
  ASSERT_TRUE(m->SwapIn(1).ok());
  EXPECT_EQ(*m->StateSlot(1), s1);
  ASSERT_TRUE(m->Free(1).ok());
  EXPECT_EQ(m->CanAllocate(Tok(0, 3), 3, 0), AllocVerdict::kOk);
  ASSERT_TRUE(AllocateComputed(*m, 3, Tok(0, 3), 0).ok());
  EXPECT_EQ(*m->StateSlot(3), s1);
  EXPECT_INVARIANTS(*m);
  // Freeing a swapped sequence releases its slot too.
  ASSERT_TRUE(m->SwapOut(3).ok());
  ASSERT_TRUE(m->Free(3).ok());
  ASSERT_TRUE(AllocateComputed(*m, 4, Tok(0, 3), 0).ok());
  EXPECT_EQ(*m->StateSlot(4), s1);
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerStateSlots, MinusOneWithoutSlots) {
  auto m = Make(Opts(4, 16));
  for (uint64_t id = 0; id < 10; ++id) ASSERT_TRUE(AllocateComputed(*m, id, Tok(0, 3), 0).ok());
  ASSERT_TRUE(m->Fork(0, 100).ok());
  EXPECT_EQ(*m->StateSlot(0), -1);
  EXPECT_EQ(*m->StateSlot(100), -1);
  EXPECT_INVARIANTS(*m);
}

// ---------------------------------------------------------------------------------------------
// Swap

TEST(BlockManagerSwap, OutAndInPlans) {
  auto m = Make(Opts(4, 8, 4));
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 2), 0).ok());  // block 0
  ASSERT_TRUE(AllocateComputed(*m, 2, Tok(0, 6), 0).ok());  // blocks 1, 2
  const auto t2 = Table(*m, 2);
  EXPECT_EQ(*m->NumBlocks(2), 2);
  auto out = m->SwapOut(2);
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(out->size(), 2u);
  EXPECT_EQ((*out)[0].src, t2[0]);
  EXPECT_EQ((*out)[1].src, t2[1]);
  EXPECT_NE((*out)[0].dst, (*out)[1].dst);
  for (const BlockCopy& c : *out) {
    EXPECT_GE(c.dst, 0);
    EXPECT_LT(c.dst, 4);
  }
  EXPECT_TRUE(*m->IsSwapped(2));
  EXPECT_EQ(*m->NumBlocks(2), 2);
  EXPECT_EQ(*m->NumTokens(2), 6);
  auto s = m->Stats();
  EXPECT_EQ(s.num_free_host_blocks, 2);
  EXPECT_EQ(s.num_swapped_sequences, 1);
  EXPECT_EQ(s.num_sequences, 2);
  EXPECT_EQ(s.num_used_blocks, 1);
  EXPECT_EQ(s.num_free_blocks, 7);
  EXPECT_INVARIANTS(*m);

  // Take the device blocks it left so swap-in gets different ones.
  ASSERT_TRUE(AllocateComputed(*m, 3, Tok(0, 5), 0).ok());
  auto in = m->SwapIn(2);
  ASSERT_TRUE(in.ok()) << in.status();
  ASSERT_EQ(in->size(), 2u);
  EXPECT_EQ((*in)[0].src, (*out)[0].dst);
  EXPECT_EQ((*in)[1].src, (*out)[1].dst);
  const auto t2b = Table(*m, 2);
  EXPECT_EQ((*in)[0].dst, t2b[0]);
  EXPECT_EQ((*in)[1].dst, t2b[1]);
  EXPECT_FALSE(*m->IsSwapped(2));
  s = m->Stats();
  EXPECT_EQ(s.num_free_host_blocks, 4);
  EXPECT_EQ(s.num_swapped_sequences, 0);
  EXPECT_EQ(s.num_used_blocks, 5);
  // A resident sequence is usable again.
  EXPECT_TRUE(AppendComputed(*m, 2, {}, 3).ok());
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerSwap, Errors) {
  auto m = Make(Opts(4, 6, 2));
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 9), 0).ok());  // 3 blocks > 2 host blocks
  ASSERT_TRUE(AllocateComputed(*m, 2, Tok(0, 5), 0).ok());  // 2 blocks
  const Snapshot before = Snap(*m, {1, 2});
  auto e = m->SwapOut(1);
  EXPECT_EQ(e.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_CONTAINS(e.status().message(), "needs 3 free host blocks, only 2");
  ExpectSame(before, Snap(*m, {1, 2}));
  auto in = m->SwapIn(2);
  EXPECT_EQ(in.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_CONTAINS(in.status().message(), "seq 2");

  ASSERT_TRUE(m->SwapOut(2).ok());
  EXPECT_EQ(m->SwapOut(2).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(AppendComputed(*m, 2, {}, 1).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(m->BlockTable(2).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(m->Fork(2, 3).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(m->SlotMapping(2, 0, 1, {}).code(), absl::StatusCode::kFailedPrecondition);
  // Queries that work for swapped sequences.
  EXPECT_EQ(*m->NumBlocks(2), 2);
  EXPECT_EQ(*m->NumTokens(2), 5);
  EXPECT_EQ(*m->StateSlot(2), -1);
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerSwap, SwapInNeedsFreeDeviceBlocks) {
  auto m = Make(Opts(4, 6, 4));
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 8), 0).ok());  // 2 blocks
  ASSERT_TRUE(m->SwapOut(1).ok());
  ASSERT_TRUE(AllocateComputed(*m, 2, Tok(0, 20), 0).ok());  // 5 of 6 blocks
  const Snapshot before = Snap(*m, {1, 2});
  auto in = m->SwapIn(1);
  EXPECT_EQ(in.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_CONTAINS(in.status().message(), "needs 2 free device blocks, only 1");
  ExpectSame(before, Snap(*m, {1, 2}));
  EXPECT_TRUE(*m->IsSwapped(1));
  // Freeing a swapped sequence returns its host blocks.
  ASSERT_TRUE(m->Free(1).ok());
  EXPECT_EQ(m->Stats().num_free_host_blocks, 4);
  EXPECT_EQ(m->Stats().num_swapped_sequences, 0);
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerSwap, SharedBlocksStayWithTheOtherSequence) {
  auto m = Make(Opts(4, 8, 8));
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 6), 0).ok());
  ASSERT_TRUE(m->Fork(1, 2).ok());
  auto out = m->SwapOut(2);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(out->size(), 2u);
  EXPECT_EQ(m->Stats().num_used_blocks, 2);  // still held by seq 1
  EXPECT_EQ(Table(*m, 1), (I32s{0, 1}));
  // Seq 1's last block is private again: no copy on append.
  auto r = AppendComputed(*m, 1, {}, 1);
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->has_value());
  auto in = m->SwapIn(2);
  ASSERT_TRUE(in.ok());
  EXPECT_EQ(m->Stats().num_used_blocks, 4);
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerSwap, CachedBlocksSurviveSwapOutAndHashChainContinuesAfterSwapIn) {
  auto m = Make(Opts(4, 16, 8, true));
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 6), 3).ok());  // block 0 full and published
  const auto t1 = Table(*m, 1);
  ASSERT_TRUE(m->SwapOut(1).ok());
  EXPECT_EQ(m->Stats().num_cached_free_blocks, 1);  // t1[0]
  ASSERT_TRUE(m->SwapIn(1).ok());
  const auto t1b = Table(*m, 1);
  EXPECT_NE(t1b[0], t1[0]);  // fresh blocks, not published
  EXPECT_EQ(m->Stats().num_cached_free_blocks, 1);
  EXPECT_INVARIANTS(*m);
  // Appending fills block 1, published under the chain that continues from block 0's hash.
  ASSERT_TRUE(AppendComputed(*m, 1, Tok(6, 2), 2).ok());
  EXPECT_INVARIANTS(*m);
  auto c = AllocateComputed(*m, 2, Cat(Tok(0, 8), {1}), 3);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(*c, 8);
  const auto t2 = Table(*m, 2);
  EXPECT_EQ(t2[0], t1[0]);   // the cached-free original
  EXPECT_EQ(t2[1], t1b[1]);  // published by the append after swap-in
  EXPECT_INVARIANTS(*m);
}

// ---------------------------------------------------------------------------------------------
// CanAllocate / watermark

TEST(BlockManagerCanAllocate, WatermarkVerdicts) {
  auto m = Make(Opts(4, 10, 0, false, 0.2));  // watermark: 2 blocks
  EXPECT_EQ(m->CanAllocate({}, 33, 0), AllocVerdict::kNever);  // 9 blocks > 10 - 2
  EXPECT_EQ(m->CanAllocate({}, 32, 0), AllocVerdict::kOk);     // 8 blocks leave 2
  EXPECT_EQ(m->CanAllocate({}, 0, 0), AllocVerdict::kNever);
  EXPECT_EQ(m->CanAllocate({}, -5, 0), AllocVerdict::kNever);
  EXPECT_EQ(m->CanAllocate(Tok(0, 3), 4, 0), AllocVerdict::kNever);  // ids/count mismatch
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 12), 0).ok());                  // 3 blocks, 7 left
  EXPECT_EQ(m->CanAllocate({}, 21, 0), AllocVerdict::kLater);        // 6 blocks leave 1
  EXPECT_EQ(m->CanAllocate({}, 20, 0), AllocVerdict::kOk);           // 5 blocks leave 2
  // Allocate does not enforce the watermark.
  ASSERT_TRUE(AllocateComputed(*m, 2, Tok(0, 28), 0).ok());  // 7 blocks
  EXPECT_EQ(m->Stats().num_free_blocks, 0);
  EXPECT_EQ(m->CanAllocate({}, 1, 0), AllocVerdict::kLater);
  EXPECT_EQ(m->CanAllocate({}, 33, 0), AllocVerdict::kNever);
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerCanAllocate, ZeroWatermark) {
  auto m = Make(Opts(4, 4));
  EXPECT_EQ(m->CanAllocate({}, 16, 0), AllocVerdict::kOk);
  EXPECT_EQ(m->CanAllocate({}, 17, 0), AllocVerdict::kNever);
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 1), 0).ok());
  EXPECT_EQ(m->CanAllocate({}, 16, 0), AllocVerdict::kLater);
  EXPECT_EQ(m->CanAllocate({}, 12, 0), AllocVerdict::kOk);
}

TEST(BlockManagerCanAllocate, PrefixCredit) {
  auto m = Make(Opts(4, 6, 0, true));
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 16), 0).ok());  // 4 blocks, all published
  // 6 blocks of which 4 hit used blocks: 2 fresh, 2 available.
  const auto p = Cat(Tok(0, 16), Tok(100, 8));
  EXPECT_EQ(m->CanAllocate(p, 24, 0), AllocVerdict::kOk);
  EXPECT_EQ(m->CanAllocate({}, 24, 0), AllocVerdict::kLater);  // no ids, no credit
  EXPECT_EQ(m->CanAllocate(p, 24, 1), AllocVerdict::kLater);   // other key, no credit
  ASSERT_TRUE(m->Free(1).ok());  // 4 cached-free + 2 free
  // Cached-free hits are taken out of the pool: 4 hits + 2 fresh = 6 = everything.
  EXPECT_EQ(m->CanAllocate(p, 24, 0), AllocVerdict::kOk);
  auto q = Cat(Tok(0, 16), Tok(100, 9));  // 7 blocks: more than the pool
  EXPECT_EQ(m->CanAllocate(q, 25, 0), AllocVerdict::kNever);
  ASSERT_TRUE(AllocateComputed(*m, 2, Tok(500, 1), 0).ok());  // 1 free block left
  EXPECT_EQ(m->CanAllocate(p, 24, 0), AllocVerdict::kLater);
  EXPECT_EQ(AllocateComputed(*m, 3, p, 0).status().code(), absl::StatusCode::kResourceExhausted);
  // 4 hits + 1 fresh fits.
  const auto r = Cat(Tok(0, 16), Tok(100, 3));
  EXPECT_EQ(m->CanAllocate(r, 19, 0), AllocVerdict::kOk);
  auto c = AllocateComputed(*m, 3, r, 0);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(*c, 16);
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerCanAllocate, FullHitCreditMatchesAllocate) {
  auto m = Make(Opts(4, 3, 0, true));
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 8), 0).ok());  // 2 blocks
  // Same 8 tokens: 1 hit (back-off) + 1 fresh block; 1 available.
  EXPECT_EQ(m->CanAllocate(Tok(0, 8), 8, 0), AllocVerdict::kOk);
  ASSERT_TRUE(AllocateComputed(*m, 2, Tok(0, 8), 0).ok());
  EXPECT_EQ(m->CanAllocate(Tok(0, 8), 8, 0), AllocVerdict::kLater);
  EXPECT_INVARIANTS(*m);
}

// ---------------------------------------------------------------------------------------------
// Stats

TEST(BlockManagerStats, TracksEverything) {
  auto m = Make(Opts(2, 6, 4, true));
  ASSERT_TRUE(AllocateComputed(*m, 1, {1, 2, 3, 4, 5}, 0).ok());  // 3 blocks, 2 published
  ASSERT_TRUE(AllocateComputed(*m, 2, {1, 2, 3, 4, 6}, 0).ok());  // hits 2, 1 fresh
  ASSERT_TRUE(m->SwapOut(2).ok());
  auto s = m->Stats();
  EXPECT_EQ(s.num_used_blocks, 3);
  EXPECT_EQ(s.num_free_blocks, 3);
  EXPECT_EQ(s.num_cached_free_blocks, 0);
  EXPECT_EQ(s.num_free_host_blocks, 1);
  EXPECT_EQ(s.num_sequences, 2);
  EXPECT_EQ(s.num_swapped_sequences, 1);
  EXPECT_EQ(s.prefix_queried_blocks, 4);
  EXPECT_EQ(s.prefix_hit_blocks, 2);
  ASSERT_TRUE(m->Free(1).ok());
  s = m->Stats();
  EXPECT_EQ(s.num_used_blocks, 0);
  EXPECT_EQ(s.num_cached_free_blocks, 2);
  EXPECT_EQ(s.num_free_blocks, 4);
  EXPECT_EQ(s.num_used_blocks + s.num_free_blocks + s.num_cached_free_blocks, 6);
  ASSERT_TRUE(AllocateComputed(*m, 3, {9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9}, 0).ok());  // 6 blocks: 2 evictions
  EXPECT_EQ(m->Stats().num_evictions, 2);
  EXPECT_EQ(m->Stats().num_cached_free_blocks, 0);
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerInvariants, HoldThroughAMixedScenario) {
  auto m = Make(Opts(4, 12, 6, true, 0.1, 4, 1234));
  ASSERT_TRUE(AllocateComputed(*m, 1, Tok(0, 13), 5).ok());
  ASSERT_TRUE(m->Fork(1, 2).ok());
  ASSERT_TRUE(AppendComputed(*m, 2, Tok(13, 3), 3).ok());
  ASSERT_TRUE(AllocateComputed(*m, 3, Tok(0, 17), 5).ok());
  ASSERT_TRUE(m->SwapOut(1).ok());
  EXPECT_INVARIANTS(*m);
  ASSERT_TRUE(m->Free(2).ok());
  ASSERT_TRUE(m->SwapIn(1).ok());
  ASSERT_TRUE(AppendComputed(*m, 1, Tok(13, 4), 4).ok());
  EXPECT_INVARIANTS(*m);
  ASSERT_TRUE(m->Free(1).ok());
  ASSERT_TRUE(m->Free(3).ok());
  auto s = m->Stats();
  EXPECT_EQ(s.num_used_blocks, 0);
  EXPECT_EQ(s.num_sequences, 0);
  EXPECT_EQ(s.num_free_host_blocks, 6);
  EXPECT_INVARIANTS(*m);
}

}  // namespace
}  // namespace kvplug::paged

namespace kvplug::paged {
namespace {

TEST(BlockManagerPrefix, BlocksReachTheCacheOnlyOnceComputed) {
  auto m = Make(Opts(4, 16, 0, true));
  // A 10-token prompt computed in chunks: nothing is served before its K/V is written.
  ASSERT_EQ(*m->Allocate(1, Tok(0, 10), 0), 0);
  ASSERT_EQ(*m->Allocate(2, Tok(0, 10), 0), 0);  // no hit: seq 1 computed nothing yet
  ASSERT_TRUE(m->MarkComputed(1, 6).ok());         // block 0 full and computed, block 1 not
  EXPECT_EQ(*m->Allocate(3, Tok(0, 10), 0), 4);
  ASSERT_TRUE(m->MarkComputed(1, 10).ok());
  EXPECT_EQ(*m->Allocate(4, Tok(0, 10), 0), 8);
  ASSERT_TRUE(m->MarkComputed(1, 3).ok());  // never goes backwards: no effect
  EXPECT_EQ(*m->Allocate(5, Tok(0, 10), 0), 8);
  // Appended tokens likewise.
  ASSERT_TRUE(m->Append(4, Tok(10, 2), 2).ok());  // fills block 2 of seq 4 (tokens 8..11)
  EXPECT_EQ(*m->Allocate(6, Tok(0, 13), 0), 8);
  ASSERT_TRUE(m->MarkComputed(4, 12).ok());
  EXPECT_EQ(*m->Allocate(7, Tok(0, 13), 0), 12);
  EXPECT_EQ(m->MarkComputed(4, 13).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(m->MarkComputed(4, -1).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(m->MarkComputed(99, 1).code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(m->CheckInvariants().ok()) << m->CheckInvariants();
}

}  // namespace
}  // namespace kvplug::paged
